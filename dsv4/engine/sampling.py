"""Sampling: per-request parameters, their per-row tensors, and one vectorised sampler for a batch of rows.

What is unusual here:
* The noise of the exponential race (the reference's `argmax(probs / E)`, E ~ Exp(1)) is counter-based: E for
  (seed, step, vocab index) comes from a splitmix64 hash computed with int64 tensor ops. A seeded request therefore
  samples the same tokens whatever its batch companions, its row position or the device's generator state.
* `sample()` never reads a tensor back to the CPU. Every per-row choice is a tensor op over the batch; which
  branches run is decided by Python flags computed when the parameters are packed (`SamplingTensors`).
* Logprobs describe the raw model distribution (log_softmax of the logits as the model returns them), before
  penalties, temperature and filtering; this is vLLM's default (`logprobs_mode="raw_logprobs"`).

Order, as in vLLM: penalties → temperature → top-k → top-p (on the top-k-renormalised distribution) → min-p →
race. Greedy rows (temperature < GREEDY_EPS) take the argmax after penalties; filtering never moves the argmax.
"""

from __future__ import annotations

import functools
import math
import numbers
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv4.engine.structured import StructuredOutputsParams

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below this is greedy (dividing by it would overflow fp32)
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------------------------------------------- parameters

class SamplingParamsError(ValueError):
    """A bad `SamplingParams` field; `field` names it (the server reports it as the request's `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _fail(name: str, allowed: str, value) -> None:
    raise SamplingParamsError(name, f"SamplingParams.{name} must be {allowed}, got {value!r}")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _as_f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def _check_real(name: str, value, lo: float, hi: float, allowed: str, lo_open: bool = False) -> None:
    # An open bound is checked on the float32 the sampler packs (SamplingTensors): top_p = 1e-300 is > 0 as a
    # Python float but 0.0 there, where top-p keeps no token and the engine's step fails for the whole batch.
    if not _is_real(value) or value > hi or value < lo or (lo_open and value == lo):
        _fail(name, allowed, value)
    if lo_open and _as_f32(value) <= lo:
        _fail(name, f"{allowed} in float32 (the sampler's precision)", value)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (names and defaults follow vLLM). Checked on construction: a bad field raises
    `SamplingParamsError` (a ValueError) naming it.

    temperature: 0 = greedy (the default, 1.0, samples). max_tokens: tokens to generate at most (default 16).
    seed: None = fresh randomness per request; an int makes the request's tokens reproducible whatever the batch.
    stop: strings that end a completion (not included in its text; `stop_reason` says which); stop_token_ids:
    ids that end it. ignore_eos: keep generating past EOS. logprobs: None, or k in [0, 20]: each generated
    token's logprob plus the k most likely (raw model distribution). n: completions per prompt.
    top_k: -1 (the default) or 0 means off, as in vLLM. Ties with the k-th logit are kept.
    Penalties: `repetition_penalty` (vLLM / CTRL) divides positive and multiplies negative logits of every token seen
    in the prompt or the output; `presence_penalty` and `frequency_penalty` (OpenAI) subtract
    `presence * [count > 0] + frequency * count` with counts over the output tokens only.
    `stop` and `stop_token_ids` are normalised to tuples. `n` copies each get their own seed (`request_seeds`).
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    structured_outputs: StructuredOutputsParams | None = None   # constrained decoding (engine/structured.py)

    def __post_init__(self):
        _check_real("temperature", self.temperature, 0.0, math.inf, "a finite number >= 0 (0 = greedy)")
        # Packed into an int64 tensor: a larger top_k (it means "off" anyway) would fail the engine's whole step.
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT64_MAX:
            _fail("top_k", "-1 or 0 (off) or an integer in [1, 2**63 - 1]", self.top_k)
        _check_real("top_p", self.top_p, 0.0, 1.0, "in (0, 1]", lo_open=True)
        _check_real("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        _check_real("repetition_penalty", self.repetition_penalty, 0.0, math.inf, "a finite number > 0", lo_open=True)
        _check_real("presence_penalty", self.presence_penalty, -2.0, 2.0, "in [-2, 2]")
        _check_real("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "in [-2, 2]")
        if self.seed is not None and not _is_int(self.seed):
            _fail("seed", "None or an integer", self.seed)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _fail("max_tokens", "an integer >= 1", self.max_tokens)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            _fail("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}] (0 = only the sampled token)", self.logprobs)
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", "a bool", self.ignore_eos)
        if not _is_int(self.n) or self.n < 1:
            _fail("n", "an integer >= 1", self.n)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            _fail("structured_outputs", "None or a StructuredOutputsParams", self.structured_outputs)
        if self.structured_outputs is not None and self.ignore_eos:
            _fail("ignore_eos", "False with structured_outputs (EOS is how a constrained output ends)", True)
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_ids(self.stop_token_ids))


def _as_tuple(x, name: str, allowed: str, ok) -> tuple:
    items = () if x is None else (x,) if isinstance(x, str) else x
    items = tuple(items) if isinstance(items, Iterable) else None
    if items is None or not all(ok(i) for i in items):
        _fail(name, allowed, x)
    return items


def _stop_strings(stop) -> tuple[str, ...]:
    return _as_tuple(stop, "stop", "None, a non-empty string or a list of non-empty strings",
                     lambda s: isinstance(s, str) and s != "")


def _stop_ids(ids) -> tuple[int, ...]:
    items = _as_tuple(ids, "stop_token_ids", "None or a list of integers >= 0", lambda i: _is_int(i) and i >= 0)
    return tuple(int(i) for i in items)


def request_seeds(params: SamplingParams) -> list[int]:
    """The seeds of a request's `n` sequences, drawn once at admission and kept for every step.

    Copy 0 uses the request's seed as given (or a fresh random one); copy i uses seed + i. Seeds pass through the
    hash, so neighbouring seeds give unrelated streams.
    """
    base = secrets.randbits(63) if params.seed is None else params.seed
    return [base + i for i in range(params.n)]


# ---------------------------------------------------------------------------------------------------- packing

def _int64(x: int) -> int:
    """Any Python int as the int64 with the same low 64 bits (seeds are taken mod 2^64)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned + non_blocking so that packing never waits for the GPU to finish the previous step.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class SamplingTensors:
    """Per-row sampling parameters of one batch, as tensors on the logits' device, plus Python branch flags.

    Built once per step from the rows' `SamplingParams`; `steps` is each row's output index (0 for the first
    generated token) and `slots` its row in `TokenCounts`.
    """

    temperature: torch.Tensor         # [n] f32, 1.0 on greedy rows
    top_p: torch.Tensor               # [n] f32
    min_p: torch.Tensor               # [n] f32
    repetition_penalty: torch.Tensor  # [n] f32
    presence_penalty: torch.Tensor    # [n] f32
    frequency_penalty: torch.Tensor   # [n] f32
    top_k: torch.Tensor               # [n] int64, 0 = off
    seeds: torch.Tensor               # [n] int64 (the seed's low 64 bits)
    steps: torch.Tensor               # [n] int64
    slots: torch.Tensor               # [n] int64
    greedy: torch.Tensor              # [n] bool
    # Decided on the CPU at packing time, so sample() branches without reading tensors back.
    all_greedy: bool
    any_greedy: bool
    do_top_k: bool
    do_top_p: bool
    do_min_p: bool
    do_penalties: bool
    max_top_k: int
    num_logprobs: int

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int],
                    device: torch.device | str, slots: Sequence[int] | None = None) -> SamplingTensors:
        n = len(params)
        slots = range(n) if slots is None else slots
        if not len(seeds) == len(steps) == len(slots) == n:
            raise ValueError(f"need one seed, step and slot per row: {n} params, {len(seeds)} seeds, "
                             f"{len(steps)} steps, {len(slots)} slots")
        greedy = [p.temperature < GREEDY_EPS for p in params]
        floats = torch.tensor([[1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                               [p.top_p for p in params], [p.min_p for p in params],
                               [p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                               [p.frequency_penalty for p in params]], dtype=torch.float32).reshape(6, n)
        ints = torch.tensor([[max(p.top_k, 0) for p in params], [_int64(s) for s in seeds], list(steps),
                             list(slots), greedy], dtype=torch.int64).reshape(5, n)
        device = torch.device(device)
        floats, ints = _to_device(floats, device), _to_device(ints, device)
        return cls(*floats.unbind(0), *ints[:4].unbind(0), ints[4].bool(), **_flags(params, greedy))


def _flags(params: Sequence[SamplingParams], greedy: list[bool]) -> dict:
    sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
    return dict(
        all_greedy=all(greedy), any_greedy=any(greedy),
        do_top_k=any(p.top_k > 0 for p in sampled), do_top_p=any(p.top_p < 1.0 for p in sampled),
        do_min_p=any(p.min_p > 0.0 for p in sampled),
        do_penalties=any(p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                         for p in params),
        max_top_k=max((p.top_k for p in sampled), default=0),
        num_logprobs=max((p.logprobs or 0 for p in params), default=0),
    )


# ---------------------------------------------------------------------------------------------------- history

class TokenCounts:
    """Token history of each slot for the penalties, on device and updated in place (no host sync).

    `seen` marks prompt and output tokens (repetition penalty); `output` counts output tokens (presence and
    frequency penalties). Token ids must lie in [0, vocab_size).
    NOTE: 5 bytes per slot per vocab entry (0.65 MB per slot at V = 129280); allocate only if penalties are used.
    """

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device | str | None = None):
        self.seen = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)     # [slots, V]
        self.output = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=device)  # [slots, V]

    # NOTE: index_fill_ / index_put_ with device tensors, not `t[idx] = True`: a Python scalar value is copied
    # from the host on every call, which is a synchronising copy on CUDA.
    def reset(self, slots: torch.Tensor) -> None:
        self.seen.index_fill_(0, slots, False)
        self.output.index_fill_(0, slots, 0)

    def add_prompt(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Mark flattened (slot, token) pairs as seen; duplicates are harmless."""
        self.seen.index_put_((slots, token_ids), torch.ones_like(token_ids, dtype=torch.bool))

    def add(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count one output token per pair; a slot may appear several times (accumulated, e.g. MTP drafts)."""
        self.output.index_put_((slots, token_ids), torch.ones_like(token_ids, dtype=torch.int32), accumulate=True)
        self.seen.index_put_((slots, token_ids), torch.ones_like(token_ids, dtype=torch.bool))

    def start(self, slot: int, prompt_ids: Sequence[int]) -> None:
        """Admission of one request: clear its slot and mark its prompt."""
        device = self.seen.device
        self.reset(torch.tensor([slot], device=device))
        ids = torch.as_tensor(prompt_ids, dtype=torch.int64, device=device)
        self.add_prompt(torch.full_like(ids, slot), ids)


# ---------------------------------------------------------------------------------------------------- noise

_GOLDEN = _int64(0x9E3779B97F4A7C15)  # splitmix64's increment
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # NOTE: torch's >> on int64 is arithmetic (copies the sign bit); splitmix64 needs a logical shift.
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors: int64 `*` and `+` wrap like uint64 arithmetic mod 2^64."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def race_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """-log E with E ~ Exp(1) i.i.d. over (seed, step, vocab index): [n] x [n] -> [n, V] f32 (Gumbel noise).

    Row key = the step-th output of the splitmix64 stream seeded by mix64(seed); token v gets the (v+1)-th output
    of the stream seeded by that key.
    """
    key = mix64(mix64(seeds) + steps * _GOLDEN)                                          # [n]
    offsets = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device) * _GOLDEN
    bits = mix64(key[:, None] + offsets)                                                 # [n, V]
    # 52 bits + 1/2 keeps u strictly inside (0, 1) in float64 (53 bits would round the top value up to 1.0).
    u = (_shr(bits, 12).double() + 0.5) * 2.0**-52
    return torch.log(-torch.log(u)).neg_().float()


# ---------------------------------------------------------------------------------------------------- processing

def apply_penalties(logits: torch.Tensor, st: SamplingTensors, counts: TokenCounts) -> torch.Tensor:
    seen, output = counts.seen[st.slots], counts.output[st.slots]                       # [n, V]
    rep = st.repetition_penalty[:, None]
    x = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return x - st.frequency_penalty[:, None] * output - st.presence_penalty[:, None] * (output > 0)


def _top_k_top_p_threshold(x: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Per-row smallest logit kept by top-k then top-p: [n, V] -> [n, 1] (-inf keeps everything)."""
    vocab = x.shape[-1]
    if st.do_top_p:
        ordered = x.sort(dim=-1, descending=True).values                                # [n, V]
    else:  # top-k alone needs only the largest max_top_k values
        ordered = x.topk(min(st.max_top_k, vocab), dim=-1).values                        # [n, k_max]
    k = st.top_k.clamp(max=ordered.shape[-1])[:, None]
    kth = ordered.gather(1, (k - 1).clamp(min=0))
    thresh = torch.where(k > 0, kth, -math.inf)                                          # [n, 1]
    if not st.do_top_p:
        return thresh
    probs = ordered.masked_fill(ordered < thresh, -math.inf).softmax(-1)
    mass_before = F.pad(probs.cumsum(-1)[:, :-1], (1, 0))   # monotone, unlike cumsum - probs; position 0 always kept
    kept = (mass_before < st.top_p[:, None]).sum(-1, keepdim=True)
    pth = torch.where(st.top_p[:, None] < 1.0, ordered.gather(1, kept - 1), -math.inf)  # top_p = 1: no rounding loss
    return torch.maximum(thresh, pth)


def filter_logits(x: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Temperature-scaled logits [n, V] with tokens removed by top-k, top-p and min-p set to -inf."""
    if st.do_top_k or st.do_top_p:
        x = x.masked_fill(x < _top_k_top_p_threshold(x, st), -math.inf)
    if st.do_min_p:  # p >= min_p * p_max  <=>  x >= x_max + log(min_p); min_p = 0 gives -inf (keeps all)
        x = x.masked_fill(x < x.amax(-1, keepdim=True) + st.min_p.log()[:, None], -math.inf)
    return x


# ---------------------------------------------------------------------------------------------------- sampling

@dataclass
class SampleOutput:
    token_ids: torch.Tensor     # [n] int64
    logprobs: torch.Tensor      # [n] f32, raw model logprob of the sampled token
    top_ids: torch.Tensor       # [n, k] int64, k = max requested `logprobs` in the batch (may be 0)
    top_logprobs: torch.Tensor  # [n, k] f32, sorted descending


ARGMAX_CHUNK = 1024               # elements per first-pass block of `argmax_rows` (at most)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` for x [n, V], the same indices (the first maximum of a row; NaN counts as the largest), in
    two passes: the maximum and its index within each of V / chunk contiguous chunks, then the first chunk holding
    the row's maximum. Why: at decode's few rows CUDA's argmax reduces a 129k-logit row in one block (28 us of a
    1.74 ms batch-1 step, bench/results/h100_s32 call C); the chunks run in parallel. `torch.max(dim)` and argmax
    both keep the lowest index among equal values, so the first maximum of the first chunk that has it is the row's
    first maximum."""
    n, v = x.shape
    chunk = _argmax_chunk(v)
    if chunk is None:                            # short rows, or no divisor in range (no padding copy): one pass
        return x.argmax(-1)
    vals, idx = x.reshape(n, v // chunk, chunk).max(-1)
    first = vals.argmax(-1, keepdim=True)
    return (first * chunk + idx.gather(-1, first)).squeeze(-1)


@functools.cache
def _argmax_chunk(v: int) -> int | None:
    """The largest divisor of the vocabulary size v in (ARGMAX_CHUNK / 8, ARGMAX_CHUNK], once per v (a prime v
    would otherwise cost ~900 Python steps every sampling step); None where one pass is better or none divides."""
    if v <= ARGMAX_CHUNK:
        return None
    return next((d for d in range(ARGMAX_CHUNK, ARGMAX_CHUNK // 8, -1) if v % d == 0), None)


def _race(x: torch.Tensor, st: SamplingTensors, noise) -> torch.Tensor:
    # argmax(p / E) = argmax(log p - log E) = argmax(x - log E): the softmax's normaliser is one per row, so the
    # race runs on logits directly (no softmax, no underflow of tiny probabilities).
    x = filter_logits(x / st.temperature[:, None], st)
    return argmax_rows(x + noise(st.seeds, st.steps, x.shape[-1]))


@torch.no_grad()
def sample(logits: torch.Tensor, st: SamplingTensors, counts: TokenCounts | None = None,
           noise=race_noise) -> SampleOutput:
    """One token per row of fp32 `logits` [n, V]; `counts` is required when any row has a penalty."""
    if st.do_penalties and counts is None:
        raise ValueError("a row has a penalty but no TokenCounts was given")
    x = apply_penalties(logits, st, counts) if st.do_penalties else logits
    if st.all_greedy:
        token_ids = argmax_rows(x)
    elif not st.any_greedy:
        token_ids = _race(x, st, noise)
    else:
        token_ids = torch.where(st.greedy, argmax_rows(x), _race(x, st, noise))
    return _with_logprobs(logits, token_ids, st.num_logprobs)


class Sampler:
    """`sample()` for the engine, with one speed switch: `compile=True` fuses the noise hash into one kernel.

    Eager, the hash is ~12 int64 passes over [n, V] (3.1 ms at n = 256, V = 129280 on an H200); compiled 0.3 ms,
    bit-identical to eager there. Off by default so that CPU tests need no compiler.
    """

    def __init__(self, compile: bool = False):
        self.noise = torch.compile(race_noise, dynamic=True) if compile else race_noise

    def __call__(self, logits: torch.Tensor, st: SamplingTensors, counts: TokenCounts | None = None) -> SampleOutput:
        return sample(logits, st, counts, self.noise)


def _with_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> SampleOutput:
    lse = logits.logsumexp(-1, keepdim=True)                                             # [n, 1]
    logprobs = (logits.gather(1, token_ids[:, None]) - lse)[:, 0]
    top_values, top_ids = logits.topk(k, dim=-1)                                         # k = 0 gives [n, 0]
    return SampleOutput(token_ids, logprobs, top_ids, top_values - lse)
