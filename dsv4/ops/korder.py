"""The K order of the FP4 tensor-core kernels: the column order, within each 128-column block, in which they run
their dots (`ops/triton/fp4_grouped_swapped.py`'s docstring says why: a thread's wgmma A registers are then 16
contiguous bytes of one weight row). Column p = 32i + 16a + 8b + 2c + t of a K-ordered block holds element
`K_ORDER[p]` = 32c + 8i + 4t + 2a + b of the block in element order.

The MoE's prefill can carry its activations in this order from end to end (`ops.grouped_linear`'s `x_korder` /
`out_korder`): x is permuted once per token before its per-pair gather, w1 / w3 write their output columns in K
order (they read their weight rows permuted), and SwiGLU and the FP8 act-quant emulation per 128 block cannot tell
(elementwise, and per-block maxima over the same elements), so w2's input arrives K-ordered. The permutations are
plain copies through views: no index tensor, nothing to move to the device inside a CUDA graph capture.
"""

from __future__ import annotations

import torch

# Element of a 128-column block at each K-ordered column p = 32i + 16a + 8b + 2c + t.
K_ORDER = torch.tensor([32 * c + 8 * i + 4 * t + 2 * a + b for i in range(4) for a in range(2) for b in range(2)
                        for c in range(4) for t in range(2)])


def _blocks(x: torch.Tensor, what: str) -> tuple[int, int]:
    if x.dim() != 2 or x.shape[1] % 128:
        raise ValueError(f"{what}: takes [M, K] with K a multiple of 128, got {tuple(x.shape)}")
    return x.shape[0], x.shape[1] // 128


def to_korder(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] with each 128-column block in K order (column p holds element K_ORDER[p]), as `dtype` (default
    x's), in one permuting copy."""
    M, B = _blocks(x, "to_korder")
    out = torch.empty(M, B * 128, dtype=dtype or x.dtype, device=x.device)
    # element 32c + 8i + 4t + 2a + b -> column 32i + 16a + 8b + 2c + t
    out.view(M, B, 4, 2, 2, 4, 2).copy_(x.view(M, B, 4, 4, 2, 2, 2).permute(0, 1, 3, 5, 6, 2, 4))
    return out


def from_korder(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The inverse of `to_korder`: x [M, K] K-ordered per 128-column block, back in element order."""
    M, B = _blocks(x, "from_korder")
    out = torch.empty(M, B * 128, dtype=dtype or x.dtype, device=x.device)
    out.view(M, B, 4, 4, 2, 2, 2).copy_(x.view(M, B, 4, 2, 2, 4, 2).permute(0, 1, 5, 2, 6, 3, 4))
    return out


def check_layout(what: str, M: int, N: int, out_korder: bool, out_dtype: torch.dtype,
                 out_index: torch.Tensor | None) -> None:
    """The output-layout arguments of the grouped GEMMs (`ops.grouped_linear`, `fp4_grouped_gemm_direct`)."""
    if out_korder and N % 128:
        raise ValueError(f"{what}: out_korder needs N a multiple of 128, got {N}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{what}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if out_index is not None and (out_index.shape != (M,) or out_index.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"{what}: out_index must be int32/int64 [{M}] (a permutation of the rows), got "
                         f"{out_index.dtype} {tuple(out_index.shape)}")
