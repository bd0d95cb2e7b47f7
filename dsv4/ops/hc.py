"""mHC split + Sinkhorn as a dispatched op: the plain definition is `ops.ref.hc_split_sinkhorn`; on CUDA one
Triton kernel does the whole 4x4 Sinkhorn per token in registers (`ops/triton/sinkhorn.py`)."""

from __future__ import annotations

import torch

from dsv4.ops.ref import hc_split_sinkhorn as _twin
from dsv4.ops.registry import custom_op, dispatch, register_triton

hc_split_sinkhorn = dispatch("hc_split_sinkhorn", _twin)


def _applies(mixes, scale, base, hc, iters, eps) -> bool:
    return mixes.is_cuda and mixes.dtype == torch.float32 and hc & (hc - 1) == 0 and not torch.is_grad_enabled()


def _shapes(mixes, scale, base, hc, iters, eps):
    lead = mixes.shape[:-1]
    return mixes.new_empty(*lead, hc), mixes.new_empty(*lead, hc), mixes.new_empty(*lead, hc, hc)


@custom_op("hc_split_sinkhorn", _shapes)
def _kernel(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dsv4.ops.triton.sinkhorn import hc_split_sinkhorn as kernel

    return kernel(mixes, scale, base, hc, iters, eps)


register_triton("hc_split_sinkhorn", "triton_sinkhorn", _applies, _kernel)
