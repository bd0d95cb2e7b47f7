"""E8M0 scales: one exponent byte, value 2**(e - 127); byte 255 is NaN and there is no zero or sign.

Every scale in the checkpoint and every activation scale of the reference is a power of two, so all scale
arithmetic here is done on exponents with integer/bit operations rather than float log2/exp2, which can be
off by one ulp (and so by a whole power of two after ceil) near exact powers of two.

NOTE: torch's own `x.to(torch.float8_e8m0fnu)` rounds non-powers of two *up* and maps 0 to byte 0 (2**-127)
without complaint; `float_to_e8m0` refuses anything that is not exactly representable instead.
"""

from __future__ import annotations

import torch


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact fp32 2**e for an integer tensor e (subnormals below 2**-126, 0 below 2**-149, inf above 2**127)."""
    e = e.to(torch.int32)
    normal = (e.clamp(-126, 128) + 127) << 23  # e = 128 gives the bit pattern of +inf
    subnormal = torch.ones_like(e) << (e.clamp(-149, -127) + 149)
    bits = torch.where(e >= -126, normal, torch.where(e >= -149, subnormal, torch.zeros_like(e)))
    return bits.view(torch.float32)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode e8m0 bytes (float8_e8m0fnu or uint8) to fp32, exactly 2**(e - 127); byte 255 -> NaN."""
    assert scale.dtype in (torch.float8_e8m0fnu, torch.uint8), f"e8m0 scale must be e8m0fnu or uint8, got {scale.dtype}"
    # Bit placement, 6 ops: byte b in the fp32 exponent field is 2**(b - 127) for b = 1..254; b = 0 needs the
    # subnormal 2**-127 (bit 22 alone) and b = 255 NaN (exponent all ones plus bit 22), both by setting bit 22.
    # NOTE: the per-call cost is host time: the FP8 prefill linear converts its weight scales at every call, and
    # the earlier pow2 + where form (~20 ops) took ~155 us of host per call on the H100 machine (3.8 ms of the 1k
    # prefill's 29 calls; scripts/bench/fp8_linear_host.py).
    b = scale.view(torch.uint8).to(torch.int32)
    return ((b << 23) | (((b == 0) | (b == 255)).to(torch.int32) << 22)).view(torch.float32)


def float_to_e8m0(x: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Encode exact positive powers of two in [2**-127, 2**127] as float8_e8m0fnu; anything else is a ValueError.
    `check=False` skips that test (it reads the device: a GPU sync) where x is such a power by construction."""
    assert x.is_floating_point(), f"float_to_e8m0 needs a float tensor, got {x.dtype}"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = x.float()  # float8 inputs: widening is exact
    mantissa, exponent = torch.frexp(x)  # x = m * 2**exp with m in [0.5, 1) for finite non-zero x
    e = exponent.to(torch.int32) - 1 + 127
    ok = (mantissa == 0.5) & (e >= 0) & (e <= 254)
    if check and not bool(ok.all()):
        bad = x[~ok].flatten()[:4].tolist()
        raise ValueError(f"float_to_e8m0: values must be powers of two in [2**-127, 2**127], got e.g. {bad}")
    return e.to(torch.uint8).view(torch.float8_e8m0fnu)


def pow2_ceil_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """fp32 2**ceil(log2(amax / qmax)), the smallest power of two s with amax <= qmax * s, computed exactly.

    amax must be positive and finite (callers clamp it from below). The exponent is estimated from a float64
    quotient and then corrected with exact comparisons: amax and qmax * 2**e are both exact in float64.
    """
    assert qmax > 0, f"qmax must be positive, got {qmax}"
    if amax.dtype in (torch.float32, torch.bfloat16, torch.float16) and float(qmax).is_integer() and qmax < 2**24:
        return _pow2_ceil_scale_narrow(amax, qmax)
    return _pow2_ceil_scale_corrected(amax, qmax)


def _pow2_ceil_scale_narrow(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """`pow2_ceil_scale` for an fp32 (or narrower) amax in 11 ops instead of ~35 (it runs for every activation
    quantisation: ~200 times per training step). Exact without the corrections: qmax is an integer below 2**24
    (448 for e4m3, 6 for e2m1), so every q * 2**j is an fp32 number like amax; amax / q is a power of two 2**j
    exactly when amax = q * 2**j, and otherwise differs from every power of two by at least the fp32 spacing
    (relative 2**-24), far more than float64's rounding of the quotient (2**-53): so frexp of the float64
    quotient sees the true side of every power of two, and ceil(log2) is its exponent, minus one where the
    mantissa is exactly 0.5 (an exact power of two).
    2**e is built in float64 (always normal there) and rounded to fp32 once: exact down to 2**-149, 0 below, inf
    above 2**127, as `pow2` does. NOTE: a non-finite amax (outside the contract) still gets a finite scale (frexp
    gives it exponent 0): an inf or NaN block stays inf / NaN after rounding instead of poisoning its scale."""
    mantissa, exponent = torch.frexp(amax.to(torch.float64) / qmax)
    e = torch.where(mantissa == 0.5, exponent - 1, exponent).to(torch.int64)
    return ((e + 1023) << 52).view(torch.float64).float()


def _pow2_ceil_scale_corrected(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The general definition (any float amax, float64 included, whose quotient may round onto a power of two)."""
    a = amax.to(torch.float64)
    _, exponent = torch.frexp(a / qmax)  # a / qmax lies in [2**(exp-1), 2**exp), up to rounding of the quotient
    e = exponent.to(torch.int64)
    e = torch.where(a > qmax * _pow2_f64(e), e + 1, e)
    e = torch.where(a <= qmax * _pow2_f64(e - 1), e - 1, e)
    return pow2(e)


def _pow2_f64(e: torch.Tensor) -> torch.Tensor:
    # NOTE: not torch.ldexp, which builds 2**e in the default (fp32) dtype and so overflows/underflows early.
    return ((e.clamp(-1022, 1023) + 1023) << 52).view(torch.float64)
