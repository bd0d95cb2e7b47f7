"""Expert-major grouped GEMM for prefill: FP4 e2m1 expert weights decoded in-kernel, one program per (N block,
expert), so each weight tile is decoded once per BLOCK_M rows of its expert instead of once per 16-row block.

Same product and contract as `fp4_grouped.fp4_grouped_gemm` (x [M, K] sorted by expert, eid [M] non-decreasing,
weight int8 [E, N, K/2] low nibble first, scale e8m0 [E, N, K/32] -> fp32 [M, N]); the wrapper adds the expert
row offsets `offs` [E + 1] (expert e owns rows offs[e] .. offs[e+1]), found on the device with `searchsorted`.
NOTE: not `bincount` + `cumsum`: CUDA's bincount reads the max id back to the host (a sync, and no graph capture).
Sortedness and the id range are checked on the device too (`_assert_async`), since unsorted ids would leave rows
unwritten, not fail.

Design: the accumulator belongs to a row tile, so the row tiles are the outer loop and K the inner one; a tile of
expert e's weights is decoded again for each of its row tiles. With BLOCK_M 64-128 that is once per expert at the
1k-prefill shape (24 pairs per expert on average) and ~2-4 times at 8k (192), against ~2.5 and ~13 per expert in
the 16-row-block kernel (row blocks plus expert boundaries, over E). The alternative (K outer, every row tile's
accumulator live) needs an unbounded number of accumulators. The grid is (N blocks, E), N blocks fastest, so
programs launched together share the expert's x rows in L2. Experts with no rows skip their loop: a static grid,
no host sync (CUDA-graph capturable).
Two switches, on by default, off for A/B runs: `join` interleaves the decoded halves back into K order for one dot
over a contiguous x tile (without it: two dots over stride-2 columns of x, and compiled for sm_90 Triton gives the
two wgmmas different layouts and shuffles the accumulator between them every K step); `group_scales` decodes an
e8m0 byte once per 32 elements instead of per element. 8 warps: compiled offline for sm_90
(scripts/bench/grouped_prefill_regs.py), 4 warps take 168-255 registers at 64x64 tiles and spill at 64x128 with
`join`; 8 warps take 128 (64x64, both switches) to 251 registers and spill in no config tried.

Measured on an H200 (scripts/bench/grouped_prefill.py, bench/results/h200_grouped_prefill.log and
h200_grouped_decode.log; K 4096 -> N 2048, 256 experts): 384 rows 1.64 ms (16-row kernel 1.71), 6144 rows 2.09 ms
(4.66), 49152 rows 5.40 ms with 128 x 128 tiles (27.6); `join` is worth 2.3-3x, `group_scales` nothing measurable.
Dispatched from one row per expert (`ops/grouped_linear.py`). Still slower than torch._grouped_mm over bf16 copies
(1.11 / 1.35 / 1.50 ms): all of these FP4 kernels decode ~1e12 elements/s, 1/8 of what the FP4 bytes would allow,
so the decode arithmetic (and the layout shuffles into the dot operands), not memory, bounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.triton.fp4_grouped import _e2m1, _e8m0, check_grouped


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:                                                          # fp32 x: no TF32 rounding of operands
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _decoded_halves(w_ptr, s_ptr, rows, n_ok, b0, dtype: tl.constexpr, HALF: tl.constexpr, N_SCALES: tl.constexpr,
                    BLOCK_B: tl.constexpr, GROUP_SCALES: tl.constexpr):
    """W^T tiles [BLOCK_B, BLOCK_N] of the even (low nibble) and odd (high nibble) K elements of packed bytes
    b0 .. b0 + BLOCK_B, decoded exactly into `dtype`. GROUP_SCALES decodes each e8m0 byte once per 32 elements and
    broadcasts it (fewer integer ops per element, perhaps a layout shuffle); else once per element."""
    offs_b = b0 + tl.arange(0, BLOCK_B)                               # packed byte b = elements 2b, 2b + 1
    byte = tl.load(w_ptr + rows[None, :] * HALF + offs_b[:, None], mask=n_ok[None, :], other=0).to(tl.int32) & 0xFF
    if GROUP_SCALES:
        offs_g = b0 // 16 + tl.arange(0, BLOCK_B // 16)
        sc = _e8m0(tl.load(s_ptr + rows[None, :] * N_SCALES + offs_g[:, None], mask=n_ok[None, :], other=127))
        scale = tl.reshape(tl.broadcast_to(sc[:, None, :], [BLOCK_B // 16, 16, sc.shape[1]]), [BLOCK_B, sc.shape[1]])
    else:
        scale = _e8m0(tl.load(s_ptr + rows[None, :] * N_SCALES + offs_b[:, None] // 16, mask=n_ok[None, :],
                              other=127))
    return (_e2m1(byte & 0xF) * scale).to(dtype), (_e2m1(byte >> 4) * scale).to(dtype)


@triton.jit
def _fp4_grouped_prefill(x_ptr, offs_ptr, w_ptr, s_ptr, out_ptr, N, K, HALF: tl.constexpr, N_SCALES: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, IEEE: tl.constexpr,
                         GROUP_SCALES: tl.constexpr, JOIN: tl.constexpr):
    e = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = e.to(tl.int64) * N + offs_n                                # [BLOCK_N] rows of the stacked weight
    start, end = tl.load(offs_ptr + e), tl.load(offs_ptr + e + 1)
    m0 = start
    # NOTE: a while, not range(start, end, BLOCK_M): the interpreter (numpy 2) cannot turn a loaded scalar into a
    # Python int. No rows: no iteration.
    while m0 < end:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end                                           # rows past `end` are the next expert's
        x_row = x_ptr + offs_m[:, None].to(tl.int64) * K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for b0 in range(0, HALF, BLOCK_B):
            w_lo, w_hi = _decoded_halves(w_ptr, s_ptr, rows, n_ok, b0, x_ptr.dtype.element_ty, HALF, N_SCALES,
                                         BLOCK_B, GROUP_SCALES)
            if JOIN:      # interleave the halves back into K order: one dot over a contiguous x tile
                w = tl.reshape(tl.permute(tl.join(w_lo, w_hi), (0, 2, 1)), [2 * BLOCK_B, BLOCK_N])
                xk = tl.load(x_row + 2 * b0 + tl.arange(0, 2 * BLOCK_B)[None, :], mask=m_ok[:, None], other=0.0)
                acc = _dot(xk, w, acc, IEEE)
            else:         # even and odd columns of x (stride-2 loads) meet the low and high codes
                x_even = tl.load(x_row + 2 * b0 + 2 * tl.arange(0, BLOCK_B)[None, :], mask=m_ok[:, None], other=0.0)
                x_odd = tl.load(x_row + 2 * b0 + 1 + 2 * tl.arange(0, BLOCK_B)[None, :], mask=m_ok[:, None],
                                other=0.0)
                acc = _dot(x_odd, w_hi, _dot(x_even, w_lo, acc, IEEE), IEEE)
        # Masked rows (x = 0) times inf/NaN weights are NaN, but they are not stored.
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])
        m0 += BLOCK_M


def expert_offsets(eid: torch.Tensor, n_experts: int) -> torch.Tensor:
    """int32 [E + 1]: expert e owns rows offs[e] .. offs[e+1] of the sorted `eid`. Device-side only: raises
    (asynchronously on CUDA) if `eid` is not non-decreasing or holds an id outside [0, E)."""
    if eid.numel():
        ok = (eid[1:] >= eid[:-1]).all() & (eid[0] >= 0) & (eid[-1] < n_experts)
        torch._assert_async(ok, f"fp4_grouped_gemm_prefill: eid must be sorted and within [0, {n_experts})")
    bounds = torch.arange(n_experts + 1, device=eid.device, dtype=eid.dtype)
    return torch.searchsorted(eid, bounds, out_int32=True)


def fp4_grouped_gemm_prefill(x: torch.Tensor, eid: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                             block_m: int = 64, block_n: int = 64, block_k: int = 128, group_scales: bool = True,
                             join: bool = True, num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) sorted by expert, eid [M] non-decreasing (int32/int64), weight int8 [E, N, K/2],
    scale e8m0 [E, N, K/32] -> fp32 [M, N]. Tiles, `group_scales`, `join` and launch options: for benchmarking."""
    M, K, N, E, half = check_grouped("fp4_grouped_gemm_prefill", x, eid, weight, scale, block_m, block_k)
    if eid.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fp4_grouped_gemm_prefill: eid must be int32/int64, got {eid.dtype}")
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    offs = expert_offsets(eid.contiguous(), E)
    grid = (triton.cdiv(N, block_n), E)
    _fp4_grouped_prefill[grid](x.contiguous(), offs, weight.contiguous(), scale.contiguous().view(torch.uint8), out,
                               N, K, half, K // 32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_B=block_k // 2,
                               IEEE=x.dtype == torch.float32, GROUP_SCALES=group_scales, JOIN=join,
                               num_warps=num_warps, num_stages=num_stages)
    return out
