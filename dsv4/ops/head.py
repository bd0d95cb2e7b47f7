"""LM-head logits as a dispatched op: fp32 logits of a 16-bit model's final hidden state.

The reference upcasts both operands to fp32 (the head is stored bf16) and runs an fp32 GEMM: the twin does the
same, upcasting the held weight per call. A bf16 model holds the head as stored, in bf16 (`model.Head`), so on
CUDA a bf16-operand GEMM with fp32 accumulation and fp32 output (`torch.mm(..., out_dtype=float32)`) multiplies
exactly the same values, in another summation order, straight from the held weight: no copy, and half the bytes
of an fp32 read (the head is the largest single read of a decode step: 1 GB bf16 for Flash's vocabulary).
"""

from __future__ import annotations

import torch

from dsv4.ops.ref import dense
from dsv4.ops.registry import custom_op, dispatch, register


def _twin(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [..., V] of y [..., D] (the model's compute dtype) and the head weight [V, D] (bf16 or fp32)."""
    return dense(y if y.dtype == torch.float64 else y.float(), weight, y.dtype)


logits = dispatch("logits", _twin)


def _applies(y, weight) -> bool:
    return y.is_cuda and y.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and not torch.is_grad_enabled()


@custom_op("bf16_logits", lambda y, weight: y.new_empty(*y.shape[:-1], weight.shape[0], dtype=torch.float32))
def _bf16_logits(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    flat = y.reshape(-1, y.shape[-1])
    return torch.mm(flat, weight.t(), out_dtype=torch.float32).view(*y.shape[:-1], weight.shape[0])


register("logits", "bf16_operand_logits", _applies, _bf16_logits)
