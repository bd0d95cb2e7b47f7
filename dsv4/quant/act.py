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
from dsv4.quant.fp4 import E2M1_MAX, e2m1_codes, fp4_decode
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


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    assert x.is_floating_point(), f"activation must be a float tensor, got {x.dtype}"
    assert block > 0 and x.shape[-1] % block == 0, f"last dim {x.shape[-1]} is not divisible by block {block}"
    return x.to(work_dtype(x)).unflatten(-1, (-1, block))  # [..., n/block, block]


def act_quant(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (float8_e4m3fn [..., n], fp32 power-of-two scales [..., n/block]); x ~= q * s per block."""
    xb = _blocks(x, block)
    s = pow2_ceil_scale(xb.abs().amax(-1).clamp(min=FP8_AMAX_FLOOR), E4M3_MAX)
    q = to_e4m3((xb / s.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX))
    return q.flatten(-2), s


def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Quantise to e4m3 per block and back, in x's dtype (a new tensor; e4m3 values times 2**k are exact in bf16)."""
    with torch.no_grad():           # the rounding has no gradient: autograd need not record (nor save) it
        q, s = act_quant(x, block)
        rounded = (q.float().unflatten(-1, (-1, block)) * s.unsqueeze(-1)).flatten(-2).to(x.dtype)
    return straight_through(x, rounded)


def fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round to e2m1 per block with a power-of-two scale and back, in x's dtype (indexer q and keys)."""
    with torch.no_grad():           # the rounding has no gradient: autograd need not record (nor save) it
        xb = _blocks(x, block)
        s = pow2_ceil_scale(xb.abs().amax(-1).clamp(min=FP4_AMAX_FLOOR), E2M1_MAX).unsqueeze(-1)
        y = fp4_decode(e2m1_codes((xb / s).clamp(-E2M1_MAX, E2M1_MAX))) * s
        y = torch.where(torch.isnan(xb), xb, y)  # e2m1 has no NaN; let it through rather than invent a value
    return straight_through(x, y.flatten(-2).to(x.dtype))
