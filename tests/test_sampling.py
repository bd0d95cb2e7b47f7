"""The sampler against plain per-row Python references (CPU, no model).

Filters and penalties are compared exactly (same fp32 inputs, random continuous logits so no boundary ties);
the exponential race is checked with a chi-square bound over fixed seeds, so the outcome is deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.engine.sampling import (
    GREEDY_EPS,
    Sampler,
    SamplingParams,
    SamplingTensors,
    TokenCounts,
    apply_penalties,
    filter_logits,
    mix64,
    race_noise,
    request_seeds,
    sample,
)

MASK64 = (1 << 64) - 1


def pack(params, steps=None, seeds=None, slots=None, device="cpu"):
    seeds = [p.seed if p.seed is not None else i for i, p in enumerate(params)] if seeds is None else seeds
    steps = [0] * len(params) if steps is None else steps
    return SamplingTensors.from_params(params, seeds, steps, device, slots)


def draw(logits, params, **kw):
    return sample(logits, pack(params, **kw)).token_ids


# ---------------------------------------------------------------------------------------------------- greedy

def test_greedy_equals_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.1)] * 6   # filters never move the argmax
    assert torch.equal(draw(logits, params), logits.argmax(-1))


def test_below_greedy_eps_is_greedy():
    st = pack([SamplingParams(temperature=GREEDY_EPS / 2), SamplingParams(temperature=GREEDY_EPS)])
    assert st.greedy.tolist() == [True, False] and st.temperature[0] == 1.0


def test_temperature_to_zero_limit():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 100, generator=gen)
    logits[torch.arange(16), logits.argmax(-1)] += 0.1   # a gap of >= 0.1: at T = 1e-3 the runner-up has e^-100
    params = [SamplingParams(temperature=1e-3)] * 16
    for step in range(5):
        assert torch.equal(draw(logits, params, steps=[step] * 16), logits.argmax(-1))


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.0), SamplingParams(seed=3), SamplingParams(temperature=0.0),
              SamplingParams(seed=4)]
    mixed = draw(logits, params)
    assert mixed[0] == logits[0].argmax() and mixed[2] == logits[2].argmax()
    assert mixed[1] == draw(logits[1:2], params[1:2]) and mixed[3] == draw(logits[3:4], params[3:4])


# ---------------------------------------------------------------------------------------------------- filters

def reference_keep(row: list[float], top_k: int, top_p: float, min_p: float) -> list[bool]:
    """Plain Python: top-k (ties kept), then top-p on the renormalised survivors, then min-p on probabilities."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep = set(order) if top_k <= 0 else {i for i in order if row[i] >= row[order[min(top_k, len(row)) - 1]]}
    if top_p < 1.0:
        z = sum(math.exp(row[i]) for i in keep)
        mass, chosen = 0.0, set()
        for i in (i for i in order if i in keep):
            if mass >= top_p:
                break
            chosen.add(i)
            mass += math.exp(row[i]) / z
        keep = chosen
    z = sum(math.exp(row[i]) for i in keep)
    p_max = max(math.exp(row[i]) / z for i in keep)
    return [i in keep and math.exp(row[i]) / z >= min_p * p_max for i in range(len(row))]


FILTER_CASES = [  # (top_k, top_p, min_p) per row of one batch
    [(5, 1.0, 0.0), (-1, 1.0, 0.0), (1, 1.0, 0.0), (200, 1.0, 0.0)],                  # top-k alone (partial sort)
    [(-1, 0.9, 0.0), (-1, 0.3, 0.0), (-1, 1.0, 0.0), (0, 0.05, 0.0)],                  # top-p alone
    [(-1, 1.0, 0.1), (-1, 1.0, 0.5), (-1, 1.0, 0.0), (-1, 1.0, 1.0)],                  # min-p alone
    [(10, 0.8, 0.05), (3, 0.5, 0.0), (-1, 0.7, 0.2), (20, 1.0, 0.3)],                  # all three
]


@pytest.mark.parametrize("case", FILTER_CASES)
def test_filters_match_reference(case):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(len(case), 64, generator=gen) * 2.0
    temps = [0.5, 1.0, 1.5, 0.8]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
              for t, (k, p, m) in zip(temps, case, strict=True)]
    st = pack(params)
    scaled = logits / st.temperature[:, None]
    kept = torch.isfinite(filter_logits(scaled, st))
    for r, (k, p, m) in enumerate(case):
        assert kept[r].tolist() == reference_keep(scaled[r].double().tolist(), k, p, m), f"row {r}"


def test_sampled_tokens_respect_filters():
    logits = torch.randn(1, 200, generator=torch.Generator().manual_seed(4))
    allowed = set(logits[0].topk(3).indices.tolist())
    params = [SamplingParams(top_k=3, temperature=2.0, seed=7)]
    assert {int(draw(logits, params, steps=[s])) for s in range(200)} == allowed


# ---------------------------------------------------------------------------------------------------- penalties

def test_penalties_match_reference():
    vocab, gen = 40, torch.Generator().manual_seed(5)
    logits = torch.randn(3, vocab, generator=gen) * 3.0
    prompts, outputs = [[1, 2, 3, 3], [], [5, 6]], [[3, 7, 7, 7, 9], [0, 0, 1], []]
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=-0.5),
              SamplingParams(repetition_penalty=2.0, presence_penalty=2.0, frequency_penalty=2.0)]
    counts = TokenCounts(5, vocab)
    slots = [4, 0, 2]   # batch rows live in arbitrary slots
    for slot, prompt, out in zip(slots, prompts, outputs, strict=True):
        counts.start(slot, prompt)
        for tok in out:
            counts.add(torch.tensor([slot]), torch.tensor([tok]))
    got = apply_penalties(logits, pack(params, slots=slots), counts)
    for r, p in enumerate(params):
        want = logits[r].tolist()
        for v in range(vocab):
            if v in prompts[r] or v in outputs[r]:
                want[v] = want[v] / p.repetition_penalty if want[v] > 0 else want[v] * p.repetition_penalty
            c = outputs[r].count(v)
            want[v] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
        torch.testing.assert_close(got[r], torch.tensor(want, dtype=torch.float32))


def test_token_counts_accumulate_duplicates_and_reset():
    counts = TokenCounts(2, 10)
    counts.add(torch.tensor([1, 1, 1, 0]), torch.tensor([4, 4, 5, 4]))
    assert counts.output[1, 4] == 2 and counts.output[1, 5] == 1 and counts.output[0, 4] == 1
    counts.start(1, [9])
    assert counts.output[1].sum() == 0 and counts.seen[1].nonzero().flatten().tolist() == [9]
    assert counts.output[0, 4] == 1   # other slots untouched


def test_greedy_rows_still_penalised():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    counts = TokenCounts(1, 3)
    counts.start(0, [0])
    st = pack([SamplingParams(temperature=0.0, repetition_penalty=1.1)])
    assert sample(logits, st, counts).token_ids.tolist() == [1]
    with pytest.raises(ValueError, match="TokenCounts"):
        sample(logits, st)


# ---------------------------------------------------------------------------------------------------- the race

def splitmix64_mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def test_mix64_bit_exact_against_python():
    values = [0, 1, 2, 12345, (1 << 63) - 1, 1 << 63, MASK64, 0x9E3779B97F4A7C15, 0xDEADBEEFCAFEBABE]
    signed = [v - (1 << 64) if v >= 1 << 63 else v for v in values]
    got = [v & MASK64 for v in mix64(torch.tensor(signed, dtype=torch.int64)).tolist()]
    assert got == [splitmix64_mix(v) for v in values]


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("over", ["seeds", "steps"])
def test_race_matches_softmax(over):
    # 8 categories -> 7 degrees of freedom; chi2 > 30 has p ~ 1e-4. Fixed seeds make the outcome deterministic.
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    temperature, n = 0.7, 40_000
    params = [SamplingParams(temperature=temperature)] * n
    seeds = list(range(n)) if over == "seeds" else [123] * n
    steps = [0] * n if over == "seeds" else list(range(n))
    tokens = draw(logits.expand(n, -1), params, seeds=seeds, steps=steps)
    assert chi_square(tokens, torch.softmax(logits / temperature, -1)) < 30.0


def test_race_matches_renormalised_top_k():
    logits, n = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2]), 20_000
    tokens = draw(logits.expand(n, -1), [SamplingParams(top_k=4)] * n, seeds=list(range(n)))
    kept = torch.full_like(logits, -math.inf)
    kept[logits.topk(4).indices] = logits[logits.topk(4).indices]
    probs = torch.softmax(kept, -1)
    assert set(tokens.tolist()) == set(logits.topk(4).indices.tolist())
    assert chi_square(tokens, probs.clamp(min=1e-30)) < 25.0   # 3 dof that matter; chi2 > 25 has p ~ 2e-5


def test_race_noise_is_gumbel():
    g = race_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), 50_000).double()   # [2, V]
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.mean(-1), torch.full((2,), 0.5772, dtype=torch.double), atol=0.02, rtol=0)
    torch.testing.assert_close(g.var(-1), torch.full((2,), math.pi**2 / 6, dtype=torch.double), atol=0.05, rtol=0)


def test_same_seed_same_tokens_whatever_the_batch():
    gen = torch.Generator().manual_seed(6)
    vocab = 1000
    mine = torch.randn(vocab, generator=gen)
    others = torch.randn(5, vocab, generator=gen)
    p = SamplingParams(seed=42, top_p=0.95)
    companions = [SamplingParams(seed=s, temperature=0.5 + s / 10, top_k=50) for s in range(5)]
    alone, first, last = [], [], []
    for step in range(12):
        alone.append(draw(mine[None], [p], steps=[step])[0])
        first.append(draw(torch.cat([mine[None], others]), [p, *companions], steps=[step] * 6)[0])
        last.append(draw(torch.cat([others[:3], mine[None]]), [*companions[:3], p], steps=[step] * 4)[3])
    assert alone == first == last


def test_different_seeds_and_steps_differ():
    logits = torch.zeros(2, 1000)
    a, b = draw(logits, [SamplingParams()] * 2, seeds=[1, 2]).tolist()
    assert a != b
    seq = [int(draw(logits[:1], [SamplingParams()], seeds=[1], steps=[s])) for s in range(20)]
    assert len(set(seq)) > 15


def test_seeds_are_taken_mod_2_64():
    logits = torch.zeros(2, 1000)
    assert torch.equal(*draw(logits, [SamplingParams()] * 2, seeds=[-1, MASK64]))


def test_request_seeds():
    assert request_seeds(SamplingParams(seed=9, n=3)) == [9, 10, 11]
    unseeded = request_seeds(SamplingParams(n=2))
    assert len(unseeded) == 2 and unseeded[0] != request_seeds(SamplingParams())[0]


# ---------------------------------------------------------------------------------------------------- logprobs

def test_logprobs_are_raw_and_top_sorted():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 100, generator=gen)
    params = [SamplingParams(temperature=0.3, top_k=5, repetition_penalty=1.5, logprobs=4),
              SamplingParams(logprobs=0), SamplingParams(temperature=0.0)]
    counts = TokenCounts(3, 100)
    counts.start(0, list(range(50)))
    out = sample(logits, pack(params), counts)
    raw = torch.log_softmax(logits.double(), -1).float()   # fp32 result, assert_close's fp32 defaults
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    assert out.top_ids.shape == (3, 4) and out.top_logprobs.shape == (3, 4)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert torch.equal(out.top_ids, raw.topk(4).indices)
    torch.testing.assert_close(out.top_logprobs, raw.topk(4).values)


def test_sampler_object_equals_sample():
    logits, st = torch.randn(3, 40), pack([SamplingParams(seed=s) for s in range(3)])
    assert torch.equal(Sampler()(logits, st).token_ids, sample(logits, st).token_ids)


def test_no_logprobs_requested_gives_empty_top():
    out = sample(torch.randn(2, 10), pack([SamplingParams()] * 2))
    assert out.top_ids.shape == (2, 0) and out.logprobs.shape == (2,)


# ---------------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan), ("top_k", -2), ("top_k", 1.5),
    ("top_p", 0.0), ("top_p", 1.01), ("min_p", -0.1), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.01), ("max_tokens", 0), ("logprobs", 21),
    ("logprobs", -1), ("seed", 1.5), ("stop", ""), ("stop", ["a", 3]), ("stop_token_ids", [-1]), ("n", 0),
    ("ignore_eos", "yes"), ("temperature", True), ("stop_token_ids", 5), ("stop", 3), ("stop_token_ids", "12"),
])
def test_validation_names_the_parameter(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**{field: value})


def test_valid_edges_and_normalisation():
    p = SamplingParams(temperature=0, top_k=0, top_p=1, min_p=1, presence_penalty=-2, frequency_penalty=2,
                       logprobs=20, stop="###", stop_token_ids=[1, 2], seed=-5)
    assert p.stop == ("###",) and p.stop_token_ids == (1, 2)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b") and SamplingParams().stop == ()


def test_from_params_length_mismatch():
    with pytest.raises(ValueError, match="one seed, step and slot per row"):
        SamplingTensors.from_params([SamplingParams()], [1, 2], [0], "cpu")


# ---------------------------------------------------------------------------------------------------- no host sync

def _raise(*args, **kwargs):
    raise AssertionError("sample() read a tensor back to the host")


def test_sample_never_reads_tensors_back(monkeypatch):
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(top_k=5, top_p=0.9, min_p=0.05, seed=1,
              repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.1)]
    st, counts = pack(params), TokenCounts(2, 64)
    counts.start(1, [1, 2, 3])
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, _raise)
    out = sample(torch.randn(2, 64), st, counts)
    counts.add(torch.arange(2), out.token_ids)


@pytest.mark.gpu
def test_cuda_no_sync_and_same_tokens_as_cpu():
    params = [SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.1),
              SamplingParams(top_k=50, top_p=0.9, min_p=0.01, seed=11, frequency_penalty=0.2),
              SamplingParams(temperature=0.7, seed=12)]
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(9))
    cpu_counts, gpu_counts = TokenCounts(3, 5000), TokenCounts(3, 5000, "cuda")
    for counts in (cpu_counts, gpu_counts):
        counts.start(0, [1, 2])
    want = sample(logits, pack(params), cpu_counts).token_ids
    st, gpu_logits = pack(params, device="cuda"), logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(gpu_logits, st, gpu_counts)
        gpu_counts.add(st.slots, out.token_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out.token_ids.cpu(), want)
    assert torch.equal(race_noise(st.seeds, st.steps, 5000).cpu(), race_noise(st.seeds.cpu(), st.steps.cpu(), 5000))


@pytest.mark.gpu
def test_compiled_noise_equals_eager():
    seeds, steps = torch.arange(8, device="cuda") * 977, torch.arange(8, device="cuda")
    eager = race_noise(seeds, steps, 3000)
    assert torch.equal(Sampler(compile=True).noise(seeds, steps, 3000), eager)


def _argmax_cases(device: str) -> list[torch.Tensor]:
    """Rows that argmax's first-maximum rule decides: ties inside a chunk and across chunks, a constant row, NaNs
    (the largest; the first wins), an all -inf row; V divisible by a chunk (Flash's 129280, the built-in 6144), V
    short, and V prime (no chunk divides it: the one-pass fallback)."""
    gen = torch.Generator().manual_seed(7)
    cases = []
    for v in (129280, 6144, 1000, 100003):
        x = torch.randn(6, v, generator=gen)
        top = x[1].max() + 1
        x[1, 7], x[1, v - 3] = top, top                # across chunks: the first
        x[2, 5], x[2, 6] = top, top                    # inside one chunk: the first
        x[3] = 0.0
        x[4, v // 2], x[4, v - 1] = float("nan"), float("nan")
        x[5] = float("-inf")
        cases.append(x.to(device))
    return cases


def test_argmax_rows_is_argmax():
    from dsv4.engine.sampling import argmax_rows

    for x in _argmax_cases("cpu"):
        assert torch.equal(argmax_rows(x), x.argmax(-1)), x.shape
        assert argmax_rows(x[:1]).shape == (1,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_argmax_rows_is_argmax_on_cuda():
    from dsv4.engine.sampling import argmax_rows

    for x in _argmax_cases("cuda"):
        assert torch.equal(argmax_rows(x), x.argmax(-1)), x.shape
