"""Fast `linear` for FP8 / FP4 weights on CUDA: decode the weight once to bf16, then one bf16 GEMM.

Exact by construction: e4m3 and e2m1 values times power-of-two (e8m0) scales are bf16 numbers, and so are the
act-quant emulation's FP8 activations, so the bf16 GEMM (fp32 accumulation) computes the reference's blockwise
product up to summation order. The price is memory: the bf16 copy is 2x an FP8 weight and 4x an FP4 one
(fine for the truncated benchmark model, not for full Flash on one GPU: in-kernel decoding is the next step,
see bench/NOTES.md). The copy is cached on the weight tensor and keyed on its version, so writes show.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.ops.fake_quant import fake_quant_fp8
from dsv4.ops.ref import dequant_weight
from dsv4.ops.registry import custom_op, register


def cached_on(weight: torch.Tensor, attr: str, key: tuple, make):
    """`make()`, kept on the weight as `attr` and rebuilt when `key` (the tensors' versions) changes."""
    cached = getattr(weight, attr, None)
    if cached is None or cached[0] != key:
        cached = (key, make())
        setattr(weight, attr, cached)
    return cached[1]


def bf16_weight(weight: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    return cached_on(weight, "_dsv4_bf16", (weight._version, scale._version),
                     lambda: dequant_weight(weight, scale, fmt).to(torch.bfloat16))


def cached_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, fmt: str, act_quant_on: bool,
                  dequantized: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `ops.ref.linear`; x bf16."""
    return _cached_linear(x, weight, scale, fmt, act_quant_on)


@custom_op("cached_linear", lambda x, weight, scale, fmt, act_quant_on: x.new_empty(*x.shape[:-1], weight.shape[0]))
def _cached_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, fmt: str,
                   act_quant_on: bool) -> torch.Tensor:
    if act_quant_on:
        x = fake_quant_fp8(x, 128)
    return F.linear(x, bf16_weight(weight, scale, fmt))


def _applies(x, weight, scale, fmt, act_quant_on, dequantized=None) -> bool:
    return (fmt in ("fp8", "fp4") and x.is_cuda and x.dtype == torch.bfloat16 and dequantized is None
            and not torch.is_grad_enabled())


register("linear", "cached_bf16_linear", _applies, cached_linear)
