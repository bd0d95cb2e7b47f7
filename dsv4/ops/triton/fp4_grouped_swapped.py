"""The expert-major FP4 grouped GEMM with swapped operands: out^T = W x^T, the decoded weight as the dot's LEFT
operand. Not dispatched (`ops/grouped_linear.py` does not call it): measured on an H200 (2026-12-05,
bench/results/h200_s15_suite/grouped_swapped.log, eager wrapper calls, K 4096 -> N 2048, 256 experts) it is 16 %
faster than the dispatched kernel at the 1k-prefill shape (1755 vs 2101 us, 32 x 64 tiles) and 56 % slower at 8k;
at decode sizes those eager timings were host-bound (the rerun times graph replays). The weight bytes still reach
registers through shared memory one byte at a time (wgmma's register layout gives a thread bytes 4 apart along K);
the K permutation that makes them one 32-bit load per thread is the step that could change this (bench/NOTES.md,
fifteenth session).

Why: `fp4_grouped_prefill._fp4_grouped_prefill` computes out = x W^T with the tokens as the dot's M and the decoded
weight tile as its right operand. At decode batches (~1.5 rows per expert, 16-row tiles) its M is 16, so the dot
runs on the pre-Hopper MMA (M 16 per warp) and the decoded tile reaches its operand layout through shared memory
or layout shuffles; on an H200 it decodes ~2.9e12 FP4 elements/s at batch 64, where the bytes would allow ~8e12.
Here the tile is out^T [BLOCK_N, BLOCK_M] = w [BLOCK_N, 128] x^T [128, BLOCK_M] (as OpenAI's triton_kernels
place mixed-precision MoE weights on Hopper, and `fp4_prefill_fp8mma.py` here): the weight rows are the MMA's M
(64 per warpgroup: wgmma, whose A operand may come from registers) and the tokens its N (BLOCK_M: 16 or more).
Weight bytes load as [BLOCK_N, 64] (contiguous along K), and the packed decode of such a tile
(`e2m1_pair_f16_mul`, [BLOCK_N, 64, 2]) reshapes to [BLOCK_N, 128] in K order with no permute.

Arithmetic: exactly the packed path's (`fp4_grouped_prefill._packed_block`): fp16 x / s and the power of two s per
row and 128-K block (`fp16_blocks`), the weights as e2m1 * 2^-14 times an fp16 factor 2^(15 + t_g - T) per
32-group, one fp16 dot per 128-K block scaled by s and 2^(T - 1). Every product is exact, so the result equals
the packed path's up to the order of the fp32 sums (tests/test_fp4_grouped_swapped.py). A program whose weight
rows span more than 24 binades of scale within a 128-K block (`_scales_too_wide`) decodes per element instead,
exactly, into x's dtype (`_swapped_default_block`), with an IEEE fp32 dot for fp32 x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.triton.fp4_decode import e2m1_pair_f16_mul
from dsv4.ops.triton.fp4_grouped import _e2m1, _e8m0, check_grouped
from dsv4.ops.triton.fp4_grouped_prefill import _dot, _scales_too_wide, expert_offsets, fp16_blocks


@triton.jit
def _swapped_packed_block(xh_row, xs_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0, HALF: tl.constexpr,
                          N_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr):
    """One 128-K block (packed bytes b0 .. b0 + 63) of out^T, fp32 [BLOCK_N, BLOCK_M]: `_packed_block`'s
    arithmetic with the operands swapped."""
    byte = tl.load(w_ptr + rows[:, None] * HALF + (b0 + tl.arange(0, 64))[None, :], mask=n_ok[:, None], other=0)
    at_s = s_ptr + rows[:, None] * N_SCALES + (b0 // 16 + tl.arange(0, 4))[None, :]
    sb = tl.load(at_s, mask=n_ok[:, None], other=127).to(tl.int32)                       # [BLOCK_N, 4]
    top = tl.max(sb, axis=1)
    factor = ((30 + sb - top[:, None]) << 10).to(tl.int16).to(tl.float16, bitcast=True)  # 2^(15 + t_g - T)
    factor = tl.reshape(tl.broadcast_to(factor[:, :, None], [BLOCK_N, 4, 16]), [BLOCK_N, 64])
    w = tl.reshape(e2m1_pair_f16_mul(byte, factor, ASM), [BLOCK_N, 128])                # column k = 2b + h
    xh = tl.load(xh_row + 2 * b0 + tl.arange(0, 128)[None, :], mask=m_ok[:, None], other=0.0)   # [BLOCK_M, 128]
    xs = tl.load(xs_row + b0 // 64, mask=m_ok, other=0.0)                                        # [BLOCK_M]
    return tl.dot(w, tl.trans(xh)) * (xs[None, :] * (_e8m0(top) * 0.5)[:, None])


@triton.jit
def _swapped_default_block(acc, x_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0, dtype: tl.constexpr, HALF: tl.constexpr,
                           N_SCALES: tl.constexpr, IEEE: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] plus the 32-K group at packed bytes b0 .. b0 + 15 (one scale per weight row), the
    weights decoded exactly per element (e2m1 value times 2^(t - 127)) into x's dtype, as
    `fp4_grouped_prefill._decoded_halves` does. One group per step keeps the tiles small: this loop's registers
    count for the whole kernel (ptxas allocates for the worst path)."""
    byte = tl.load(w_ptr + rows[:, None] * HALF + (b0 + tl.arange(0, 16))[None, :], mask=n_ok[:, None], other=0)
    byte = byte.to(tl.int32) & 0xFF
    sc = _e8m0(tl.load(s_ptr + rows * N_SCALES + b0 // 16, mask=n_ok, other=127))[:, None]      # [BLOCK_N, 1]
    w = tl.join((_e2m1(byte & 0xF) * sc).to(dtype), (_e2m1(byte >> 4) * sc).to(dtype))
    w = tl.reshape(w, [byte.shape[0], 32])                                               # column k = 2b + h
    xk = tl.load(x_row + 2 * b0 + tl.arange(0, 32)[None, :], mask=m_ok[:, None], other=0.0)      # [BLOCK_M, 32]
    return _dot(w, tl.trans(xk), acc, IEEE)


@triton.jit
def _fp4_grouped_swapped(x_ptr, xh_ptr, xs_ptr, offs_ptr, w_ptr, s_ptr, out_ptr, N, K, HALF: tl.constexpr,
                         N_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                         ASM: tl.constexpr):
    e = tl.program_id(1)                        # grid (N blocks, E) as in `_fp4_grouped_prefill`
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = e.to(tl.int64) * N + offs_n                                # [BLOCK_N] rows of the stacked weight
    start, end = tl.load(offs_ptr + e), tl.load(offs_ptr + e + 1)
    wide = _scales_too_wide(s_ptr, rows, n_ok, N_SCALES)
    m0 = start
    while m0 < end:                 # (a while: see fp4_grouped_prefill; no rows, no iteration)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end                                           # rows past `end` are the next expert's
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)          # out^T tile
        if wide:
            x_row = x_ptr + offs_m[:, None].to(tl.int64) * K
            for b0 in range(0, HALF, 16):
                acc = _swapped_default_block(acc, x_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0, x_ptr.dtype.element_ty,
                                             HALF, N_SCALES, IEEE)
        else:
            xh_row = xh_ptr + offs_m[:, None].to(tl.int64) * K
            xs_row = xs_ptr + offs_m.to(tl.int64) * (K // 128)
            for b0 in range(0, HALF, 64):
                acc += _swapped_packed_block(xh_row, xs_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0, HALF, N_SCALES,
                                             BLOCK_N, ASM)
        # Masked rows (x = 0) times inf/NaN weights are NaN, but they are not stored.
        tl.store(out_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None], acc,
                 mask=m_ok[None, :] & n_ok[:, None])
        m0 += BLOCK_M


def fp4_grouped_gemm_swapped(x: torch.Tensor, eid: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                             block_m: int = 16, block_n: int = 64, num_warps: int = 4, num_stages: int = 3,
                             packed: bool | str = True) -> torch.Tensor:
    """`fp4_grouped_prefill.fp4_grouped_gemm_prefill(..., packed=packed)` with swapped operands: x [M, K]
    (bf16/fp16/fp32) sorted by expert, eid [M] non-decreasing (int32/int64), weight int8 [E, N, K/2], scale e8m0
    [E, N, K/32] -> fp32 [M, N]; K / 128 a power of two. block_m: tokens per tile (the MMA's N), block_n: weight
    rows (its M, 64 per warpgroup), both powers of two >= 16. `packed`: True decodes in inline PTX (CUDA only),
    "twin" in plain Triton (the CPU interpreter). Exact for x on the FP8 grid per 128 block (see `fp16_blocks`)."""
    M, K, N, E, half = check_grouped("fp4_grouped_gemm_swapped", x, eid, weight, scale, block_m, 128)
    blocks = K // 128
    if packed not in (True, "twin") or (packed is True and x.device.type != "cuda") or blocks & (blocks - 1):
        raise ValueError(f"fp4_grouped_gemm_swapped: packed must be True (inline PTX: CUDA only) or 'twin', and "
                         f"K / 128 a power of two; got {packed!r} on {x.device.type}, K {K}")
    if any(b < 16 or b & (b - 1) for b in (block_m, block_n)):
        raise ValueError(f"fp4_grouped_gemm_swapped: block_m ({block_m}) and block_n ({block_n}) must be powers of "
                         f"two >= 16")
    if eid.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fp4_grouped_gemm_swapped: eid must be int32/int64, got {eid.dtype}")
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    offs = expert_offsets(eid.contiguous(), E)
    x = x.contiguous()
    xh, xs = fp16_blocks(x)
    _fp4_grouped_swapped[(triton.cdiv(N, block_n), E)](
        x, xh, xs, offs, weight.contiguous(), scale.contiguous().view(torch.uint8), out, N, K, half, K // 32,
        BLOCK_M=block_m, BLOCK_N=block_n, IEEE=x.dtype == torch.float32, ASM=packed is True, num_warps=num_warps,
        num_stages=num_stages)
    return out
