"""Activation (fake-)quantisation of the reference (spec §2.2, §4.3), always with power-of-two (ue8m0) scales.

All arithmetic is fp32 (float64 for float64 inputs, which are never rounded to fp32 on the way): amax is floored
(1e-4 for FP8, 6 * 2**-126 for FP4) so zero blocks get a finite scale, and dividing by a power of two is exact,
so the one rounding is onto the e4m3 / e2m1 grid.

For training, every fake-quant is straight-through (`straight_through`): the forward value is the rounded one,
bit for bit, and the gradient passes unchanged. NOTE: without it autograd would push the gradient through the
float8 cast itself, rounding the *gradient* to e4m3 (anything below 2**-9 becomes 0).

NOTE: `fake_quant_fp8` follows the *fixed* reference kernel (2026-06-08), which truly rounds to e4m3; the
earlier in-place version only rounded to bf16.
"""

from __future__ import annotations

import torch

from dsv4.quant.e8m0 import pow2_ceil_scale
from dsv4.quant.fp4 import AMAX_FLOOR as FP4_AMAX_FLOOR
from dsv4.quant.fp4 import E2M1_MAX, e2m1_round
from dsv4.quant.fp8 import AMAX_FLOOR as FP8_AMAX_FLOOR
from dsv4.quant.fp8 import E4M3_MAX, to_e4m3, work_dtype


def straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """`rounded` in the forward, identity gradient to x in the backward (x and rounded have one shape).
    The value is `rounded + (x - x)`: exactly `rounded` for finite x (-0.0 becomes +0.0), NaN where x is not
    finite. An autograd function, not `rounded.detach() + (x - x.detach())` under autograd: that recorded 5 ops and
    3 backward nodes per call (~200 calls a training step); this runs 2 ops and a backward that returns the
    gradient as it is. The value is the same expression, bit for bit."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return rounded
    return _StraightThrough.apply(x, rounded.detach())


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
        return rounded.to(x.dtype) + (x - x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


_NATIVE = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _blocks(x: torch.Tensor, block: int, widen: bool = True) -> torch.Tensor:
    """x [..., n] as [..., n/block, block], in its work dtype (`widen=False`: a 16/32/64-bit float x as it is)."""
    assert x.is_floating_point(), f"activation must be a float tensor, got {x.dtype}"
    assert block > 0 and x.shape[-1] % block == 0, f"last dim {x.shape[-1]} is not divisible by block {block}"
    return (x if not widen and x.dtype in _NATIVE else x.to(work_dtype(x))).unflatten(-1, (-1, block))


def act_quant(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (float8_e4m3fn [..., n], fp32 power-of-two scales [..., n/block]); x ~= q * s per block.
    A 16-bit x is not copied to fp32 first: |x| and its block maximum are exact in x's dtype (then widened
    exactly), and x / s promotes x to fp32 exactly as `x.float() / s` does: the same bits, without an fp32 copy
    of x (6 bytes an element written and read again, plus its abs)."""
    xb = _blocks(x, block, widen=False)
    amax = xb.abs().amax(-1).to(work_dtype(x))
    s = pow2_ceil_scale(amax.clamp(min=FP8_AMAX_FLOOR), E4M3_MAX)
    q = to_e4m3((xb / s.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX))
    return q.flatten(-2), s


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """q * s per block (`act_quant`'s output: e4m3 values times power-of-two scales, exact in fp32) in `dtype`.
    In bf16 the product is taken in bf16: q and s are exact in bf16 (same exponent range as fp32) and a bf16
    product is the exact product rounded once to bf16, i.e. the bits of the fp32 product cast to bf16, without the fp32
    copy. Other dtypes: the fp32 (float64 with float64 scales) product, cast."""
    if dtype == torch.bfloat16:
        return (q.to(dtype).unflatten(-1, (-1, block)) * s.to(dtype).unsqueeze(-1)).flatten(-2)
    return (q.float().unflatten(-1, (-1, block)) * s.unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Quantise to e4m3 per block and back, in x's dtype (a new tensor; e4m3 values times 2**k are exact in bf16)."""
    with torch.no_grad():           # the rounding has no gradient: autograd need not record (nor save) it
        q, s = act_quant(x, block)
        rounded = dequantize_blocks(q, s, block, x.dtype)
    return straight_through(x, rounded)


def fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round to e2m1 per block with a power-of-two scale and back, in x's dtype (indexer q and keys)."""
    with torch.no_grad():           # the rounding has no gradient: autograd need not record (nor save) it
        xb = _blocks(x, block)
        s = pow2_ceil_scale(xb.abs().amax(-1).clamp(min=FP4_AMAX_FLOOR), E2M1_MAX).unsqueeze(-1)
        y = e2m1_round(xb / s) * s  # = fp4_decode(e2m1_codes((xb / s).clamp(-6, 6))) * s, bit for bit
        y = torch.where(torch.isnan(xb), xb, y)  # e2m1 has no NaN; let it through rather than invent a value
    return straight_through(x, y.flatten(-2).to(x.dtype))
