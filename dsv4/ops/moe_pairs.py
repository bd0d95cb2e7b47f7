"""Routed experts as (row, expert) pairs: fixed shapes and no host synchronisation (CUDA-graph capturable).

`pair_linear(x, ids, weight, scale, fmt)` = x[p] @ W[ids[p]]^T for stacked expert weights [E, N, ...] as stored
(FP4 packed + e8m0, or FP8 + 128x128 e8m0). The plain twin gathers and dequantises the named experts; the Triton
kernel (`ops/triton/fp4_gemv.py`) decodes FP4 in-kernel and reads only those experts. Both accumulate in fp32.
"""

from __future__ import annotations

import torch

from dsv4.ops.ref import dequant_weight
from dsv4.ops.registry import custom_op, dispatch, register_triton


def _pair_linear_twin(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      fmt: str) -> torch.Tensor:
    """x [P, K], ids [P] -> fp32 [P, N] (float64 accumulation for fp32 inputs, like `ops.dense`)."""
    acc = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    w = _dequant_gathered(weight[ids], None if scale is None else scale[ids], fmt)
    return torch.einsum("pk,pnk->pn", x.to(acc), w.to(acc)).float()


def _dequant_gathered(w: torch.Tensor, s: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """Gathered weights [P, N, ...] (+ scales [P, ...]) -> fp32 [P, N, K]: one batched dequantisation (elementwise,
    so bit for bit the per-pair `dequant_weight` of each; tests/test_moe_pairs_dequant.py). No host sync, fixed
    shapes (capturable). NOTE: a Python loop over the pairs, as before, traced into ~10k graph nodes under
    torch.compile; the batched form's temporaries are a few [P, N, K] tensors, beside the fp32 result's own."""
    return dequant_weight(w, s, fmt)


pair_linear = dispatch("pair_linear", _pair_linear_twin)


def _fp4_applies(x, ids, weight, scale, fmt) -> bool:
    return fmt == "fp4" and x.is_cuda and x.shape[1] % 128 == 0 and not torch.is_grad_enabled()


def _fp4_kernel(x, ids, weight, scale, fmt):
    return _fp4_pair_gemv(x.contiguous(), ids, weight, scale)


@custom_op("fp4_pair_gemv", lambda x, ids, weight, scale: x.new_empty(x.shape[0], weight.shape[1],
                                                                         dtype=torch.float32))
def _fp4_pair_gemv(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from dsv4.ops.triton.fp4_decode import packed_from_env
    from dsv4.ops.triton.fp4_gemv import fp4_pair_gemv

    return fp4_pair_gemv(x, ids, weight, scale, packed=packed_from_env())


register_triton("pair_linear", "triton_fp4_pair_gemv", _fp4_applies, _fp4_kernel)
