"""Unlikelihood of wrong in-context copies (dsv4/train/unlikelihood.py): the vectorised candidate finder against a
plain Python twin, the term against its formula, ALPHA = 0 bit-identical to the plain CE path, the gradient
lowering p(c_t), and no host read added to the training step.

Tolerances: candidates are integers (exact); the term is fp32 math on the same log-probabilities as the formula's
(`assert_close` fp32 defaults); the CE path with copy statistics is the same ATen ops as `F.cross_entropy`
(compared bit-exact, loss and every gradient).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_train_syncs import _allowed, _sites, train_step_ops

import dsv4
from dsv4.train.data import Document, PackStream, concat_pack
from dsv4.train.forward import IGNORE, TrainStep, packed_batch
from dsv4.train.loop import TrainConfig, Trainer
from dsv4.train.params import prepare_full
from dsv4.train.unlikelihood import EPS, copy_candidates, copy_terms, segment_starts


def twin_candidates(ids: list[int], starts: list[bool], n: int, window: int = 0) -> list[int]:
    """Per t: scan back from t - 1 inside t's document for the latest s whose n-1 tokens equal those ending at t."""
    k, out, doc = n - 1, [], 0
    for t in range(len(ids)):
        doc = t if starts[t] else doc
        cand = -1
        if t - k + 1 >= doc:
            for s in range(t - 1, doc + k - 2, -1):
                if window and t - s > window:
                    break
                if ids[s - k + 1:s + 1] == ids[t - k + 1:t + 1]:
                    cand = ids[s + 1]
                    break
        out.append(cand)
    return out


def _vectorised(ids, starts, n, window=0, base=None):
    ids_t = torch.tensor(ids)
    return copy_candidates(ids_t, torch.tensor(starts), n, window, base or max(ids) + 1).tolist()


def test_hand_made_sequences():
    """Latest occurrence wins; no repeat, no candidate; a document start (BOS or sequence start) cuts."""
    a, b, c, d, e, f = 1, 2, 3, 4, 5, 6
    ids = [a, b, c, d, a, b, c, e, a, b, c]
    assert _vectorised(ids, [False] * 11, 4) == [-1] * 6 + [d, -1, -1, -1, e]
    assert _vectorised([a, b, c, d, e, f], [False] * 6, 2) == [-1] * 6
    assert _vectorised([a, a, a, a], [False] * 4, 2) == [-1, a, a, a]                  # overlapping occurrences
    # a BOS (0) between the two documents: the second 'a b c' finds nothing in its own document
    ids = [0, a, b, c, d, 0, a, b, c, e]
    starts = segment_starts(torch.tensor(ids), torch.arange(10), bos_id=0).tolist()
    assert _vectorised(ids, starts, 4) == [-1] * 10
    # a start on the gram's middle token: the gram crosses documents, never a candidate
    ids, starts = [a, b, c, a, b, c], [True, False, False, False, True, False]
    assert _vectorised(ids, starts, 3) == [-1] * 6
    assert _vectorised([a, b, a, b, a, b], [False] * 6, 3, window=1) == [-1] * 6
    assert _vectorised([a, b, a, b, a, b], [False] * 6, 3, window=2) == [-1, -1, -1, a, b, a]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("window", [0, 7])
def test_random_sequences_match_the_twin(n, window):
    """Small vocabularies (many repeats, many collisions of real grams) and random document starts."""
    rng = random.Random(n * 10 + window)
    for _ in range(40):
        T, vocab = rng.randrange(1, 120), rng.randrange(2, 6)
        ids = [rng.randrange(vocab) for _ in range(T)]
        starts = [rng.random() < 0.05 for _ in range(T)]
        assert _vectorised(ids, starts, n, window) == twin_candidates(ids, starts, n, window)


def test_hash_collisions_only_drop_candidates():
    """Ids far above `base` make the hash collide often: every candidate found is still the twin's (the tokens
    are compared, not only the hash), and some are dropped (the collisions happened)."""
    rng = random.Random(1)
    dropped = 0
    for _ in range(30):
        ids = [rng.randrange(12) for _ in range(200)]
        starts = [False] * 200
        got, want = _vectorised(ids, starts, 4, base=2), twin_candidates(ids, starts, 4)
        assert all(g in (-1, w) for g, w in zip(got, want, strict=True))
        dropped += sum(g == -1 and w != -1 for g, w in zip(got, want, strict=True))
    assert dropped > 0


def test_packed_batches_cut_at_documents():
    """Per-document sequences (positions restart, no BOS) and a concatenated pack (BOS between documents): the
    starts the trainer derives give the twin's candidates per document."""
    rng = random.Random(2)
    docs = [Document([0] + [rng.randrange(2, 6) for _ in range(n - 1)], [True] * n) for n in (30, 1, 50, 17)]
    for pb in (packed_batch(docs, "cpu"), packed_batch([concat_pack(docs)], "cpu")):
        ids = pb.input_ids[0]
        starts = segment_starts(ids, pb.batch.positions, bos_id=0)
        got = copy_candidates(ids, starts, 4, 0, 6).tolist()
        want = []
        for d in docs:
            want += twin_candidates(d.ids, [True] + [False] * (len(d) - 1), 4)
        assert got == want


def test_term_equals_the_formula():
    """sum over targets t (not IGNORE) with c_t >= 0 and c_t != target of -log(max(1 - p(c_t), eps)); statistics
    [wrong positions, their summed p, positions with a candidate, wrong ones that are the argmax]."""
    torch.manual_seed(0)
    T, V = 64, 11
    logits = torch.randn(T, V) * 4
    logits[3, 5] = 30.0                                         # p ~ 1: the clamp at eps
    logp = torch.log_softmax(logits, -1)
    targets = torch.randint(V, (T,))
    targets[::5] = IGNORE
    cand = torch.randint(-1, V, (T,))
    cand[3], targets[3] = 5, 1
    ul, stats = copy_terms(logp, targets, cand, IGNORE)
    want, wrong, p_sum, has, top1 = 0.0, 0, 0.0, 0, 0
    for t in range(T):
        c, y = int(cand[t]), int(targets[t])
        if c < 0 or y == IGNORE:
            continue
        has += 1
        if c != y:
            p = math.exp(float(logp[t, c]))
            want += -math.log(max(1 - p, EPS))
            wrong, p_sum = wrong + 1, p_sum + p
            top1 += int(logp[t].argmax()) == c
    torch.testing.assert_close(ul, torch.tensor(want))
    torch.testing.assert_close(stats, torch.tensor([wrong, p_sum, has, top1], dtype=torch.float32))
    assert -math.log(EPS) < want and 1 < top1 < wrong            # the clamped position is in


def _repeating_docs(seed=0, n_docs=3):
    """Documents full of a repeated 3-token context followed by varying tokens: many wrong copy candidates."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        ids = [0]
        for _ in range(rng.randrange(8, 14)):
            ids += [7, 8, 9, rng.randrange(10, 40)] + [rng.randrange(10, 500) for _ in range(rng.randrange(0, 3))]
        docs.append(Document(ids, [i % 7 != 0 for i in range(len(ids))]))
    return docs


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=True, progress=False),
                        qat=True)


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_alpha_zero_is_bit_identical_to_the_plain_loss(model, grad_ckpt):
    """Copy statistics on (log_softmax + nll_loss + a detached gather) vs off (`F.cross_entropy`): the same CE
    and the same gradient of every parameter, bit for bit."""
    pb = packed_batch(_repeating_docs(), "cpu")
    out = []
    for ngram in (0, 4):
        model.zero_grad()
        ce, _, _, copy = TrainStep(model, grad_ckpt, copy_ngram=ngram)(pb)
        ce.backward()
        out.append((ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        assert (copy is None) == (ngram == 0)
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys() and len(out[0][1]) > 50
    for n, g in out[0][1].items():
        assert torch.equal(g, out[1][1][n]), n
    assert copy[1] > 10 and copy[0] > 0                        # wrong copies were found and measured


def _wrong_copy_p(model, pb, grad=False):
    with torch.set_grad_enabled(grad):
        ce, _, _, copy = TrainStep(model, False, unlikelihood=1.0, copy_ngram=4)(pb)
    return ce, copy


def test_the_gradient_lowers_p_of_the_wrong_copies(tiny_ckpt):
    """One SGD step on the unlikelihood term alone lowers the term and the mean p(c_t) of the wrong copies."""
    m = prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=False, progress=False))
    pb = packed_batch(_repeating_docs(1), "cpu")
    _, copy = _wrong_copy_p(m, pb, grad=True)
    copy[0].backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad / p.grad.norm().clamp(min=1e-12)
    _, after = _wrong_copy_p(m, pb)
    assert after[1] == copy[1]                                 # the same positions (the inputs did not change)
    assert after[0] < copy[0].detach() and after[2] < copy[2]


def _trainer(ckpt, out, unlikelihood, copy_ngram=4):
    m = prepare_full(dsv4.load_model(ckpt, dtype=torch.float32, quant_emulation=True, progress=False), qat=True)
    packs = [_repeating_docs(seed, 2) for seed in range(4)]
    cfg = TrainConfig(max_steps=10, lr=1e-3, warmup_steps=1, seq_len=512, packs_per_step=2, grad_ckpt=False,
                      mtp_weight=0.3, bias_update_rate=1e-3, unlikelihood=unlikelihood, copy_ngram=copy_ngram)
    return Trainer(m, PackStream(packs, 2, 0), cfg, out, progress=False)


@pytest.fixture(scope="module")
def ul_trainer(tiny_ckpt, tmp_path_factory):
    """The ALPHA 1 trainer after its first step (which also creates the optimizer state): (trainer, the step's
    record, the embedding after it). Shared by the two tests below: each built and stepped its own (CI time)."""
    tr = _trainer(tiny_ckpt, tmp_path_factory.mktemp("ul1"), 1.0)
    rec = tr.train_step()
    return tr, rec, tr.model.embed.weight.detach().clone()


def test_trainer_logs_the_copy_statistics_and_weights_the_term(tiny_ckpt, tmp_path, ul_trainer):
    """The records carry the copy statistics at ALPHA 0 and 1 (the same at the first step: same weights and data);
    only the loss with ALPHA 1 changes the update; copy_ngram 0 logs none."""
    tr = _trainer(tiny_ckpt, tmp_path / "0.0", 0.0)
    recs = [tr.train_step(), ul_trainer[1]]
    weights = [tr.model.embed.weight.detach().clone(), ul_trainer[2]]
    for key in ("copy_ul", "copy_wrong_frac", "copy_frac", "copy_wrong_p", "copy_wrong_top1_frac"):
        assert recs[0][key] == recs[1][key], key
        assert recs[0][key] > 0 or key == "copy_wrong_top1_frac", key        # a random model copies rarely
    assert recs[0]["loss"] == recs[1]["loss"]
    assert recs[0]["copy_wrong_top1_frac"] <= recs[0]["copy_wrong_frac"] <= recs[0]["copy_frac"] <= 1
    assert not torch.equal(weights[0], weights[1])
    assert "copy_ul" not in _trainer(tiny_ckpt, tmp_path / "off", 0.0, copy_ngram=0).train_step()


def test_no_host_read_is_added(ul_trainer):
    """The step with the unlikelihood term reads the device as often as without (test_train_syncs.py): its second
    step, after the one that created the optimizer state."""
    trainer = ul_trainer[0]
    allowed = _allowed(trainer)
    counter = train_step_ops.step_syncs(trainer)
    assert counter.total <= allowed, counter.sites
    assert _sites(counter) <= {"train/loop.py read_step_values", "model/moe.py routed_batched"}, counter.sites
