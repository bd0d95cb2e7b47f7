"""LM-head logits as a dispatched op: fp32 logits of a 16-bit model's final hidden state.

The reference upcasts both operands to fp32 (the head is stored bf16 and held in fp32 by `Head`) and runs an fp32
GEMM. Both operands are bf16 numbers, so a bf16-operand GEMM with fp32 accumulation and fp32 output
(`torch.mm(..., out_dtype=float32)`, CUDA) multiplies exactly the same values, in another summation order, while
reading half the bytes: the head is the largest single read of a decode step (1 GB bf16 for Flash's vocabulary).
The bf16 copy is cached on the weight (keyed on its version) and used only while the fp32 weight is exactly
bf16-valued (a weight trained in fp32 in this process is not, and then the twin runs).
"""

from __future__ import annotations

import torch

from dsv4.ops.cached_linear import cached_on
from dsv4.ops.ref import dense
from dsv4.ops.registry import custom_op, dispatch, register


def _twin(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [..., V] of y [..., D] (the model's compute dtype) and the fp32-held head weight [V, D]."""
    return dense(y if y.dtype == torch.float64 else y.float(), weight, y.dtype)


logits = dispatch("logits", _twin)


def exact_bf16_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight as bf16 if that is exact (cached, keyed on the weight's version), else None."""
    def make():
        copy = weight.detach().to(torch.bfloat16)
        return copy if torch.equal(copy.float(), weight.detach().float()) else None
    return cached_on(weight, "_dsv4_head_bf16", (weight._version,), make)


def _applies(y, weight) -> bool:
    return y.is_cuda and y.dtype == torch.bfloat16 and weight.dtype == torch.float32 and not torch.is_grad_enabled()


@custom_op("bf16_logits", lambda y, weight: y.new_empty(*y.shape[:-1], weight.shape[0], dtype=torch.float32))
def _bf16_logits(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    w = exact_bf16_copy(weight)          # checked here, at run time (a custom op is opaque to torch.compile)
    if w is None:
        return _twin(y, weight)
    flat = y.reshape(-1, y.shape[-1])
    return torch.mm(flat, w.t(), out_dtype=torch.float32).view(*y.shape[:-1], w.shape[0])


register("logits", "bf16_operand_logits", _applies, _bf16_logits)
