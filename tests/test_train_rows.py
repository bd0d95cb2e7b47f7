"""Rows packs (data.row_packs, forward.rows_batch): documents bin-packed into equal rows, each a sequence from
position 0, run as one [rows, row_len] batch. The batch must compute exactly what each row computes as its own
sequence (the per-document `StepBatch` path), and its padding must be neither a target nor expert load.

Tolerances: the same model, weights and tokens in fp32 on CPU; the rows batch and the per-row path differ only in
how the sums are grouped (the MTP CE summed once over all rows vs per row, attention batched vs per sequence), so
losses and gradients agree to fp32 reordering: rtol 1e-5 on the summed losses (a few hundred terms), rtol 1e-4 /
atol 1e-6 on gradients (sums over every token of the batch). Expert loads are integer counts: equal.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import dsv4
from dsv4.train.data import Document, PackStream, Row, row_packs
from dsv4.train.forward import LoadCounter, TrainStep, packed_batch, rows_batch
from dsv4.train.greedy_probe import mix_prompts, probe_prefixes, row_prefixes
from dsv4.train.loop import TrainConfig, Trainer
from dsv4.train.params import prepare_full

BOS, PAD = 0, 0


def _docs(rng: random.Random, n: int, longest: int, vocab: int = 60) -> list[Document]:
    docs = []
    for _ in range(n):
        k = rng.randint(2, longest)
        docs.append(Document([BOS, *(rng.randint(1, vocab - 1) for _ in range(k - 1))],
                             [False, *(rng.random() < 0.8 for _ in range(k - 1))]))
    return docs


def _split_at_bos(ids: list[int]) -> list[tuple[int, ...]]:
    starts = [i for i, t in enumerate(ids) if t == BOS] + [len(ids)]
    return [tuple(ids[a:b]) for a, b in itertools.pairwise(starts)]


def test_row_packs_hold_every_document_once_each_row_from_a_document_start():
    rng = random.Random(0)
    docs = _docs(rng, 300, 90)
    R, k = 128, 4
    packs = row_packs(docs, R, k, pad_id=PAD, seed=5)
    rows = [r for p in packs for r in p]
    assert all(len(p) == k for p in packs[:-1]) and 1 <= len(packs[-1]) <= k
    got = []
    for r in rows:
        assert isinstance(r, Row) and len(r.ids) == len(r.mask) == R and 2 <= r.real <= R
        assert r.ids[0] == BOS                                   # a document starts every row, at position 0
        assert r.ids[r.real:] == [PAD] * (R - r.real) and not any(r.mask[r.real:])    # padding: never a target
        got += _split_at_bos(r.ids[:r.real])
    assert sorted(got) == sorted(tuple(d.ids) for d in docs)     # nothing lost, nothing twice
    by_ids = {tuple(d.ids): d.mask for d in docs}
    for r in rows:                                                # each document's targets, its BOS never one
        at = 0
        for piece in _split_at_bos(r.ids[:r.real]):
            assert r.mask[at:at + len(piece)] == [False, *by_ids[piece][1:]]
            at += len(piece)
    total = sum(len(d) for d in docs)
    assert len(rows) <= total / R * 1.05 + 1, (len(rows), total / R)   # bin-packed, not a document per row
    assert [r.ids for r in rows] == [r.ids for p in row_packs(docs, R, k, seed=5) for r in p]    # deterministic


def test_row_packs_cut_longer_documents_with_a_warning():
    docs = [Document([BOS, *range(1, 40)], [True] * 40), Document([BOS, 1, 2], [True] * 3)]
    with pytest.warns(UserWarning, match="1 of 2 documents are longer than row_len=16"):
        rows = [r for p in row_packs(docs, 16, 2) for r in p]
    assert sorted(r.real for r in rows) == [3, 16]
    with pytest.raises(ValueError, match="row_len"):
        row_packs(docs, 1, 2)


def _trainable(ckpt):
    """The tiny model as the trainer takes it (fp32, QAT): a fresh one for each test that trains."""
    return prepare_full(dsv4.load_model(ckpt, dtype=torch.float32, quant_emulation=True, progress=False), qat=True)


def _capture_probes(monkeypatch) -> list:
    """Record the prefixes [P, s] of every greedy probe the trainer runs (it still runs them)."""
    import dsv4.train.loop as loop

    seen, greedy = [], loop.greedy_continue

    def capture(step_module, prefixes, n):
        seen.append(prefixes.tolist())
        return greedy(step_module, prefixes, n)

    monkeypatch.setattr(loop, "greedy_continue", capture)
    return seen


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return _trainable(tiny_ckpt)


def _rows(seed=1, n_rows=3, R=48) -> list[Row]:
    rng = random.Random(seed)
    rows = [r for p in row_packs(_docs(rng, 7, 30), R, n_rows, seed=seed) for r in p]
    assert len(rows) >= 2 and any(r.real < R for r in rows)       # several rows, and some padding to ignore
    return rows[:n_rows]


def _losses_and_grads(model, pb):
    step = TrainStep(model, grad_ckpt=False, mtp_weight=0.3, copy_ngram=4)
    model.zero_grad(set_to_none=True)
    ce, mtp, n, copy = step(pb)
    (ce + mtp).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return ce.detach(), mtp.detach(), n, copy.detach(), grads


def test_a_rows_batch_computes_what_each_row_computes_as_its_own_sequence(model):
    rows = _rows()
    fresh = _losses_and_grads(model, rows_batch(rows, "cpu"))
    alone = _losses_and_grads(model, packed_batch([Document(r.ids, r.mask) for r in rows], "cpu"))
    for i, what in ((0, "main CE"), (1, "MTP CE"), (3, "copy terms")):
        torch.testing.assert_close(fresh[i], alone[i], rtol=1e-5, atol=0, msg=what)
    assert fresh[2] == alone[2] > 0                               # the same MTP targets
    assert fresh[4].keys() == alone[4].keys() and fresh[4]
    for k in fresh[4]:
        torch.testing.assert_close(fresh[4][k], alone[4][k], rtol=1e-4, atol=1e-6, msg=k)


def test_padding_is_not_expert_load(model):
    """The rows' padding tokens pass through the routers; the counter counts exactly the expert loads of the same
    rows without padding (each its own sequence), main and MTP gates."""
    rows = _rows(seed=2)
    counter = LoadCounter(model)
    try:
        with torch.no_grad():
            pb = rows_batch(rows, "cpu")
            counter.real_mask(pb.real)
            TrainStep(model, grad_ckpt=False, mtp_weight=0.3)(pb)
            padded = counter.take()
            counter.real_mask(None)
            TrainStep(model, grad_ckpt=False, mtp_weight=0.3)(
                packed_batch([Document(r.ids[:r.real], r.mask[:r.real]) for r in rows], "cpu"))
            plain = counter.take()
    finally:
        for h in counter.handles:
            h.remove()
    assert padded.keys() == plain.keys() and any(k.startswith("mtp.") for k in padded)
    for k in padded:
        assert torch.equal(padded[k], plain[k]), k
    assert sum(int(c.sum()) for c in padded.values()) > 0


def test_the_probe_of_a_rows_pack_continues_its_rows_starts():
    rows = [r for p in row_packs(_docs(random.Random(6), 20, 30), 32, 8) for r in p][:3]
    starts = [r.ids[:6] for r in rows if r.real >= 6]
    assert len(starts) >= 2
    got = row_prefixes(rows, 5, 6, BOS)
    assert got == [starts[i % len(starts)] for i in range(5)] and all(p[0] == BOS for p in got)
    short = [Row([BOS, 5, 6, PAD], [False, True, True, False], 3)]
    assert row_prefixes(short, 2, 6, BOS) == probe_prefixes([Document([BOS, 5, 6], [False, True, True])], 2, 6, BOS)


def test_trainer_runs_rows_packs_with_the_probe(tiny_ckpt, tmp_path):
    m = _trainable(tiny_ckpt)
    packs = row_packs(_docs(random.Random(4), 12, 30), 32, 2)
    cfg = TrainConfig(max_steps=2, lr=1e-3, warmup_steps=1, seq_len=64, grad_ckpt=False, mtp_weight=0.3,
                      bias_update_rate=1e-3, rows=True, greedy_probe_every=1, probe_prefixes=2, probe_prefix_len=6,
                      probe_tokens=4, seq_unlikelihood=1.0)
    rec = Trainer(m, PackStream(packs, 1, 0), cfg, tmp_path, progress=False).train_step()
    assert rec["tokens"] == 64 and rec["loss"] > 0 and "mtp_loss" in rec and "greedy_distinct4" in rec


def test_mix_prompts_replaces_the_last_share_of_the_starts_cycling_the_prompts():
    starts = [[BOS, 1, 1], [BOS, 2, 2], [BOS, 3, 3], [BOS, 4, 4]]
    prompts = [[BOS, 7, 7], [BOS, 8, 8], [BOS, 9, 9]]
    assert mix_prompts(starts, prompts, 0.0, 5) == starts
    assert mix_prompts(starts, prompts, 0.5, 0) == starts[:2] + prompts[:2]
    assert mix_prompts(starts, prompts, 0.5, 2) == [*starts[:2], prompts[2], prompts[0]]
    assert mix_prompts(starts, prompts, 1.0, 1) == [prompts[1], prompts[2], prompts[0], prompts[1]]
    with pytest.raises(ValueError, match="prefix length 3; got lengths \\[2\\]"):
        mix_prompts(starts, [[BOS, 7]], 0.5, 0)
    with pytest.raises(ValueError, match="needs prompts"):
        mix_prompts(starts, [], 0.5, 0)


def test_the_trainer_probes_its_prompts_beside_the_rows(tiny_ckpt, tmp_path, monkeypatch):
    m = _trainable(tiny_ckpt)
    packs = row_packs(_docs(random.Random(4), 12, 30), 32, 2)
    seen = _capture_probes(monkeypatch)
    prompts = [[BOS, 40 + i, 41, 42, 43, 44] for i in range(3)]
    cfg = TrainConfig(max_steps=2, lr=1e-3, warmup_steps=1, seq_len=64, grad_ckpt=False, mtp_weight=0.3,
                      bias_update_rate=1e-3, rows=True, greedy_probe_every=1, probe_prefixes=4, probe_prefix_len=6,
                      probe_tokens=4, seq_unlikelihood=1.0, probe_prompt_share=0.5)
    trainer = Trainer(m, PackStream(packs, 1, 0), cfg, tmp_path, progress=False, probe_prompts=prompts)
    for _ in range(2):
        assert "greedy_distinct4" in trainer.train_step()
    assert [p[2:] for p in seen] == [prompts[0:2], [prompts[2], prompts[0]]]      # the next prompts each probe
    assert all(p[0] in (r.ids[:6] for q in packs for r in q) for p in seen)       # the rest: the rows' own starts
    for share, prompts_, match in ((0.5, None, "needs prompts"), (0.5, [[BOS, 1]], "prefix length 6"),
                                   (1.5, prompts, "must be in \\[0, 1\\]")):
        with pytest.raises(ValueError, match=match):
            Trainer(m, PackStream(packs, 1, 0), TrainConfig(**{**cfg.__dict__, "probe_prompt_share": share}),
                    tmp_path, progress=False, probe_prompts=prompts_)


def test_the_probes_cycle_through_their_prefix_lengths_each_with_its_own_prompts(tiny_ckpt, tmp_path, monkeypatch):
    m = _trainable(tiny_ckpt)
    packs = row_packs(_docs(random.Random(5), 12, 30), 32, 2)
    seen = _capture_probes(monkeypatch)
    long_ = [[BOS, 40 + i, 41, 42, 43, 44] for i in range(3)]             # e.g. chat requests
    short = [[BOS, 50 + i, 51, 52] for i in range(2)]                      # e.g. function headers
    cfg = TrainConfig(max_steps=3, lr=1e-3, warmup_steps=1, seq_len=64, grad_ckpt=False, mtp_weight=0.3,
                      bias_update_rate=1e-3, rows=True, greedy_probe_every=1, probe_prefixes=2, probe_prefix_len=6,
                      probe_tokens=4, seq_unlikelihood=1.0, probe_prompt_share=0.5, probe_prefix_lens=(4,))
    trainer = Trainer(m, PackStream(packs, 1, 0), cfg, tmp_path, progress=False, probe_prompts=long_ + short)
    for _ in range(3):
        assert "greedy_distinct4" in trainer.train_step()
    assert [len(p[0]) for p in seen] == [6, 4, 6]                          # lengths in turn
    assert [p[1] for p in seen] == [long_[0], short[0], long_[1]]          # each length's next prompt
    assert seen[1][0] in [r.ids[:4] for q in packs for r in q]              # the rows' starts, cut to 4
    stray = (long_ + short + [[BOS, 1]], "one of \\[6, 4\\]; got lengths \\[2\\]")
    for prompts, match in ((long_, "needs prompts"), stray):
        with pytest.raises(ValueError, match=match):
            Trainer(m, PackStream(packs, 1, 0), cfg, tmp_path, progress=False, probe_prompts=prompts)
    with pytest.raises(ValueError, match="must differ"):
        Trainer(m, PackStream(packs, 1, 0), TrainConfig(**{**cfg.__dict__, "probe_prefix_lens": (4, 6)}), tmp_path,
                progress=False, probe_prompts=long_ + short)


@pytest.mark.gpu
def test_the_captured_probe_on_cuda(tiny_ckpt):
    """On CUDA (bf16, QAT, what the GPU trainer probes with): the decode steps of the cached probe are one captured
    CUDA graph, and it makes the eager cached probe's tokens (exact: the captured step pads the MoE groups, which
    changes only the batched product's shape; near-ties apart, so >= 0.95 of them), P = 4 over 8 + 60 tokens."""
    import time

    from dsv4.engine import graphs as graphs_mod
    from dsv4.train.greedy_probe import greedy_continue_cached
    from dsv4.train.params import refresh_qat

    m = prepare_full(dsv4.load_model(tiny_ckpt, device="cuda", dtype=torch.bfloat16, quant_emulation=True,
                                     progress=False), qat=True)
    refresh_qat(m)
    gen = torch.Generator().manual_seed(8)
    prefixes = torch.randint(2, m.cfg.vocab_size, (4, 8), generator=gen)
    prefixes[:, 0] = BOS
    prefixes = prefixes.cuda()
    step = TrainStep(m, grad_ckpt=False)
    captured = []
    real = graphs_mod._Graph.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        captured.append(self.graph is not None)

    graphs_mod._Graph.__init__ = spy
    try:
        t0 = time.perf_counter()
        fast = greedy_continue_cached(step, prefixes, 60, graphs=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        eager = greedy_continue_cached(step, prefixes, 60)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    finally:
        graphs_mod._Graph.__init__ = real
    assert captured == [True]
    agree = (fast[:, 8:] == eager[:, 8:]).float().mean().item()
    print(f"captured probe {t1 - t0:.2f} s (capture included), eager cached {t2 - t1:.2f} s, agreement {agree:.3f}")
    assert torch.equal(fast[:, :9], eager[:, :9]) and agree >= 0.95


def test_the_cached_greedy_probe_makes_the_full_forwards_tokens(tiny_ckpt, tmp_path):
    """greedy_continue_cached (one prefill into decode state, then a token per sequence a step) == greedy_continue
    (a full forward per token): a 96-token prefill (past the window, 16), then 34 decode steps that wrap the
    window's ring twice and cross 8 compressed blocks of 4 and the first HCA block of 128 (a longer prefill than
    decode: the full forwards cost the sum of their lengths, ~4x this test's time from an 8-token prefix); and a
    trainer step with probe_cache records what the plain probe records."""
    from dsv4.train.greedy_probe import greedy_continue, greedy_continue_cached
    from dsv4.train.params import refresh_qat

    m = _trainable(tiny_ckpt)
    refresh_qat(m)                              # as the trainer's step does before its probe (else ~4x slower)
    gen = torch.Generator().manual_seed(7)
    prefixes = torch.randint(2, m.cfg.vocab_size, (1, 96), generator=gen)
    prefixes[:, 0] = BOS
    step = TrainStep(m, grad_ckpt=False)
    cached = greedy_continue_cached(step, prefixes, 34)
    assert torch.equal(cached, greedy_continue(step, prefixes, 34)) and cached.shape == (1, 130)
    # graphs=True: the decode steps through DecodeGraphs (captured on a GPU; here the same step run eagerly), with
    # its scratch slot and page in the state
    assert torch.equal(greedy_continue_cached(step, prefixes, 34, graphs=True), cached)
    packs = row_packs(_docs(random.Random(6), 12, 30), 32, 2)
    records = []
    for cache in (False, True):
        model = _trainable(tiny_ckpt)
        cfg = TrainConfig(max_steps=1, lr=1e-3, warmup_steps=1, seq_len=64, grad_ckpt=False, mtp_weight=0.3,
                          bias_update_rate=1e-3, rows=True, greedy_probe_every=1, probe_prefixes=2,
                          probe_prefix_len=6, probe_tokens=8, seq_unlikelihood=1.0, probe_cache=cache)
        records.append(Trainer(model, PackStream(packs, 1, 0), cfg, tmp_path / str(cache), progress=False).train_step())
    for key in ("loss", "greedy_seq_rep4", "greedy_distinct4", "seq_ul"):
        assert records[0][key] == records[1][key], key
