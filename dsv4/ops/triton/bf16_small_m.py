"""The fp32 product of a bf16 activation and a bf16 weight for a few rows (decode), split over K: `widened_dense`'s
small-M path (the router's and the compressors' stored bf16 matrices).

Why: at decode cuBLAS runs these `torch.mm(x, W^T, out_dtype=float32)` calls as a split-K GEMM plus a reduce
kernel, ~6.5 us a call for 2-16 MB (bench/results/h100_s32 call C: 10 + 11 launches, 67 us of a 1.74 ms batch-1
step), and its algorithm, so a row's summation order, follows the row count. Here the FP8 small-M kernel's plan
(`fp8_linear.kernel_plan`: 16-row tiles, the K split from N and K only, so a row's bits do not depend on its batch)
with the weight tile read as it is stored: out^T = W x^T, the [BLOCK_N, 128] bf16 tile wgmma's left operand, the
rows its N. Every product of two bf16 values is exact in fp32 and the MMA sums in fp32: the fp32 GEMM's class, as
cuBLAS's. The K splits' fp32 partials are added in split order, by `_sum_splits` or, in a compiled step, in the
traced graph (`ops.widened_dense`), fused into the consumer (one launch a call).
In Triton's CPU interpreter (whose bf16 dot is wrong in 3.6) the tile is widened to fp32 and the dot is IEEE fp32:
the same exact products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.triton.fp8_linear import BLOCK_M, kernel_plan
from dsv4.ops.triton.splitk import add_splits, split_outputs


@triton.jit
def _bf16_small_m(x_ptr, w_ptr, out_ptr, M, N, K, KB_PER_SPLIT, HW: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)        # N is a multiple of BLOCK_N: no mask
    split = tl.program_id(2)
    offs_k = tl.arange(0, 128)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * K                  # [BN, 1]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)               # transposed output tile
    for i in range(0, KB_PER_SPLIT):
        k0 = (split * KB_PER_SPLIT + i) * 128
        w = tl.load(w_rows + k0 + offs_k[None, :])                                                    # [BN, 128]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + k0 + offs_k[None, :], mask=rows[:, None] < M,
                    other=0.0)                                                                        # [BM, 128]
        if HW:
            acc += tl.dot(w, tl.trans(x))
        else:
            acc += tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
    idx = rows[None, :].to(tl.int64) * N + offs_n[:, None]
    tl.store(out_ptr + split.to(tl.int64) * M * N + idx, acc, mask=rows[None, :] < M)


def check_bf16_small_m(x: torch.Tensor, weight: torch.Tensor, block_n: int = 64) -> None:
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        raise ValueError(f"bf16 small-M product: x and weight must be bf16, weight [N, K]; got x {x.dtype}, "
                         f"weight {weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K or K % 128 or N % block_n:
        raise ValueError(f"bf16 small-M product: x [..., K] and weight [N, K] need K a multiple of 128 and N of "
                         f"{block_n}; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")


def bf16_small_m(x: torch.Tensor, weight: torch.Tensor, partials: bool = False, block_n: int = 64,
                 split_k: int | None = None, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x [..., K] bf16 @ weight [N, K] bf16 ^T -> fp32 [..., N] (every product exact, fp32 sums), for a few rows
    (<= 64: 16-row tiles). `partials`: the K splits' fp32 partials [split, M, N] unsummed (the caller adds them in
    split order: `split_sum.sum_splits`). `split_k`: the plan's K splits (None: from N and K, `kernel_plan`)."""
    check_bf16_small_m(x, weight, block_n)
    N, K = weight.shape
    flat = x.reshape(-1, K).contiguous()
    M = flat.shape[0]
    split, grid = kernel_plan(M, N, K, x.device, block_n, split_k=split_k)
    out, part = split_outputs(split, M, N, torch.float32, x.device, partials)
    if M:
        _bf16_small_m[grid](flat, weight.contiguous(), part, M, N, K, K // 128 // split, HW=x.is_cuda,
                            BLOCK_N=block_n, BLOCK_M=BLOCK_M, num_warps=num_warps, num_stages=num_stages)
        add_splits(part, out)
    return out if partials else out.view(*x.shape[:-1], N)
