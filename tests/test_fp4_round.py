"""`e2m1_round` / `fp4_roundtrip` / `fake_quant_fp4` against frozen copies of the code-path definitions, bit for bit.

The e2m1 rounding used to go value -> codes (10 comparison passes) -> values; it is now done on the grid
((|x| + C) - C with C from |x|'s binade). The old functions are copied here as they were, so a later change to
`e2m1_codes` cannot move the reference with it. Coverage: every bf16 and fp16 bit pattern (as bf16 / fp16, fp32
and float64 inputs, times power-of-two and other scales), every fp32 within 2**10 ulps of each tie point and grid
value, +-0, +-inf, NaNs (both signs, payloads), subnormals, values above 6, and random fp32 bit patterns.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.quant import dequant_fp4, fake_quant_fp4, fp4_roundtrip, quant_fp4
from dsv4.quant.e8m0 import pow2, pow2_ceil_scale
from dsv4.quant.fp4 import e2m1_codes, e2m1_round, fp4_decode

_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)
_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def old_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Frozen copy of `dsv4.quant.fp4.e2m1_codes` before `e2m1_round` (the definition)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = x.float()
    a = x.abs()
    magnitude = torch.zeros_like(a, dtype=torch.int32)
    for mid in _MIDPOINTS:
        magnitude += a > mid
    for tie in _TIES_UP:
        magnitude += a == tie
    return (magnitude | (torch.signbit(x).to(magnitude.dtype) << 3)).to(torch.uint8)


def old_fp4_decode(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int32)
    exponent, mantissa = (c >> 1) & 3, (c & 1).float()
    magnitude = torch.where(exponent == 0, mantissa * 0.5, (mantissa + 2) * pow2(exponent - 2))
    return torch.where((c & 8) != 0, -magnitude, magnitude)


def old_fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Frozen copy of `fake_quant_fp4`'s forward value before `e2m1_round`."""
    xb = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32).unflatten(-1, (-1, block))
    s = pow2_ceil_scale(xb.abs().amax(-1).clamp(min=6.0 * 2.0**-126), 6.0).unsqueeze(-1)
    y = old_fp4_decode(old_e2m1_codes((xb / s).clamp(-6.0, 6.0))) * s
    y = torch.where(torch.isnan(xb), xb, y)
    return y.flatten(-2).to(x.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern (so -0.0 != 0.0 and NaNs compare by payload)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    bad = bits(got) != bits(want)
    assert not bool(bad.any()), f"{int(bad.sum())} differ, e.g. {got[bad][:4].tolist()} vs {want[bad][:4].tolist()}"


def every_16bit(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def fp32_sweep() -> torch.Tensor:
    """Every fp32 within 2**10 ulps of each tie point, grid value and 6's neighbours, both signs, plus the
    specials, subnormals, huge values and random bit patterns; and a dense regular sweep of [-8, 8]."""
    centers = torch.tensor([*_MIDPOINTS, *_GRID, 2.0**-126, 7.0, 8.0, 12.0], dtype=torch.float32)
    near = (bits(centers).unsqueeze(-1) + torch.arange(-1024, 1025, dtype=torch.int32)).view(torch.float32).flatten()
    specials = torch.tensor([0.0, float("inf"), float("nan"), 2.0**-149, 2.0**-127, 2.0**-126 - 2.0**-149,
                             3.4028234663852886e38, 1e30, 6.000001, 6.5, 7.0], dtype=torch.float32)
    nan_payloads = torch.tensor([0x7F800001, 0x7FC00001, 0x7FFFFFFF, 0x7FA00000], dtype=torch.int32).view(torch.float32)
    regular = torch.arange(-8 * 2**12, 8 * 2**12 + 1, dtype=torch.float32) / 2**12
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=g, dtype=torch.int64)
    random = random_bits.to(torch.int32).view(torch.float32)
    x = torch.cat([near, specials, nan_payloads, regular, random])
    return torch.cat([x, -x])


def test_sweep_has_the_tie_points_and_their_neighbours():
    x = fp32_sweep()
    for t in _MIDPOINTS:
        for v in (t, -t):
            v = torch.tensor(v)
            for w in (v, torch.nextafter(v, torch.tensor(0.0)), torch.nextafter(v, 9.0 * v.sign())):
                assert bool((bits(x) == bits(w.reshape(1))).any())


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 2.0**-4, 2.0**3, 2.0**-127, 2.0**-140, 2.0**100, 0.75, 3.0, 1 / 3])
def test_e2m1_round_every_16bit_pattern(source, scale):
    x16 = every_16bit(source)
    for x in (x16, x16.float() * scale, x16.double() * scale, x16.float() / scale):
        want = old_fp4_decode(old_e2m1_codes(x))
        assert_same(e2m1_round(x, nan_to_zero=True).float(), want)
        assert_same(fp4_decode(e2m1_codes(x)), want)  # the module's definition is the frozen one
        got = e2m1_round(x)
        nan = torch.isnan(x.float())
        assert_same(got.float()[~nan], want[~nan])
        assert bool(torch.isnan(got[nan]).all())
        assert got.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_e2m1_round_fp32_sweep(dtype):
    x = fp32_sweep().to(dtype)
    if dtype == torch.float64:  # float64 neighbours of the ties too (finer than any fp32)
        t = torch.tensor([*_MIDPOINTS, 6.0], dtype=dtype)
        n = (bits(t).unsqueeze(-1) + torch.arange(-64, 65, dtype=torch.int64)).view(dtype).flatten()
        x = torch.cat([x, n, -n])
    want = old_fp4_decode(old_e2m1_codes(x))
    assert_same(e2m1_round(x, nan_to_zero=True).float(), want)
    got, nan = e2m1_round(x), torch.isnan(x)
    assert_same(got.float()[~nan], want[~nan])
    assert bool(torch.isnan(got[nan]).all())


def test_e2m1_round_ties_to_even_and_signed_zero():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 7.0, float("inf"), 0.1, 0.0])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 0.0, 0.0])
    assert_same(e2m1_round(x), want)
    assert_same(e2m1_round(-x), -want)  # -0.0 for the small negatives


def pinned_blocks(dtype: torch.dtype, k: int) -> torch.Tensor:
    """Every finite bf16 value of magnitude <= 6 (times 2**k) in blocks of 31 plus a pinned 6 * 2**k, so the block
    scale is exactly 2**k and the quotients are those bf16 values."""
    v = every_16bit(torch.bfloat16).double()
    v = v[v.abs() <= 6]
    v = torch.cat([v, v.new_zeros(-v.numel() % 31)]).reshape(-1, 31) * 2.0**k
    return torch.cat([v.new_full((v.shape[0], 1), 6.0 * 2.0**k), v], dim=1).to(dtype)


def fq_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = [pinned_blocks(dtype, k) for k in (0, -3, 5, -120)]
    xs.append(every_16bit(torch.bfloat16)[torch.randperm(2**16, generator=g)].reshape(-1, 32).to(dtype))
    xs.append(every_16bit(torch.bfloat16).reshape(-1, 32).to(dtype))  # sorted: neighbours share a block
    r = torch.randn(64, 8, 128, generator=g, dtype=torch.float64) * torch.logspace(-30, 30, 128, dtype=torch.float64)
    if dtype != torch.float64:
        r = r.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    r[0, 0, :32] = 0.0
    r[0, 1, 5] = float("nan")
    r[0, 2, 7] = float("inf")
    r[0, 3, 9] = -float("inf")
    r[0, 4, :32] = -0.0
    xs.append(r.to(dtype))
    return xs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fake_quant_fp4_equals_the_code_path(dtype):
    for x in fq_inputs(dtype):
        assert_same(fake_quant_fp4(x, 32), old_fake_quant_fp4(x, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fp4_roundtrip_equals_dequant_of_quant(dtype):
    for x in fq_inputs(dtype):
        assert_same(fp4_roundtrip(x), dequant_fp4(*quant_fp4(x, check=False), dtype))
    w = torch.randn(3, 40, 256, generator=torch.Generator().manual_seed(2)).to(dtype)  # batched [E, out, in]
    assert_same(fp4_roundtrip(w), dequant_fp4(*quant_fp4(w, check=False), dtype))
