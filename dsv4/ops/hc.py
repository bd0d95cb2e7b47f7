"""mHC split + Sinkhorn as a dispatched op: the plain definition is `ops.ref.hc_split_sinkhorn`; on CUDA one
Triton kernel does the whole 4x4 Sinkhorn per token in registers (`ops/triton/sinkhorn.py`)."""

from __future__ import annotations

import torch

from dsv4.ops.ref import hc_split_sinkhorn as _twin
from dsv4.ops.registry import dispatch, register

hc_split_sinkhorn = dispatch("hc_split_sinkhorn", _twin)


def _applies(mixes, scale, base, hc, iters, eps) -> bool:
    return mixes.is_cuda and mixes.dtype == torch.float32 and hc & (hc - 1) == 0 and not torch.is_grad_enabled()


def _kernel(mixes, scale, base, hc, iters, eps):
    from dsv4.ops.triton.sinkhorn import hc_split_sinkhorn as kernel

    return kernel(mixes, scale, base, hc, iters, eps)


try:
    import triton  # noqa: F401

    register("hc_split_sinkhorn", "triton_sinkhorn", _applies, _kernel)
except ImportError:            # no Triton: the plain definition runs
    pass
