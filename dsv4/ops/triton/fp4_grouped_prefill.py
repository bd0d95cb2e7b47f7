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

`packed` (off by default until measured): fp16 tensor-core dots over the packed decode (`ops/triton/fp4_decode.py`:
each byte's two codes placed as one fp16x2 dot-operand pair, four codes per shift + mask pair, the e8m0 scales
folded in by one fp16x2 multiply per two codes). x is split by `fp16_blocks` into fp16 x / s and a power of two s
per row and 128-K block (exact for the FP8-grid rows the MoE feeds); each 128-K block's dot is scaled by s and by
the weight row's largest scale of the block, exact while a block's four scales span <= 24 binades; a program
whose weights span more runs the default decode instead (`_scales_too_wide`). SASS for sm_90 in the K loop, per
weight element (scripts/bench/grouped_prefill_regs.py, offline, K 4096 -> N 2048): 64 x 64 tiles (8 warps, the
dispatched config) 16.6 -> 9.3 instructions, 128 x 128 15.2 -> 8.3, 16 x 64 (4 warps, for decode batch 64)
14.9 -> 5.8 (~1 of them rescales the accumulator per block at 64 rows). Not measured on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.fp4_layout import is_tiled
from dsv4.ops.triton.fp4_decode import e2m1_pair_f16_mul
from dsv4.ops.triton.fp4_grouped import _byte_at, _e2m1, _e8m0, _row_at, check_grouped

_MAX_SPREAD = tl.constexpr(24)                         # scale exponents a 128-K block may span on the fast path


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:                                                          # fp32 x: no TF32 rounding of operands
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _decoded_halves(w_ptr, s_ptr, rows, n_ok, b0, dtype: tl.constexpr, HALF: tl.constexpr, N_SCALES: tl.constexpr,
                    BLOCK_B: tl.constexpr, GROUP_SCALES: tl.constexpr, TILED: tl.constexpr):
    """W^T tiles [BLOCK_B, BLOCK_N] of the even (low nibble) and odd (high nibble) K elements of packed bytes
    b0 .. b0 + BLOCK_B, decoded exactly into `dtype`. GROUP_SCALES decodes each e8m0 byte once per 32 elements and
    broadcasts it (fewer integer ops per element, perhaps a layout shuffle); else once per element."""
    offs_b = b0 + tl.arange(0, BLOCK_B)                               # packed byte b = elements 2b, 2b + 1
    byte = tl.load(w_ptr + _row_at(rows, HALF, TILED)[None, :] + _byte_at(offs_b, TILED)[:, None], mask=n_ok[None, :],
                   other=0).to(tl.int32) & 0xFF
    if GROUP_SCALES:
        offs_g = b0 // 16 + tl.arange(0, BLOCK_B // 16)
        sc = _e8m0(tl.load(s_ptr + rows[None, :] * N_SCALES + offs_g[:, None], mask=n_ok[None, :], other=127))
        scale = tl.reshape(tl.broadcast_to(sc[:, None, :], [BLOCK_B // 16, 16, sc.shape[1]]), [BLOCK_B, sc.shape[1]])
    else:
        scale = _e8m0(tl.load(s_ptr + rows[None, :] * N_SCALES + offs_b[:, None] // 16, mask=n_ok[None, :],
                              other=127))
    return (_e2m1(byte & 0xF) * scale).to(dtype), (_e2m1(byte >> 4) * scale).to(dtype)


@triton.jit
def _default_block(acc, x_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0, dtype: tl.constexpr, HALF: tl.constexpr,
                   N_SCALES: tl.constexpr, BLOCK_B: tl.constexpr, IEEE: tl.constexpr, GROUP_SCALES: tl.constexpr,
                   JOIN: tl.constexpr, TILED: tl.constexpr):
    """acc plus the product over packed bytes b0 .. b0 + BLOCK_B, the weights decoded per element into x's dtype."""
    w_lo, w_hi = _decoded_halves(w_ptr, s_ptr, rows, n_ok, b0, dtype, HALF, N_SCALES, BLOCK_B, GROUP_SCALES, TILED)
    if JOIN:      # interleave the halves back into K order: one dot over a contiguous x tile
        w = tl.reshape(tl.permute(tl.join(w_lo, w_hi), (0, 2, 1)), [2 * BLOCK_B, w_lo.shape[1]])
        xk = tl.load(x_row + 2 * b0 + tl.arange(0, 2 * BLOCK_B)[None, :], mask=m_ok[:, None], other=0.0)
        acc = _dot(xk, w, acc, IEEE)
    else:         # even and odd columns of x (stride-2 loads) meet the low and high codes
        x_even = tl.load(x_row + 2 * b0 + 2 * tl.arange(0, BLOCK_B)[None, :], mask=m_ok[:, None], other=0.0)
        x_odd = tl.load(x_row + 2 * b0 + 1 + 2 * tl.arange(0, BLOCK_B)[None, :], mask=m_ok[:, None], other=0.0)
        acc = _dot(x_odd, w_hi, _dot(x_even, w_lo, acc, IEEE), IEEE)
    return acc


@triton.jit
def _default_k_loop(acc, x_row, m_ok, w_ptr, s_ptr, rows, n_ok, dtype: tl.constexpr, HALF: tl.constexpr,
                    N_SCALES: tl.constexpr, BLOCK_B: tl.constexpr, IEEE: tl.constexpr, GROUP_SCALES: tl.constexpr,
                    JOIN: tl.constexpr, TILED: tl.constexpr):
    for b0 in range(0, HALF, BLOCK_B):
        acc = _default_block(acc, x_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0, dtype, HALF, N_SCALES, BLOCK_B, IEEE,
                             GROUP_SCALES, JOIN, TILED)
    return acc


@triton.jit
def _scales_too_wide(s_ptr, rows, n_ok, N_SCALES: tl.constexpr):
    """True when, in some row of the tile, the four scale exponents of a 128-K block span more than 24 binades
    (the packed path's exact range); N_SCALES / 4 must be a power of two."""
    blocks, g = tl.arange(0, N_SCALES // 4), tl.arange(0, 4)
    at = rows[:, None, None] * N_SCALES + blocks[None, :, None] * 4 + g[None, None, :]
    sb = tl.load(s_ptr + at, mask=n_ok[:, None, None], other=127).to(tl.int32)      # [BLOCK_N, K / 128, 4]
    return tl.max(tl.max(tl.max(sb, axis=2) - tl.min(sb, axis=2), axis=1), axis=0) > _MAX_SPREAD


@triton.jit
def _packed_block(xh_row, xs_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0, HALF: tl.constexpr, N_SCALES: tl.constexpr,
                  BLOCK_N: tl.constexpr, ASM: tl.constexpr, TILED: tl.constexpr):
    """One 128-K block (packed bytes b0 .. b0 + 63) of the product, fp32 [BLOCK_M, BLOCK_N], from fp16 dots.
    Weights: the packed decode (value * 2^-14) times an fp16 factor 2^(15 + t_g - T) per 32-group g, where t_g is
    the group's scale exponent and T the largest of the row's four: value * 2^(1 + t_g - T), exact while the four
    span at most 24 binades (0.5 * 2^-24 is fp16's least subnormal; 6 * 2 = 12 the largest). Each dot sums exact
    fp16 products in fp32; x's power of two per row (`fp16_blocks`) and 2^(T - 1) are applied after it
    (`_scales_too_wide` sends programs whose scales span more to the default decode)."""
    offs_b = b0 + tl.arange(0, 64)
    byte = tl.load(w_ptr + _row_at(rows, HALF, TILED)[None, :] + _byte_at(offs_b, TILED)[:, None], mask=n_ok[None, :],
                   other=0)                                                                       # [64, BLOCK_N]
    at_s = s_ptr + rows[None, :] * N_SCALES + (b0 // 16 + tl.arange(0, 4))[:, None]
    sb = tl.load(at_s, mask=n_ok[None, :], other=127).to(tl.int32)                                 # [4, BLOCK_N]
    top = tl.max(sb, axis=0)
    factor = ((30 + sb - top[None, :]) << 10).to(tl.int16).to(tl.float16, bitcast=True)    # 2^(15 + t_g - T)
    factor = tl.reshape(tl.broadcast_to(factor[:, None, :], [4, 16, BLOCK_N]), [64, BLOCK_N])
    w = tl.reshape(tl.permute(e2m1_pair_f16_mul(byte, factor, ASM), (0, 2, 1)), [128, BLOCK_N])   # row k = 2b + h
    xh = tl.load(xh_row + 2 * b0 + tl.arange(0, 128)[None, :], mask=m_ok[:, None], other=0.0)
    xs = tl.load(xs_row + b0 // 64, mask=m_ok, other=0.0)                                      # [BLOCK_M]
    return tl.dot(xh, w) * (xs[:, None] * (_e8m0(top) * 0.5)[None, :])


@triton.jit
def _fp4_grouped_prefill(x_ptr, xh_ptr, xs_ptr, offs_ptr, w_ptr, s_ptr, out_ptr, N, K, HALF: tl.constexpr,
                         N_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                         IEEE: tl.constexpr, GROUP_SCALES: tl.constexpr, JOIN: tl.constexpr, PACKED: tl.constexpr,
                         ASM: tl.constexpr, TILED: tl.constexpr = False):
    e = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = e.to(tl.int64) * N + offs_n                                # [BLOCK_N] rows of the stacked weight
    start, end = tl.load(offs_ptr + e), tl.load(offs_ptr + e + 1)
    if PACKED:
        wide = _scales_too_wide(s_ptr, rows, n_ok, N_SCALES)
    m0 = start
    # NOTE: a while, not range(start, end, BLOCK_M): the interpreter (numpy 2) cannot turn a loaded scalar into a
    # Python int. No rows: no iteration.
    while m0 < end:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end                                           # rows past `end` are the next expert's
        x_row = x_ptr + offs_m[:, None].to(tl.int64) * K
        if PACKED:
            xh_row = xh_ptr + offs_m[:, None].to(tl.int64) * K
            xs_row = xs_ptr + offs_m.to(tl.int64) * (K // 128)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if PACKED:
            if wide:      # some scales span more than the fp16 path holds exactly: the default decode
                acc = _default_k_loop(acc, x_row, m_ok, w_ptr, s_ptr, rows, n_ok, x_ptr.dtype.element_ty, HALF,
                                      N_SCALES, BLOCK_B, IEEE, GROUP_SCALES, JOIN, TILED)
            else:         # fp16 dots over the packed decode (BLOCK_B = 64: one 128-K block per step)
                for b0 in range(0, HALF, BLOCK_B):
                    acc += _packed_block(xh_row, xs_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0, HALF, N_SCALES,
                                         BLOCK_N, ASM, TILED)
        else:
            acc = _default_k_loop(acc, x_row, m_ok, w_ptr, s_ptr, rows, n_ok, x_ptr.dtype.element_ty, HALF, N_SCALES,
                                  BLOCK_B, IEEE, GROUP_SCALES, JOIN, TILED)
        # Masked rows (x = 0) times inf/NaN weights are NaN, but they are not stored.
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])
        m0 += BLOCK_M


def fp16_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x / s as fp16 [M, K], s fp32 [M, K / 128]) with s = 2^floor(log2(amax)) per row and 128-K
    block, at least 2^-126: exact for x on the FP8 grid per 128 block (e4m3 values times one power of two, as the
    MoE feeds it: |x / s| < 2, >= 2^-19 unless zero, at most 4 significant bits); other x is rounded to fp16, and
    a block holding inf/NaN gives NaN."""
    q, s = scaled_blocks(x)
    return q.half().view(x.shape), s


def scaled_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / s as fp32 [M, K / 128, 128], s fp32 [M, K / 128]): `fp16_blocks` before its fp16 rounding, for callers
    that write the fp16 copy in another column order (`fp4_grouped_swapped.fp16_blocks_korder`)."""
    M, K = x.shape
    xb = x.float().view(M, K // 128, 128)
    bits = xb.abs().amax(-1).view(torch.int32) & 0x7F800000
    s = bits.clamp_min(0x00800000).view(torch.float32)
    return xb / s[..., None], s


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
                             join: bool = True, num_warps: int = 8, num_stages: int = 3,
                             packed: bool | str = False, fp8mma: bool | str = False,
                             maxnreg: int | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) sorted by expert, eid [M] non-decreasing (int32/int64), weight int8 [E, N, K/2] or
    tile-major (`dsv4.ops.fp4_layout`), scale e8m0 [E, N, K/32] -> fp32 [M, N]. Tiles, `group_scales`, `join` and
    launch options: for benchmarking.
    `packed` (off until measured; block_k 128, `group_scales` / `join` do not apply): fp16 dots over the packed
    decode, True in inline PTX (CUDA only), "twin" in plain Triton; exact for x on the FP8 grid per 128 block
    (the MoE's input), see `fp16_blocks` and `_packed_block`. `fp8mma` (off until measured; block_k, `group_scales`,
    `join` do not apply): the reference's FP8 x FP8 arithmetic on the tensor cores, exact products for the same x
    (`ops/triton/fp4_prefill_fp8mma.py`): True one K = 32 dot per sub-block, "fold" one K = 128 dot per block
    where the block's scales allow it exactly; `maxnreg` caps its registers (ptxas)."""
    M, K, N, E, half = check_grouped("fp4_grouped_gemm_prefill", x, eid, weight, scale, block_m, block_k)
    blocks = K // 128
    if packed not in (False, True, "twin") or (packed is True and x.device.type != "cuda") or (packed and (
            block_k != 128 or blocks & (blocks - 1))):
        raise ValueError(f"fp4_grouped_gemm_prefill: packed must be False, True (inline PTX: CUDA only) or 'twin',"
                         f" with block_k 128 and K / 128 a power of two; got {packed!r} on {x.device.type}, "
                         f"block_k {block_k}, K {K}")
    if eid.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fp4_grouped_gemm_prefill: eid must be int32/int64, got {eid.dtype}")
    if fp8mma not in (False, True, "fold") or (fp8mma and packed):
        raise ValueError(f"fp4_grouped_gemm_prefill: fp8mma must be False, True or 'fold', and packed and fp8mma "
                         f"are two variants: pick one (got packed={packed!r}, fp8mma={fp8mma!r})")
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    offs = expert_offsets(eid.contiguous(), E)
    if fp8mma:
        from dsv4.ops.triton.fp4_prefill_fp8mma import fp4_grouped_gemm_fp8mma

        return fp4_grouped_gemm_fp8mma(x, offs, weight, scale, block_m=block_m, block_n=block_n,
                                       num_warps=num_warps, num_stages=num_stages, fold=fp8mma == "fold",
                                       maxnreg=maxnreg)
    grid = (triton.cdiv(N, block_n), E)
    x = x.contiguous()
    xh, xs = fp16_blocks(x) if packed else (x, out)          # (unused unless packed)
    _fp4_grouped_prefill[grid](x, xh, xs, offs, weight.contiguous(), scale.contiguous().view(torch.uint8), out,
                               N, K, half, K // 32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_B=block_k // 2,
                               IEEE=x.dtype == torch.float32, GROUP_SCALES=group_scales, JOIN=join,
                               PACKED=packed is not False, ASM=packed is True, TILED=is_tiled(weight),
                               num_warps=num_warps, num_stages=num_stages)
    return out
