"""Bit-exact tests of dsv4.quant (spec §2.2, §2.3, §5.3): e8m0 scales, FP8 e4m3 and FP4 e2m1 codecs, block weight
quantisation, the FP4 -> FP8 re-encode, activation fake-quant and the Hadamard rotation.

Every expected value is built here, independently of the module: e4m3 / e2m1 grids from their bit formulas,
round-to-nearest-even by searching those grids in float64, power-of-two scales by exact rational arithmetic.
Casts and packing are compared as raw bytes (`.view(torch.uint8)`), so -0.0 and NaN payloads count;
the Hadamard rotation (a sum, not a cast) is compared at fp32 tolerance, as STYLE.md asks.
"""

from __future__ import annotations

import math
from fractions import Fraction

import paths
import pytest
import torch

from dsv4.quant import (
    E2M1_VALUES,
    act_quant,
    dequant_fp4,
    dequant_fp8,
    e8m0_to_float,
    fake_quant_fp4,
    fake_quant_fp8,
    float_to_e8m0,
    fp4_decode,
    fp4_encode,
    fp4_to_fp8,
    hadamard,
    pack_fp4,
    pow2_ceil_scale,
    quant_fp4,
    quant_fp8,
    unpack_fp4,
)

F64 = torch.float64
FP8_FLOOR = torch.tensor(1e-4, dtype=torch.float32).item()  # the reference clamps an fp32 amax at 1e-4
FP4_FLOOR = 6.0 * 2.0**-126


# ---------------------------------------------------------------------------------------------------------------
# Independent reference definitions


def e4m3_value(byte: int) -> float:
    """OCP e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no inf; S.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 7
    if exponent == 15 and mantissa == 7:
        return math.nan
    if exponent == 0:
        return sign * math.ldexp(mantissa, -9)  # subnormals m * 2**-9
    return sign * math.ldexp(8 + mantissa, exponent - 10)  # (1 + m/8) * 2**(e-7)


E2M1_HAND = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # spec §5.3, codes 0..7; 8..15 negate (bit 3 = sign)
E4M3_GRID = torch.tensor([e4m3_value(b) for b in range(127)], dtype=F64)  # bytes 0x00..0x7E, increasing
E2M1_GRID = torch.tensor(E2M1_HAND, dtype=F64)


def round_to_grid(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest grid point to |x| (float64), ties to the even index, saturating at the top.

    On both grids the index *is* the code, and its low bit is the mantissa's low bit, so even index = even code.
    """
    a = x.to(F64).abs().clamp(max=grid[-1].item())
    hi = torch.searchsorted(grid, a).clamp(max=len(grid) - 1)  # first grid point >= a
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    tie = torch.where(lo % 2 == 0, lo, hi)
    return torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, tie))


def ref_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Bytes of nearest-even e4m3fn, saturating at +-448, sign of zero kept, NaN -> 0x7F | sign."""
    idx = torch.where(torch.isnan(x), torch.full_like(x, 0x7F, dtype=torch.int64), round_to_grid(x, E4M3_GRID))
    return (idx | (torch.signbit(x).to(torch.int64) << 7)).to(torch.uint8)


def ref_e2m1(x: torch.Tensor) -> torch.Tensor:
    """e2m1 codes 0..15 of nearest-even rounding, saturating at +-6, sign bit 3 (so -0.0 -> 8)."""
    return (round_to_grid(x, E2M1_GRID) | (torch.signbit(x).to(torch.int64) << 3)).to(torch.uint8)


def e4m3_decode_ref(q: torch.Tensor) -> torch.Tensor:
    table = torch.tensor([e4m3_value(b) for b in range(256)], dtype=F64)
    return table[q.view(torch.uint8).long()]


def e2m1_decode_ref(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_HAND + tuple(-v for v in E2M1_HAND), dtype=F64)  # -0.0 at code 8
    return table[codes.long()]


def ceil_pow2_exp(amax: float, qmax: float) -> int:
    """Smallest integer e with amax <= qmax * 2**e, decided in exact rational arithmetic."""
    a, q = Fraction(amax), Fraction(qmax)
    e = math.frexp(amax / qmax)[1]  # a guess; the loops make it exact
    while a > q * Fraction(2) ** e:
        e += 1
    while a <= q * Fraction(2) ** (e - 1):
        e -= 1
    return e


def nextafter(x: torch.Tensor, direction: float) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, direction))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    g, w = as_bytes(got), as_bytes(want)
    bad = (g != w).nonzero()
    if bad.numel():
        first = tuple(bad[0].tolist())
        raise AssertionError(f"{len(bad)} bytes differ, first at {first}: got {g[first]:#04x}, want {w[first]:#04x}")


def assert_close_fp32(got: torch.Tensor, want: torch.Tensor, rtol: float = 1.3e-6, atol: float = 1e-5) -> None:
    """|got - want| <= atol + rtol * |want|: torch.testing.assert_close's fp32 defaults (STYLE.md, fp32 paths).

    NOTE: a local check because torch's first assert_close call imports torch.distributed, which takes ~2 s.
    """
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, excess {(err - bound).max().item():.3g}"


def anchored_rows(values: list[float], anchor: float, block: int) -> torch.Tensor:
    """fp32 rows of `block` elements, each starting with `anchor` (which fixes the block scale), then values."""
    per = block - 1
    values = values + [0.0] * (-len(values) % per)
    rows = torch.tensor(values, dtype=torch.float32).view(-1, per)
    return torch.cat([torch.full((rows.shape[0], 1), anchor), rows], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# The reference definitions themselves, against hand values and torch's native cast


def test_reference_grids_are_the_spec_tables():
    assert E4M3_GRID[1].item() == 2.0**-9 and E4M3_GRID[7].item() == 7 * 2.0**-9  # smallest / largest subnormal
    assert E4M3_GRID[8].item() == 2.0**-6 and E4M3_GRID[0x38].item() == 1.0 and E4M3_GRID[-1].item() == 448.0
    assert bool((E4M3_GRID.diff() > 0).all())
    assert math.isnan(e4m3_value(0x7F)) and math.isnan(e4m3_value(0xFF)) and e4m3_value(0xFE) == -448.0
    assert math.copysign(1.0, e4m3_value(0x80)) == -1.0
    # torch decodes every non-NaN e4m3 byte to the same value.
    everything = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = ~torch.isnan(e4m3_decode_ref(everything))
    assert_same_bits(everything.double()[finite], e4m3_decode_ref(everything)[finite])
    assert E2M1_VALUES.tolist() == [*E2M1_HAND, *(-v for v in E2M1_HAND)]
    assert_same_bits(E2M1_VALUES.double(), e2m1_decode_ref(torch.arange(16)))  # -0.0 sits at code 8


def test_reference_rounding_matches_torch_native_e4m3_cast():
    # torch's fp32 -> float8_e4m3fn cast rounds to nearest even too, so it agrees with the grid search on every
    # in-range value. Out of range torch is not consistent: the tensor cast of torch 2.13 on CPU saturates (even
    # inf) to +-448, while c10's scalar fp8e4m3fn_from_fp32_value turns |x| >= 480 and inf into NaN (0x7F).
    # The module clamps to +-448 before every cast, so it depends on neither.
    g = torch.Generator().manual_seed(0)
    mids = ((E4M3_GRID[1:] + E4M3_GRID[:-1]) / 2).float()
    x = torch.cat([
        E4M3_GRID.float(), mids, nextafter(mids, 0.0), nextafter(mids, 1e9),
        torch.randn(14000, generator=g) * torch.exp2(torch.randint(-12, 9, (14000,), generator=g).float()),
    ]).clamp(-448, 448)
    x = torch.cat([x, -x])
    assert_same_bits(x.to(torch.float8_e4m3fn).view(torch.uint8), ref_e4m3(x))


# ---------------------------------------------------------------------------------------------------------------
# e8m0


def test_e8m0_decodes_every_byte():
    b = torch.arange(256, dtype=torch.uint8)
    want = torch.tensor([math.ldexp(1.0, e - 127) for e in range(255)] + [math.nan], dtype=F64).float()
    assert_same_bits(e8m0_to_float(b).isnan(), want.isnan())
    assert_same_bits(e8m0_to_float(b)[:255], want[:255])
    assert_same_bits(e8m0_to_float(b.view(torch.float8_e8m0fnu))[:255], want[:255])
    assert e8m0_to_float(b).dtype == torch.float32
    # torch's own decode agrees, including byte 0 = 2**-127 (an fp32 subnormal) and 255 = NaN.
    assert_same_bits(b.view(torch.float8_e8m0fnu).float()[:255], want[:255])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_e8m0_round_trips_all_254_finite_exponents_and_the_edges(dtype):
    values = torch.tensor([math.ldexp(1.0, e) for e in range(-127, 128)], dtype=dtype)  # 255 powers: bytes 0..254
    enc = float_to_e8m0(values)
    assert enc.dtype == torch.float8_e8m0fnu
    assert_same_bits(enc.view(torch.uint8), torch.arange(255, dtype=torch.uint8))
    assert enc.view(torch.uint8)[0].item() == 0 and enc.view(torch.uint8)[-1].item() == 254  # 2**-127, 2**127
    assert_same_bits(e8m0_to_float(enc), values.float())
    assert_same_bits(float_to_e8m0(e8m0_to_float(enc)).view(torch.uint8), enc.view(torch.uint8))
    # Agrees with torch's native cast wherever the value is exactly representable.
    assert_same_bits(values.float().to(torch.float8_e8m0fnu).view(torch.uint8), enc.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_e8m0_encodes_narrow_float_dtypes(dtype):
    lo, hi = {torch.bfloat16: (-127, 127), torch.float16: (-24, 15), torch.float8_e4m3fn: (-9, 8)}[dtype]
    values = torch.tensor([math.ldexp(1.0, e) for e in range(lo, hi + 1)]).to(dtype)
    assert_same_bits(float_to_e8m0(values).view(torch.uint8), torch.arange(lo + 127, hi + 128, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [0.0, -0.0, -1.0, 3.0, 1.5, 2.0**-128, 2.0**-149, math.inf, math.nan])
def test_e8m0_refuses_values_it_cannot_represent(bad):
    # torch's native cast would round 3.0 up to 4.0 and map 0 to byte 0 (2**-127); the module refuses instead.
    with pytest.raises(ValueError):
        float_to_e8m0(torch.tensor([1.0, bad]))


def test_e8m0_refuses_2_pow_128():
    with pytest.raises(ValueError):
        float_to_e8m0(torch.tensor([2.0**128], dtype=F64))  # one past byte 254, and byte 255 is NaN


# ---------------------------------------------------------------------------------------------------------------
# pow2_ceil_scale


@pytest.mark.parametrize("qmax", [448.0, 6.0, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pow2_ceil_scale_is_exact_at_powers_of_two(qmax, dtype):
    ks = list(range(-120, 100))
    at = torch.tensor([qmax * 2.0**k for k in ks], dtype=dtype)  # qmax * 2**k: exact in every dtype here
    assert at.double().tolist() == [qmax * 2.0**k for k in ks]
    pow2 = torch.tensor([2.0**k for k in ks], dtype=torch.float32)
    up = torch.tensor([2.0 ** (k + 1) for k in ks], dtype=torch.float32)
    assert_same_bits(pow2_ceil_scale(at, qmax), pow2)  # exact: amax == qmax * s is allowed
    assert_same_bits(pow2_ceil_scale(nextafter(at, math.inf), qmax), up)  # one ulp above goes up
    assert_same_bits(pow2_ceil_scale(nextafter(at, 0.0), qmax), pow2)  # one ulp below stays


def test_pow2_ceil_scale_matches_exact_rational_definition():
    g = torch.Generator().manual_seed(1)
    amax = torch.rand(1000, generator=g) * torch.exp2(torch.randint(-100, 100, (1000,), generator=g).float())
    amax = amax.clamp(min=1e-30)
    for qmax in (448.0, 6.0, 5.0):
        got = pow2_ceil_scale(amax, qmax)
        want = torch.tensor([math.ldexp(1.0, ceil_pow2_exp(a, qmax)) for a in amax.tolist()]).float()
        assert got.dtype == torch.float32
        assert_same_bits(got, want)


def test_pow2_ceil_scale_subnormal_results():
    # FP4's amax floor 6 * 2**-126 gives 2**-126; smaller amax gives exact fp32 subnormal powers of two.
    amax = torch.tensor([6 * 2.0**-126, 6 * 2.0**-130, 3 * 2.0**-140], dtype=torch.float32)
    assert_same_bits(pow2_ceil_scale(amax, 6.0), torch.tensor([2.0**-126, 2.0**-130, 2.0**-141]))


@pytest.mark.parametrize("qmax", [448.0, 6.0])
def test_pow2_ceil_scale_narrow_path_equals_the_corrected_definition(qmax):
    """fp32 / bf16 amax take the short path (no correction steps): bit-identical to the general one over the whole
    positive finite range, subnormals and one ulp either side of every qmax * 2**k included."""
    from dsv4.quant.e8m0 import _pow2_ceil_scale_corrected, _pow2_ceil_scale_narrow

    g = torch.Generator().manual_seed(2)
    edges = (qmax * torch.exp2(torch.arange(-150, 128, dtype=torch.float64))).float()
    edges = edges[torch.isfinite(edges) & (edges > 0)]
    amax = torch.cat([edges, nextafter(edges, 0.0), nextafter(edges, math.inf),
                      torch.exp(torch.randn(20000, generator=g) * 40).float(),
                      torch.tensor([1e-4, 6 * 2.0**-126, 1e-45, 3e-43, 3.4e38])])
    amax = amax[torch.isfinite(amax) & (amax > 0)]
    for a in (amax, amax.bfloat16()[amax.bfloat16() > 0]):
        a = a[torch.isfinite(a)]
        assert_same_bits(_pow2_ceil_scale_narrow(a, qmax), _pow2_ceil_scale_corrected(a, qmax))


# ---------------------------------------------------------------------------------------------------------------
# FP8 e4m3 rounding through act_quant (block scale pinned to 1 by a 448 anchor in every block)


def test_act_quant_exact_grid_values_are_kept():
    values = E4M3_GRID.tolist() + [-v for v in E4M3_GRID.tolist()]  # includes +0 and -0 (0x80)
    x = anchored_rows(values, 448.0, 128)
    q, s = act_quant(x, 128)
    assert_same_bits(s, torch.ones(x.shape[0], 1))
    assert_same_bits(q.view(torch.uint8), ref_e4m3(x))
    assert q.view(torch.uint8)[1, 1].item() == 0x80  # -0.0 keeps its sign


def test_act_quant_ties_round_half_to_even_on_the_e4m3_grid():
    mids = ((E4M3_GRID[1:] + E4M3_GRID[:-1]) / 2).float()  # exact in fp32 (5 significant bits)
    values = torch.cat([mids, nextafter(mids, 0.0), nextafter(mids, 1e9)])
    x = anchored_rows(torch.cat([values, -values]).tolist(), 448.0, 128)
    q, _ = act_quant(x, 128)
    assert_same_bits(q.view(torch.uint8), ref_e4m3(x))
    # Hand-checked ties: even mantissa wins.
    hand = {1.0625: 0x38, 1.1875: 0x3A, 432.0: 0x7E, 248.0: 0x78, 2.0**-10: 0x00, 3 * 2.0**-10: 0x02,
            -(2.0**-10): 0x80, 17 * 2.0**-10: 0x08, 15 * 2.0**-10: 0x08, -(13 * 2.0**-10): 0x86}
    x = anchored_rows(list(hand), 448.0, 128)
    q, _ = act_quant(x, 128)
    assert q.view(torch.uint8)[0, 1: 1 + len(hand)].tolist() == list(hand.values())


def test_act_quant_subnormals():
    sub = [m * 2.0**-9 for m in range(1, 8)]  # every e4m3 subnormal, exact
    below = [2.0**-10 * 0.999, 2.0**-11, 2.0**-20, 1e-30, 1e-45]  # round to zero
    x = anchored_rows(sub + below + [-v for v in sub + below], 448.0, 128)
    q, _ = act_quant(x, 128)
    got = q.view(torch.uint8)[0, 1:1 + 24].tolist()
    assert got == [1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x80, 0x80,
                   0x80, 0x80, 0x80]


def test_act_quant_block_max_is_exactly_448_times_scale():
    # amax == 448 * 2**k gives s = 2**k and the maximal byte; one ulp more doubles s.
    for k in (-20, -3, 0, 5, 40):
        x = torch.full((1, 64), 2.0**k)
        x[0, 7] = -448.0 * 2.0**k
        q, s = act_quant(x, 64)
        assert s.item() == 2.0**k and q.view(torch.uint8)[0, 7].item() == 0xFE
        x[0, 7] = nextafter(x[0, 7], -math.inf)
        q, s = act_quant(x, 64)
        assert s.item() == 2.0 ** (k + 1) and q.view(torch.uint8)[0, 7].item() == 0xF6  # -224


def test_act_quant_saturates_infinities_never_nan():
    # |x/s| <= 448 always holds by the choice of s, so only +-inf reach the clamp: +-448, not NaN. (The scale of
    # such a block is unspecified, pow2_ceil_scale wants a finite amax; only that it is finite is checked.)
    x = torch.tensor([[math.inf, -math.inf, 1.0, -1.0]])
    q, s = act_quant(x, 4)
    assert torch.isfinite(s).all()
    assert q.view(torch.uint8)[0, :2].tolist() == [0x7E, 0xFE]


def test_act_quant_nan_stays_nan():
    # e4m3fn has NaN (S.1111.111); a NaN activation must not turn into a finite value.
    x = torch.randn(2, 128)
    x[0, 3], x[1, 100] = math.nan, -math.nan
    q, s = act_quant(x, 128)
    b = q.view(torch.uint8)
    assert (b[0, 3].item() & 0x7F) == 0x7F and (b[1, 100].item() & 0x7F) == 0x7F
    assert torch.isfinite(s).all()


# ---------------------------------------------------------------------------------------------------------------
# act_quant: scales, floor, shapes


def act_quant_ref(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    xb = x.to(F64).unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1).clamp(min=FP8_FLOOR)
    s = torch.tensor([math.ldexp(1.0, ceil_pow2_exp(a, 448.0)) for a in amax.flatten().tolist()], dtype=F64)
    s = s.view(amax.shape)
    return ref_e4m3(xb / s.unsqueeze(-1)).flatten(-2), s.float()


def random_blocks(shape: tuple[int, ...], block: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Gaussian values with a different power-of-two magnitude (2**-30 .. 2**30) in every block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=F64).unflatten(-1, (-1, block))
    x = x * torch.exp2(torch.randint(-30, 31, x.shape[:-1], generator=g).double()).unsqueeze(-1)
    return x.flatten(-2).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [128, 64])
def test_act_quant_matches_reference(dtype, block):
    x = random_blocks((3, 5, 256), block, seed=2).clamp(-6e4, 6e4).to(dtype)
    q, s = act_quant(x, block)
    q_ref, s_ref = act_quant_ref(x, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (3, 5, 256 // block)
    assert_same_bits(s, s_ref)
    assert_same_bits(q.view(torch.uint8), q_ref)


def test_act_quant_amax_floor_on_zero_and_tiny_blocks():
    # amax = max(|x|, 1e-4): s = 2**ceil(log2(1e-4 / 448)) = 2**-22 for every block whose |x| <= 1e-4.
    assert ceil_pow2_exp(FP8_FLOOR, 448.0) == -22
    x = torch.zeros(4, 256)
    x[1] = -0.0
    x[2, :128] = 1e-6
    x[3, 128:] = -1e-4
    q, s = act_quant(x, 128)
    assert_same_bits(s, torch.full((4, 2), 2.0**-22))
    b = q.view(torch.uint8)
    assert (b[0] == 0).all() and (b[1] == 0x80).all()  # zeros stay zeros, with their sign
    assert (b[2, :128] == ref_e4m3(torch.tensor([1e-6 * 2**22]))).all()  # 4.19 -> 4.0
    assert (b[3, 128:] == ref_e4m3(torch.tensor([-1e-4 * 2**22]))).all()


def test_act_quant_rejects_bad_blocks():
    with pytest.raises(AssertionError):
        act_quant(torch.zeros(2, 100), 128)
    with pytest.raises(AssertionError):
        act_quant(torch.zeros(2, 128, dtype=torch.int32), 128)


def test_act_quant_float64_rounds_once():
    # 1.0625 + 2**-40 lies just above the 1.0 / 1.125 midpoint; via fp32 it would collapse onto the tie and
    # round down (double rounding). The correct nearest value is 1.125.
    x = torch.zeros(1, 128, dtype=F64)
    x[0, 0], x[0, 1], x[0, 2] = 448.0, 1.0625 + 2.0**-40, -(3 * 2.0**-10 - 2.0**-60)
    q, s = act_quant(x, 128)
    assert s.item() == 1.0
    assert q.view(torch.uint8)[0, :3].tolist() == [0x7E, 0x39, 0x81]
    x = random_blocks((4, 256), 128, seed=3, dtype=F64)
    q, s = act_quant(x, 128)
    q_ref, s_ref = act_quant_ref(x, 128)
    assert_same_bits(s, s_ref)
    assert_same_bits(q.view(torch.uint8), q_ref)


# ---------------------------------------------------------------------------------------------------------------
# fake quant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("block", [64, 128])
def test_fake_quant_fp8_equals_dequant_of_quant(dtype, block):
    x = random_blocks((2, 3, 512), block, seed=4).clamp(-6e4, 6e4).to(dtype)
    if dtype == torch.float16:
        x = x.clamp(-1e3, 1e3)  # keep q * s inside fp16's range
    before = x.clone()
    y = fake_quant_fp8(x, block)
    assert y.dtype == dtype and y.shape == x.shape and y.data_ptr() != x.data_ptr()
    assert_same_bits(x, before)  # not in place
    q_ref, s_ref = act_quant_ref(x, block)
    want = (e4m3_decode_ref(q_ref).unflatten(-1, (-1, block)) * s_ref.double().unsqueeze(-1)).flatten(-2)
    assert_same_bits(y, want.to(dtype))
    q, s = act_quant(x, block)  # and it is literally the dequantised act_quant
    assert_same_bits(y, (q.float().unflatten(-1, (-1, block)) * s.unsqueeze(-1)).flatten(-2).to(dtype))


def fake_quant_fp4_ref(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    xb = x.to(F64).unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1).clamp(min=FP4_FLOOR)
    s = torch.tensor([math.ldexp(1.0, ceil_pow2_exp(a, 6.0)) for a in amax.flatten().tolist()], dtype=F64)
    s = s.view(amax.shape).unsqueeze(-1)
    return (e2m1_decode_ref(ref_e2m1(xb / s)) * s).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fake_quant_fp4_matches_reference(dtype):
    x = random_blocks((3, 4, 128), 32, seed=5).to(dtype)
    x[0, 0, :32] = 0.0  # floor: s = 2**-126, zeros stay zeros
    x[0, 1, :32] = -0.0  # ... and -0.0 stays -0.0
    x[0, 2, :32] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0] + [0.0] * 22)  # s = 1 ties
    before = x.clone()
    y = fake_quant_fp4(x, 32)
    assert y.dtype == dtype and y.shape == x.shape and y.data_ptr() != x.data_ptr()
    assert_same_bits(x, before)
    assert_same_bits(y, fake_quant_fp4_ref(x).to(dtype))
    assert y[0, 2, :10].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0]
    assert torch.signbit(y[0, 1, :32]).all() and torch.signbit(y[0, 2, 8])


def test_fake_quant_fp4_float64_rounds_once():
    x = torch.zeros(1, 32, dtype=F64)
    x[0, 0], x[0, 1] = 6.0, 0.25 + 2.0**-40  # above the 0 / 0.5 midpoint by less than an fp32 ulp
    assert fake_quant_fp4(x, 32)[0, :2].tolist() == [6.0, 0.5]


def test_fake_quant_fp4_lets_nan_through():
    x = torch.randn(2, 64)
    x[1, 5] = math.nan
    y = fake_quant_fp4(x, 32)
    assert torch.isnan(y).nonzero().tolist() == [[1, 5]]
    assert_same_bits(y[0], fake_quant_fp4_ref(x[0:1])[0].float())


# ---------------------------------------------------------------------------------------------------------------
# FP4 codec and packing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_fp4_encode_grid_ties_subnormal_and_saturation(dtype):
    hand = {
        0.0: 0, 0.5: 1, 1.0: 2, 1.5: 3, 2.0: 4, 3.0: 5, 4.0: 6, 6.0: 7,  # the grid (0.5: the one subnormal)
        0.25: 0, 0.75: 2, 1.25: 2, 1.75: 4, 2.5: 4, 3.5: 6, 5.0: 6,  # exact midpoints: even code
        0.125: 0, 0.375: 1, 0.625: 1, 2.25: 4, 2.75: 5, 4.5: 6, 5.5: 7,  # clear of the midpoints
        7.0: 7, 448.0: 7,  # saturation
    }
    if dtype != torch.float8_e4m3fn:
        hand.update({1e4: 7, math.inf: 7})
    x = torch.tensor(list(hand), dtype=torch.float32).to(dtype)
    codes = fp4_encode(x)
    assert codes.dtype == torch.uint8 and codes.tolist() == list(hand.values())
    assert fp4_encode((-x.float()).to(dtype)).tolist() == [c | 8 for c in hand.values()]  # sign bit; -0.0 -> 8
    assert_same_bits(codes, ref_e2m1(x.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fp4_encode_one_ulp_either_side_of_each_midpoint(dtype):
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=dtype)
    below, above = nextafter(mids, 0.0), nextafter(mids, 10.0)
    assert fp4_encode(below).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert fp4_encode(above).tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert fp4_encode(-above).tolist() == [9, 10, 11, 12, 13, 14, 15]


def test_fp4_encode_tiny_and_negative_zero():
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, -0.2499, 2.0**-149, -(2.0**-149)])
    # The sign survives rounding to zero (IEEE-style): -0.0 is code 8, which the official checkpoint stores too.
    assert fp4_encode(x).tolist() == [0, 8, 0, 8, 8, 0, 8]


def test_fp4_encode_random_against_reference():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(15000, generator=g) * 3
    x = torch.cat([x, (x * 4).round() / 4])  # plenty of exact quarter values, i.e. ties
    assert_same_bits(fp4_encode(x), ref_e2m1(x))


def test_fp4_encode_refuses_nan():
    with pytest.raises(ValueError):
        fp4_encode(torch.tensor([1.0, math.nan]))


def test_fp4_decode_every_code():
    got = fp4_decode(torch.arange(16, dtype=torch.uint8))
    assert got.dtype == torch.float32
    assert_same_bits(got, e2m1_decode_ref(torch.arange(16)).float())  # incl. -0.0 for code 8
    assert_same_bits(fp4_encode(got), torch.arange(16, dtype=torch.uint8))


def test_pack_fp4_low_nibble_is_the_even_element():
    codes = torch.tensor([[1, 2, 0xF, 0x0, 0x0, 0xF, 7, 8]], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.dtype == torch.int8 and packed.shape == (1, 4)
    assert packed.view(torch.uint8).tolist() == [[0x21, 0x0F, 0xF0, 0x87]]
    assert packed.tolist() == [[0x21, 0x0F, -16, -121]]  # as int8 on disk
    assert_same_bits(unpack_fp4(packed), codes)


def test_pack_unpack_every_byte():
    b = list(range(256))
    codes = torch.tensor([[v & 0xF, v >> 4] for v in b], dtype=torch.uint8).flatten()
    packed = pack_fp4(codes)
    assert_same_bits(packed.view(torch.uint8), torch.arange(256, dtype=torch.uint8))
    for view in (torch.int8, torch.uint8, torch.float4_e2m1fn_x2):
        assert_same_bits(unpack_fp4(packed.view(view)), codes)


def test_pack_fp4_rejects_bad_codes():
    with pytest.raises(ValueError):
        pack_fp4(torch.tensor([3, 16], dtype=torch.uint8))
    with pytest.raises(AssertionError):
        pack_fp4(torch.tensor([1, 2, 3], dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------------------
# FP4 weights


def test_quant_fp4_hand_computed_bytes():
    block0 = [6.0, -0.5, 1.0, 1.5, -2.0, 3.0, 4.0, -6.0, 0.25, 0.75, -1.25, 1.75, 2.5, -3.5, 5.0, -0.0] + [0.0] * 16
    bytes0 = [0x97, 0x32, 0x5C, 0xF6, 0x20, 0x4A, 0xE4, 0x86] + [0x00] * 8
    tiny = [0.0] * 32
    tiny[2], tiny[3] = 1e-40, -1e-40  # below the floor 6 * 2**-126: s = 2**-126; codes 0 and 8 (-0.0, high nibble)
    w = torch.tensor([block0 + [v / 4 for v in block0], [-0.0] * 32 + tiny])
    packed, scale = quant_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (2, 32)
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (2, 2)
    assert scale.view(torch.uint8).tolist() == [[127, 125], [1, 1]]  # 2**0, 2**-2, 2**-126 (floor)
    assert packed.view(torch.uint8).tolist() == [bytes0 + bytes0, [0x88] * 16 + [0, 0x80] + [0] * 14]
    rounded0 = [6.0, -0.5, 1.0, 1.5, -2.0, 3.0, 4.0, -6.0, 0.0, 1.0, -1.0, 2.0, 2.0, -4.0, 4.0, -0.0] + [0.0] * 16
    want = torch.tensor([rounded0 + [v / 4 for v in rounded0], [-0.0] * 32 + [0.0] * 32])
    want[1, 35] = -0.0
    assert_same_bits(dequant_fp4(packed, scale), want)


def quant_fp4_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wb = w.to(F64).unflatten(-1, (-1, 32))
    amax = wb.abs().amax(-1).clamp(min=FP4_FLOOR)
    e = torch.tensor([ceil_pow2_exp(a, 6.0) for a in amax.flatten().tolist()]).view(amax.shape)
    codes = ref_e2m1(wb / torch.exp2(e.double()).unsqueeze(-1)).flatten(-2)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # spec §5.3: element 2k low nibble, 2k+1 high
    return packed, (e + 127).to(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quant_fp4_matches_reference(dtype):
    w = random_blocks((2, 6, 96), 32, seed=7).to(dtype)
    packed, scale = quant_fp4(w)
    p_ref, s_ref = quant_fp4_ref(w)
    assert packed.shape == (2, 6, 48) and scale.shape == (2, 6, 3)
    assert_same_bits(scale.view(torch.uint8), s_ref)
    assert_same_bits(packed.view(torch.uint8), p_ref)


def test_quant_fp4_float64_rounds_once():
    w = torch.zeros(1, 32, dtype=F64)
    w[0, 0], w[0, 1] = 6.0, 0.25 + 2.0**-40
    packed, _ = quant_fp4(w)
    assert packed.view(torch.uint8)[0, 0].item() == 0x17  # codes 7 and 1 (0.5), not 0


def test_dequant_fp4_matches_float64_formula():
    g = torch.Generator().manual_seed(8)
    packed = torch.randint(0, 256, (3, 5, 32), generator=g, dtype=torch.uint8).view(torch.int8)
    scale = torch.randint(0, 253, (3, 5, 2), generator=g, dtype=torch.uint8)  # 6 * 2**125 is the largest finite
    codes = torch.stack([packed.view(torch.uint8) & 0xF, packed.view(torch.uint8) >> 4], -1).flatten(-2)
    want = e2m1_decode_ref(codes) * torch.exp2(scale.double() - 127).repeat_interleave(32, -1)
    assert_same_bits(dequant_fp4(packed, scale), want.float())
    assert_same_bits(dequant_fp4(packed, scale.view(torch.float8_e8m0fnu), torch.float64), want)
    assert dequant_fp4(packed, scale, torch.bfloat16).dtype == torch.bfloat16


def test_fp4_quant_dequant_idempotence():
    g = torch.Generator().manual_seed(9)
    # Bytes that are already FP4 with tight scales (one +-6 per block) come back unchanged, for every scale byte
    # from the floor (byte 1, 2**-126) to the largest whose values stay finite in fp32 (byte 252).
    packed = torch.randint(0, 256, (252, 64), generator=g, dtype=torch.uint8)
    packed[:, ::16] = (packed[:, ::16] & 0xF0) | torch.where(torch.rand(252, 4, generator=g) < 0.5, 7, 15)
    scale = torch.arange(1, 253, dtype=torch.uint8).unsqueeze(1).expand(252, 4).contiguous()
    p2, s2 = quant_fp4(dequant_fp4(packed.view(torch.int8), scale))
    assert_same_bits(s2.view(torch.uint8), scale)
    assert_same_bits(p2.view(torch.uint8), packed)
    # From arbitrary weights: one round trip lands on a fixed point of dequant . quant.
    w = random_blocks((8, 128), 32, seed=10)
    w1 = dequant_fp4(*quant_fp4(w))
    p2, s2 = quant_fp4(w1)
    w2 = dequant_fp4(p2, s2)
    assert_same_bits(w2, w1)
    assert_same_bits(torch.cat([t.view(torch.uint8) for t in quant_fp4(w2)], -1),
                     torch.cat([p2.view(torch.uint8), s2.view(torch.uint8)], -1))


def test_fp4_requant_may_halve_the_scale():
    # Why bytes are only a fixed point from the second round on: a block max in (3, 3.5) rounds down to 3, so
    # the requantised block takes half the scale and the max becomes code 7 (6 * s/2): same values, new bytes.
    w = torch.zeros(1, 32)
    w[0, 0] = 3.2
    packed, scale = quant_fp4(w)
    assert scale.view(torch.uint8).item() == 127 and packed.view(torch.uint8)[0, 0].item() == 0x05
    p2, s2 = quant_fp4(dequant_fp4(packed, scale))
    assert s2.view(torch.uint8).item() == 126 and p2.view(torch.uint8)[0, 0].item() == 0x07
    assert_same_bits(dequant_fp4(p2, s2), dequant_fp4(packed, scale))


# ---------------------------------------------------------------------------------------------------------------
# FP8 block weights


def quant_fp8_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128 x 128 tile (edge tiles partial), looping over tiles in float64."""
    out_f, in_f = w.shape
    rows, cols = -(-out_f // 128), -(-in_f // 128)
    q = torch.empty(out_f, in_f, dtype=torch.uint8)
    scale = torch.empty(rows, cols, dtype=torch.uint8)
    w = w.to(F64)
    for i in range(rows):
        for j in range(cols):
            tile = (slice(128 * i, 128 * i + 128), slice(128 * j, 128 * j + 128))
            e = ceil_pow2_exp(max(w[tile].abs().max().item(), FP8_FLOOR), 448.0)
            scale[i, j] = e + 127
            q[tile] = ref_e4m3(w[tile] / 2.0**e)
    return q, scale


@pytest.mark.parametrize("shape", [(130, 200), (1, 5), (128, 128), (200, 129), (300, 64)])
def test_quant_fp8_blocks_on_ragged_shapes(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g, dtype=F64)
    # A different magnitude per tile, so a tile that borrowed its neighbour's scale would show.
    tiles = torch.randint(-20, 21, (-(-shape[0] // 128), -(-shape[1] // 128)), generator=g).double()
    w = (w * torch.exp2(tiles).repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]).float()
    q, scale = quant_fp8(w)
    q_ref, s_ref = quant_fp8_ref(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert_same_bits(scale.view(torch.uint8), s_ref)
    assert_same_bits(q.view(torch.uint8), q_ref)
    deq = e4m3_decode_ref(q_ref) * torch.exp2(s_ref.double() - 127).repeat_interleave(128, 0).repeat_interleave(
        128, 1)[: shape[0], : shape[1]]
    assert_same_bits(dequant_fp8(q, scale), deq.float())


def test_quant_fp8_batched_and_narrow_dtypes():
    w = random_blocks((3, 72, 136), 8, seed=11)
    q, scale = quant_fp8(w)
    assert q.shape == w.shape and scale.shape == (3, 1, 2)
    for e in range(3):
        q_ref, s_ref = quant_fp8_ref(w[e])
        assert_same_bits(scale[e].view(torch.uint8), s_ref)
        assert_same_bits(q[e].view(torch.uint8), q_ref)
    wb = w.clamp(-1e30, 1e30).bfloat16()
    assert_same_bits(quant_fp8(wb)[0].view(torch.uint8), quant_fp8(wb.float())[0].view(torch.uint8))


def test_quant_fp8_zero_tile_uses_the_floor_and_keeps_signed_zeros():
    w = torch.zeros(130, 130)
    w[129, 129] = -0.0
    q, scale = quant_fp8(w)
    assert scale.view(torch.uint8).tolist() == [[127 - 22] * 2] * 2
    assert q.view(torch.uint8)[129, 129].item() == 0x80 and q.view(torch.uint8).sum().item() == 0x80


def test_quant_fp8_float64_rounds_once():
    w = torch.zeros(2, 3, dtype=F64)
    w[0, 0], w[0, 1], w[1, 2] = 448.0, 1.0625 + 2.0**-40, 17 * 2.0**-10 + 2.0**-40
    q, scale = quant_fp8(w)
    assert scale.view(torch.uint8).item() == 127
    assert q.view(torch.uint8).tolist() == [[0x7E, 0x39, 0x00], [0x00, 0x00, 0x09]]
    w = random_blocks((129, 200), 100, seed=12, dtype=F64)
    q_ref, s_ref = quant_fp8_ref(w)
    q, scale = quant_fp8(w)
    assert_same_bits(scale.view(torch.uint8), s_ref)
    assert_same_bits(q.view(torch.uint8), q_ref)


def test_dequant_fp8_scale_forms_and_checks():
    g = torch.Generator().manual_seed(13)
    q = torch.randint(0, 256, (130, 200), generator=g, dtype=torch.uint8)
    q[(q & 0x7F) == 0x7F] = 0  # no NaN payloads
    q = q.view(torch.float8_e4m3fn)
    scale = torch.randint(100, 150, (2, 2), generator=g, dtype=torch.uint8)
    s_full = torch.exp2(scale.double() - 127).repeat_interleave(128, 0).repeat_interleave(128, 1)[:130, :200]
    want = e4m3_decode_ref(q) * s_full
    assert_same_bits(dequant_fp8(q, scale), want.float())
    assert_same_bits(dequant_fp8(q, scale.view(torch.float8_e8m0fnu), torch.float64), want)
    assert_same_bits(dequant_fp8(q, torch.exp2(scale.float() - 127)), want.float())  # fp32 grid used as is
    assert_same_bits(dequant_fp8(q, scale, torch.bfloat16), want.bfloat16())
    with pytest.raises(AssertionError):
        dequant_fp8(q, scale[:, :1])


def test_fp8_quant_dequant_idempotence():
    g = torch.Generator().manual_seed(14)
    # e4m3 bytes with one +-448 per (partial, 8 x 24) tile, one tile per scale byte whose 448 * s stays finite and
    # above the floor, batched along a leading dim.
    exps = torch.arange(105, 247, dtype=torch.uint8)  # 2**-22 .. 2**119
    q = torch.randint(0, 256, (len(exps), 8, 24), generator=g, dtype=torch.uint8)
    q[(q & 0x7F) == 0x7F] = 0x80
    q[:, 5, 7] = torch.where(torch.rand(len(exps), generator=g) < 0.5, 0x7E, 0xFE).to(torch.uint8)
    scale = exps.view(-1, 1, 1)
    q2, s2 = quant_fp8(dequant_fp8(q.view(torch.float8_e4m3fn), scale))
    assert_same_bits(s2.view(torch.uint8), scale)
    assert_same_bits(q2.view(torch.uint8), q)
    # From arbitrary weights: values are a fixed point after one round trip, bytes after the second quant.
    w = random_blocks((200, 300), 100, seed=15)
    w1 = dequant_fp8(*quant_fp8(w))
    q2, s2 = quant_fp8(w1)
    w2 = dequant_fp8(q2, s2)
    assert_same_bits(w2, w1)
    q3, s3 = quant_fp8(w2)
    assert_same_bits(q3.view(torch.uint8), q2.view(torch.uint8))
    assert_same_bits(s3.view(torch.uint8), s2.view(torch.uint8))


def test_official_checkpoint_weights_are_fixed_points_of_the_quantisers():
    # The official-format tiny checkpoint was quantised with the same rules: requantising its dequantised FP8 / FP4
    # weights reproduces the same values bit for bit (bytes too, except where a scale halves, see above), and
    # negative values that round to zero are stored as the -0.0 nibble 0x8, as quant_fp4 writes them.
    from safetensors import safe_open

    path = paths.OFFICIAL_TINY / "ckpt" / "model-00001-of-00001.safetensors"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    fp8, fp4 = [], []
    with safe_open(path, "pt") as f:
        for name in f.keys():
            scale_name = name.removesuffix("weight") + "scale"
            if name.endswith(".weight") and scale_name in f.keys():
                meta = f.get_slice(name)
                group = {"F8_E4M3": fp8, "I8": fp4}[meta.get_dtype()]
                if len(group) < 8 and math.prod(meta.get_shape()) <= 2**15:  # a sample of the smaller ones
                    group.append((f.get_tensor(name), f.get_tensor(scale_name)))
    assert len(fp8) == len(fp4) == 8
    for w, s in fp8:
        w1 = dequant_fp8(w, s)
        assert_same_bits(dequant_fp8(*quant_fp8(w1)), w1)
    for w, s in fp4:
        w1 = dequant_fp4(w, s)
        assert_same_bits(dequant_fp4(*quant_fp4(w1)), w1)
        assert bool((unpack_fp4(w) == 8).any())


# ---------------------------------------------------------------------------------------------------------------
# FP4 -> FP8 re-encode


def fp4_tile(e_max: int, spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One 128 x 128 FP4 tile: codes 0..15 repeated, block 0 of each row at e_max, blocks 1..3 at e_max - span."""
    codes = (torch.arange(128) % 16).to(torch.uint8).expand(128, 128)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    e = torch.cat([torch.full((128, 1), e_max), e_max - spans.view(128, 3)], 1)
    return packed.contiguous(), e.to(torch.uint8)


def test_fp4_to_fp8_is_exact_for_every_code_and_span_up_to_2_pow_14():
    spans = torch.arange(128 * 3) % 15  # 0..14, i.e. shifts +6 .. -8
    for e_max in (127 - 30, 127, 127 + 60):
        packed, scale = fp4_tile(e_max, spans)
        q, s = fp4_to_fp8(packed, scale)
        assert q.dtype == torch.float8_e4m3fn and q.shape == (128, 128)
        assert s.dtype == torch.float8_e8m0fnu and s.view(torch.uint8).tolist() == [[e_max - 6]]  # max / 2**6
        assert_same_bits(dequant_fp8(q, s), dequant_fp4(packed, scale))
        codes = (torch.arange(128) % 16).expand(128, 128)
        shift = (scale.long() - (e_max - 6)).repeat_interleave(32, 1)
        assert_same_bits(q.view(torch.uint8), ref_e4m3(e2m1_decode_ref(codes) * torch.exp2(shift.double())))
    assert (q.view(torch.uint8) & 0x7F).max().item() == 0x7C  # 6 * 2**6 = 384 is the largest value, under 448


def test_fp4_to_fp8_underflow_rounds_to_nearest_even():
    spans = 15 + torch.arange(128 * 3) % 6  # shifts -9 .. -14: small codes fall below e4m3's subnormals
    packed, scale = fp4_tile(127, spans)
    q, s = fp4_to_fp8(packed, scale)
    assert s.view(torch.uint8).tolist() == [[121]]
    codes = (torch.arange(128) % 16).expand(128, 128)
    shift = (scale.long() - 121).repeat_interleave(32, 1)
    assert_same_bits(q.view(torch.uint8), ref_e4m3(e2m1_decode_ref(codes) * torch.exp2(shift.double())))
    # Hand values at shift -9: 0.5 * 2**-9 = 2**-10 ties to 0; 1.5 * 2**-9 ties up to 2 * 2**-9 (even).
    row = q.view(torch.uint8)[0, 32:48]  # row 0, block 1: span 15
    assert row[[1, 3, 9, 11]].tolist() == [0x00, 0x02, 0x80, 0x82]


def test_fp4_to_fp8_ragged_and_batched_tiles():
    g = torch.Generator().manual_seed(16)
    packed = torch.randint(0, 256, (2, 130, 80), generator=g, dtype=torch.uint8).view(torch.int8)  # in = 160
    base = torch.tensor([[[60, 200], [130, 10]], [[3, 254], [127, 7]]])  # [expert, tile row, tile col]
    full = base.repeat_interleave(128, 1)[:, :130].repeat_interleave(4, 2)[:, :, :5]
    scale = (full - torch.randint(0, 15, full.shape, generator=g)).clamp(min=0).to(torch.uint8)
    q, s = fp4_to_fp8(packed, scale)
    assert q.shape == (2, 130, 160) and s.shape == (2, 2, 2)
    for x in range(2):
        for i, rows in enumerate((slice(0, 128), slice(128, 130))):
            for j, cols in enumerate((slice(0, 4), slice(4, 5))):
                assert s.view(torch.uint8)[x, i, j].item() == max(scale[x, rows, cols].max().item() - 6, 0)
    assert_same_bits(dequant_fp8(q, s), dequant_fp4(packed, scale))


def test_fp4_to_fp8_tiny_scales_clamp_to_byte_0():
    # All tile scales below 2**-121: the new scale would be below 2**-127, so it stays 2**-127 (byte 0) and
    # values are multiplied by 2**e_old (<= 2**5), which is still exact.
    packed, scale = fp4_tile(5, torch.arange(128 * 3) % 6)
    q, s = fp4_to_fp8(packed, scale)
    assert s.view(torch.uint8).tolist() == [[0]]
    assert_same_bits(dequant_fp8(q, s), dequant_fp4(packed, scale))


# ---------------------------------------------------------------------------------------------------------------
# Hadamard


def sylvester(n: int) -> torch.Tensor:
    """Natural-order Walsh-Hadamard matrix in float64: H[i, j] = (-1) ** popcount(i & j)."""
    i = torch.arange(n)
    both = i.view(-1, 1) & i.view(1, -1)
    parity = sum((both >> bit) & 1 for bit in range(max(n.bit_length() - 1, 1))) % 2
    return (1 - 2 * parity).to(F64)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128])
def test_hadamard_matches_explicit_sylvester(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=g)
    want = (x.double() @ sylvester(n).T) / math.sqrt(n)
    y = hadamard(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert_close_fp32(y, want)  # fp32 sums in a different order: fp32 tolerance
    assert_close_fp32(hadamard(hadamard(x)), x)  # involution
    m = hadamard(torch.eye(n, dtype=F64))  # the rotation matrix itself (computed in fp32)
    assert_close_fp32(m @ m.T, torch.eye(n, dtype=F64), rtol=0, atol=1e-6)  # orthonormal
    assert_close_fp32(m @ m, torch.eye(n, dtype=F64), rtol=0, atol=1e-6)  # symmetric, so H . H = I
    if n in (1, 4, 16, 64):  # n**-0.5 is a power of two: the matrix is exact
        assert_same_bits(m, sylvester(n) / math.sqrt(n))


def test_hadamard_sylvester_order_by_hand():
    e1 = torch.zeros(8)
    e1[1] = 1.0
    assert (hadamard(e1) * math.sqrt(8)).round().tolist() == [1, -1, 1, -1, 1, -1, 1, -1]
    e3 = torch.zeros(4)
    e3[3] = 2.0
    assert hadamard(e3).tolist() == [1.0, -1.0, -1.0, 1.0]


def test_hadamard_keeps_dtype_and_checks_size():
    x = torch.randn(4, 128).bfloat16()
    y = hadamard(x)
    assert y.dtype == torch.bfloat16
    want = (x.double() @ sylvester(128)) / math.sqrt(128)
    assert_close_fp32(y, want, rtol=2**-8, atol=1e-5)  # one bf16 rounding of the output: half an ulp
    with pytest.raises(AssertionError):
        hadamard(torch.randn(2, 96))
