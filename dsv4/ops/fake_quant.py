"""FP8 fake quantisation as a dispatched op: the plain definition is `dsv4.quant.fake_quant_fp8`; on CUDA a
Triton kernel computes the same bits in one launch (`ops/triton/quant.py`)."""

from __future__ import annotations

import torch

from dsv4 import quant
from dsv4.ops.registry import custom_op, dispatch, register_triton

fake_quant_fp8 = dispatch("fake_quant_fp8", quant.fake_quant_fp8)


def _fake_quant_kv_twin(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """FP8 fake-quant (block 64) of the nope dims of window/compressed KV; the RoPE dims stay as they are."""
    return torch.cat([fake_quant_fp8(kv[..., :-rope_dim], 64), kv[..., -rope_dim:]], dim=-1)


fake_quant_kv = dispatch("fake_quant_kv", _fake_quant_kv_twin)


def _triton_applies(x, block) -> bool:
    # no autograd through the kernel: training keeps the straight-through definition
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and not torch.is_grad_enabled()


@custom_op("fake_quant_fp8", lambda x, block: torch.empty_like(x))
def _triton_fake_quant(x: torch.Tensor, block: int) -> torch.Tensor:
    from dsv4.ops.triton.quant import fake_quant_fp8 as kernel

    return kernel(x, block)


register_triton("fake_quant_fp8", "triton_fake_quant_fp8", _triton_applies, _triton_fake_quant)
