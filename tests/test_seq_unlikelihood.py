"""Greedy-repetition probe and sequence-level unlikelihood (dsv4/train/greedy_probe.py): the repeat mask against a
plain Python twin, the probe's statistics against eval_builtin's distinct-4 definition, greedy continuation
against `Transformer.forward`, probe off / probe at ALPHA 0 bit-identical to the plain step, the term against its
formula, one step on the term lowering p of the repeated tokens, and the RNG / module modes restored.

Tolerances: masks and counts are integers (exact); the term is fp32 math on logits of two different forward paths
(the training `hidden` over a flattened batch vs `Transformer.forward`): `assert_close` fp32 defaults.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsv4
from dsv4.train.data import Document, PackStream
from dsv4.train.forward import PackedBatch, TrainStep
from dsv4.train.greedy_probe import (
    EPS,
    distinct_4gram_ratio,
    greedy_continue,
    probe_prefixes,
    probe_stats,
    repeat_mask,
    sequences_batch,
)
from dsv4.train.loop import TrainConfig, Trainer
from dsv4.train.params import prepare_full

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def twin_repeats(ids: list[int], n: int = 4) -> list[bool]:
    """Per t: the n-gram ending at t equals one ending at some earlier s (both whole n-grams)."""
    grams = {t: tuple(ids[t - n + 1:t + 1]) for t in range(n - 1, len(ids))}
    return [t in grams and any(grams[s] == grams[t] for s in range(n - 1, t)) for t in range(len(ids))]


def _loopy(rng: random.Random, S: int, vocab: int) -> list[int]:
    """Random tokens with a loop now and then (greedy decoding's failure)."""
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 8))]
    while len(ids) < S:
        ids += ids[-rng.randrange(1, 6):] if rng.random() < 0.5 else [rng.randrange(vocab)]
    return ids[:S]


@pytest.mark.parametrize("n", [2, 4])
def test_repeat_mask_matches_the_twin(n):
    rng = random.Random(n)
    for _ in range(30):
        P, S, vocab = rng.randrange(1, 5), rng.randrange(1, 40), rng.randrange(2, 9)
        ids = [_loopy(rng, S, vocab) for _ in range(P)]
        got = repeat_mask(torch.tensor(ids), n).tolist()
        assert got == [twin_repeats(row, n) for row in ids]
    assert repeat_mask(torch.tensor([[1, 1, 1, 1, 1]])).tolist() == [[False] * 4 + [True]]      # overlapping


def test_probe_stats_match_eval_builtins_definition():
    """Repeated continuation grams = the twin's count over the continuation positions (grams may reach into the
    prefix); distinct = sum over rows of distinct_4gram_ratio(continuation) * its grams; the eval script uses the
    package's function."""
    import eval_builtin

    assert eval_builtin.distinct_4gram_ratio is distinct_4gram_ratio
    rng = random.Random(5)
    for _ in range(20):
        P, first, L = rng.randrange(1, 5), rng.randrange(1, 10), rng.randrange(4, 30)
        ids = [_loopy(rng, first + L, 5) for _ in range(P)]
        t = torch.tensor(ids)
        rep, distinct = probe_stats(t, repeat_mask(t), first).tolist()
        assert rep == sum(sum(twin_repeats(row)[first:]) for row in ids)
        assert distinct == pytest.approx(sum(distinct_4gram_ratio(row[first:]) * (L - 3) for row in ids), abs=1e-9)
    assert distinct_4gram_ratio([1, 2] * 10) == 2 / 17


def test_probe_prefixes_are_deterministic_spread_and_start_with_bos():
    docs = [Document(list(range(2, 50)), [True] * 48), Document(list(range(100, 140)), [True] * 40)]
    got = probe_prefixes(docs, 4, 8, bos_id=0)
    flat = [t for d in docs for t in d.ids]
    assert got == probe_prefixes(docs, 4, 8, bos_id=0) and len(got) == 4
    assert all(p[0] == 0 and len(p) == 8 for p in got)
    starts = [flat.index(p[1]) for p in got]
    assert starts == [i * (len(flat) - 6) // 4 for i in range(4)] and starts[-1] > 60
    assert [p[1:] for p in got] == [flat[s:s + 7] for s in starts]
    assert probe_prefixes([Document([5, 6], [True, True])], 2, 6, 0) == [[0, 5, 6, 5, 6, 5]] * 2     # cycled


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=True, progress=False),
                        qat=True)


def test_greedy_continue_matches_the_inference_forward(model):
    """Each new token is the argmax of `Transformer.forward` over the sequence so far (fresh, from position 0)."""
    torch.manual_seed(0)
    prefixes = torch.randint(1, 512, (3, 5))
    got = greedy_continue(TrainStep(model, False), prefixes, 6)
    assert torch.equal(got[:, :5], prefixes)
    ids = prefixes
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids, last_only=True)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, ids)


def _seq_ul(model, ids, first, grad_ckpt=False):
    P, S = ids.shape
    pb = PackedBatch(ids.reshape(1, -1), None, sequences_batch(P, S, ids.device), [])
    return TrainStep(model, grad_ckpt)(pb, task="seq_ul", repeats=repeat_mask(ids), first=first)


def _loopy_batch(seed=0, P=3, S=40, vocab=500):
    rng = random.Random(seed)
    return torch.tensor([_loopy(rng, S, vocab) for _ in range(P)])


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_the_term_equals_the_formula(model, grad_ckpt):
    """sum over continuation positions t whose token completes an earlier 4-gram of -log(max(1 - p(x_t | x_<t),
    eps)), p from `Transformer.forward`'s logits at t - 1."""
    ids, first = _loopy_batch(), 10
    with torch.no_grad():
        got = _seq_ul(model, ids, first, grad_ckpt)
        logp = torch.log_softmax(model(ids), -1)
    want, n = 0.0, 0
    for p, row in enumerate(ids.tolist()):
        rep = twin_repeats(row)
        for t in range(first, len(row)):
            if rep[t]:
                want += -math.log(max(1 - math.exp(float(logp[p, t - 1, row[t]])), EPS))
                n += 1
    assert n >= 10                                              # the loops were found
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_one_step_on_the_term_lowers_p_of_the_repeated_tokens(tiny_ckpt):
    m = prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=False, progress=False))
    ids, first = _loopy_batch(1), 8
    rep = repeat_mask(ids)[:, first:]

    def p_repeated():
        with torch.no_grad():
            p = torch.softmax(m(ids), -1)[:, first - 1:-1].gather(-1, ids[:, first:, None])[..., 0]
        return p[rep].mean()

    before = p_repeated()
    ul = _seq_ul(m, ids, first)
    ul.backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad / p.grad.norm().clamp(min=1e-12)
    assert _seq_ul(m, ids, first).detach() < ul.detach()
    assert p_repeated() < before


def _packs(n=4):
    rng = random.Random(3)
    return [[Document([0, *_loopy(rng, 70, 60)], [True] * 71)] for _ in range(n)]


def _trainer(ckpt, out, **probe):
    m = prepare_full(dsv4.load_model(ckpt, dtype=torch.float32, quant_emulation=True, progress=False), qat=True)
    cfg = TrainConfig(max_steps=10, lr=1e-3, warmup_steps=1, seq_len=512, packs_per_step=2, grad_ckpt=False,
                      mtp_weight=0.3, bias_update_rate=1e-3,
                      **{"probe_prefixes": 3, "probe_prefix_len": 6, "probe_tokens": 8, **probe})
    return Trainer(m, PackStream(_packs(), 2, 0), cfg, out, progress=False)


def _run(trainer, steps=2):
    recs = [trainer.train_step() for _ in range(steps)]
    return recs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_probe_at_alpha_zero_and_off_are_bit_identical(tiny_ckpt, tmp_path):
    """The probe (generation, statistics) changes neither the losses, the gradient norms, the expert loads nor the
    weights after two steps. Probe records only on probe steps (every 1: both; every 2: step 0)."""
    base, base_w = _run(_trainer(tiny_ckpt, tmp_path / "off"))
    probed, probed_w = _run(_trainer(tiny_ckpt, tmp_path / "probe", greedy_probe_every=1))
    ul, _ = _run(_trainer(tiny_ckpt, tmp_path / "ul", greedy_probe_every=2, seq_unlikelihood=1.0))
    for a, b in zip(base, probed, strict=True):
        for key in ("loss", "grad_norm", "mtp_loss", "expert_load", "copy_ul"):
            assert a[key] == b[key], key
        assert "greedy_seq_rep4" not in a and 0 <= b["greedy_seq_rep4"] <= 1 and 0 < b["greedy_distinct4"] <= 1
    assert all(torch.equal(base_w[n], probed_w[n]) for n in base_w)
    assert "seq_ul" in ul[0] and "greedy_seq_rep4" not in ul[1]
    assert ul[0]["greedy_distinct4"] == probed[0]["greedy_distinct4"]          # the same first probe


def _looping_continue(step_module, prefixes, n):
    """A stand-in generator whose continuations loop (the random tiny model's rarely do)."""
    P = prefixes.shape[0]
    loop = torch.arange(3).repeat(P, -(-n // 3))[:, :n] + 7 + torch.arange(P)[:, None]
    return torch.cat([prefixes, loop], 1)


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def _step_grads(trainer):
    """The masters' gradients the optimizer sees at the next step (clip_grad 0: unclipped)."""
    seen, step = [], trainer.opt.step
    trainer.opt.step = lambda: (seen.extend(_grad(m).clone() for m in trainer.master.masters), step())[1]
    rec = trainer.train_step()
    return rec, seen


def test_the_term_adds_alpha_times_its_gradient_over_the_continuation_positions(tiny_ckpt, tmp_path, monkeypatch):
    """grads(ALPHA) - grads(off) = ALPHA * d(summed term)/dw / (P * L), the term on the generated sequences; the
    record's seq_ul is the summed term / (P * L)."""
    import dsv4.train.loop as loop

    monkeypatch.setattr(loop, "greedy_continue", _looping_continue)
    alpha, (P, first, L) = 0.5, (3, 6, 8)
    runs = {}
    for name, probe in (("off", {}), ("ul", dict(greedy_probe_every=1, seq_unlikelihood=alpha))):
        trainer = _trainer(tiny_ckpt, tmp_path / name, **probe)
        trainer.cfg.clip_grad = 0.0
        runs[name] = _step_grads(trainer)
    rec = runs["ul"][0]
    m = _trainer(tiny_ckpt, tmp_path / "ref").model
    prefixes = torch.tensor(probe_prefixes(PackStream(_packs(), 2, 0).step(0)[0], P, first, 0))
    ids = _looping_continue(None, prefixes, L)
    term = _seq_ul(m, ids, first)
    term.backward()
    assert rec["seq_ul"] == pytest.approx(float(term.detach()) / (P * L), rel=1e-6) and rec["seq_ul"] > 0
    assert rec["greedy_seq_rep4"] == 2 / 8 and rec["greedy_distinct4"] == pytest.approx(3 / 5)     # abcabcab
    ref = dict(m.named_parameters())
    want = [alpha * _grad(ref[n.removeprefix("model.")]) / (P * L) for n, _ in trainer.params]
    diff = [a - b for a, b in zip(runs["ul"][1], runs["off"][1], strict=True)]
    assert len(want) == len(diff) > 50
    torch.testing.assert_close(torch.cat([d.flatten() for d in diff]), torch.cat([w.flatten() for w in want]),
                               rtol=1e-4, atol=1e-7)


def test_the_probe_restores_rng_and_module_modes(tiny_ckpt, tmp_path, monkeypatch):
    """A probe that draws random numbers and switches modules to eval leaves both as it found them."""
    import dsv4.train.loop as loop

    def noisy(step_module, prefixes, n):
        torch.rand(100)
        step_module.eval()
        return greedy_continue(step_module, prefixes, n)
    monkeypatch.setattr(loop, "greedy_continue", noisy)
    trainer = _trainer(tiny_ckpt, tmp_path, greedy_probe_every=1, seq_unlikelihood=1.0)
    trainer.model.layers[1].eval()                               # a mixed state, to be kept as it is
    modes = [m.training for m in trainer.model.modules()]
    torch.manual_seed(7)
    trainer.train_step()
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))
    assert [m.training for m in trainer.model.modules()] == modes


def test_bad_probe_settings_are_errors(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="greedy_probe_every"):
        _trainer(tiny_ckpt, tmp_path, seq_unlikelihood=1.0)
    with pytest.raises(ValueError, match="new tokens"):
        _trainer(tiny_ckpt, tmp_path, greedy_probe_every=1, probe_tokens=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probe_runs_on_cuda_with_trainable_fp4_experts(tiny_ckpt, tmp_path):
    """Found on the H200: the probe generates under no_grad, where the MoE took an inference path that reads stored
    FP4 codes and scales, but the trainer's experts are bf16 masters (scale None). The probe and the term must take
    the training path there, as on CPU, and give the CPU's continuations (the random tiny model in fp32)."""
    m = prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=True, progress=False),
                     qat=True)
    torch.manual_seed(0)
    prefixes = torch.randint(1, 512, (3, 5))
    cpu = greedy_continue(TrainStep(m, False), prefixes, 6)
    gpu = greedy_continue(TrainStep(m.cuda(), False), prefixes.cuda(), 6).cpu()
    assert torch.equal(gpu[:, :5], prefixes)
    assert (gpu == cpu).float().mean() >= 0.9      # fp32 on both; an argmax tie may differ by device


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_the_probes_forwards_run_the_sequences_as_one_batch(model, monkeypatch):
    """Measured on the H200: the probe's P sequences attended one by one (a flattened `StepBatch`) cost ~P x the
    kernels of a forward (launch-bound, 47 s a probe). Per forward (greedy, and the term's with grad) each layer
    makes one attention call whatever P, and the ATen ops (~ kernel launches) do not grow with P (sequence by
    sequence, P = 5 ran 1.2x P = 1's ops here: ~1k more per extra sequence, tiny config, 20 tokens)."""
    from dsv4 import ops

    calls = []
    for name in ("sparse_attention", "sparse_attention_dense_tail"):
        orig = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, orig=orig, **k: (calls.append(a[0].shape[0]), orig(*a, **k))[1])

    def measured(P, task):
        ids = _loopy_batch(P=P, S=20)
        calls.clear()
        with _OpCount() as ops_count:
            if task == "greedy":
                greedy_continue(TrainStep(model, False), ids, 1)
            else:
                _seq_ul(model, ids, 10).backward()
        return list(calls), ops_count.n

    for task in ("greedy", "seq_ul"):
        (one, ops_one), (many, ops_many) = measured(1, task), measured(5, task)
        assert one == [1] * model.cfg.n_layers and many == [5] * model.cfg.n_layers, (task, one, many)
        assert ops_many < 1.05 * ops_one, (task, ops_one, ops_many)   # a few data-dependent ops (QAT rounding)
    model.zero_grad(set_to_none=True)
