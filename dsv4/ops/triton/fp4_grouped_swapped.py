"""The expert-major FP4 grouped GEMM with swapped operands: out^T = W x^T, the decoded weight as the dot's LEFT
operand. Dispatched by `ops/grouped_linear.py` (`swapped_tiles`), K-ordered, below 96 rows per expert (decode
batches that reach the expert-major kernel, prefill up to ~4k tokens at Flash). Measured on an H200 (graph
replays, K 4096 -> N 2048, 256 experts; bench/results/h200_s16_checks/grouped_swapped.log): decode batch 64 648 ->
575 us, 1k prefill 1921 -> 1335 us, 8k prefill 5225 -> 7859 us at best (there the expert-major kernel stays).
In element order the weight bytes reach registers through shared memory one byte at a time (wgmma's register
layout gives a thread bytes 4 apart along K); `korder=True` permutes K within each 128-K block so that they arrive
as 128-bit loads (below): 648 -> 575 us at decode batch 64 against 874 in element order, offline 6.91 -> 5.30
SASS instructions per weight.

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

`korder` (`_korder_tile`, `dsv4.ops.korder.K_ORDER`, `fp16_blocks_korder`): the fast path's dot runs over K in
another order per 128-K block; the stored weight is untouched (other kernels read it), x's fp16 copy is written in
the same order, so the sum over K is the same up to fp32 summation order (the same products, the same scalings).
wgmma's A fragment (m64nNk16,
fp16 from registers, PTX ISA) gives lane l of each warp rows g, g + 8 (g = l / 4) and, per k16 step,
the k pairs 2c, 2c + 1 and 8 + 2c, 8 + 2c + 1 (c = l % 4): over a 128-K block 16 fp16x2 registers per row, the dot
columns 16s + 8h + 2c + t. Dot column 32i + 16a + 8b + 2c + t (s = 2i + a, h = b) holds element
32c + 8i + 4t + 2a + b: nibble J = 2a + b (t = 0) or J + 4 (t = 1) of int32 word 4c + i of the row, so a thread's
registers are the 4 words 4c .. 4c + 3 (16 contiguous bytes, its 32-group c) of each of its rows, and each
register is one fp16x2 bit placement of one word (`fp4_decode._half2_bits(word, J)`, J as a broadcast dimension)
times the group's factor (one mul.rn.f16x2; a pair of fp16 by `inline_asm_elementwise(pack=2)`, or in plain
Triton a join of the two halves). Triton 3.9 then propagates the dot-operand layout back to the pipelined
shared-memory load with no layout conversion: one LDS.128 per row per block (after one 16-byte cp.async each).
Offline for sm_90 (Triton 3.9, its ptxas; K 4096; the fast path's K loop per thread and 128-K block, 16 x 64 tile,
4 warps: 64 weights per thread; tests/test_fp4_grouped_swapped.py checks the loop has LDS.128 and no LDS.U8/PRMT):
  element order: 6.91 SASS instructions per weight; weight bytes by 8 cp.async of 4 B (LDGSTS.E), 32 LDS.U8
    (0.50 per weight), 81 PRMT (1.27), 1 STS + 1 LDS.128, 3 SHFL; 168 registers.
  korder:        5.30 per weight; 2 cp.async of 16 B (LDGSTS.E.BYPASS.128), 2 LDS.128 (0.03 per weight), no LDS.U8,
    no PRMT, no STS, 5 SHFL (the scale factors); the decode is ~2.6 per weight (70 LOP3, 48 SHL, 16 SHF, 32 HMUL2);
    157 registers.
  other tiles (element order -> korder): 16 x 128 / 4 warps 6.87 -> 4.60, 16 x 128 / 8 7.19 -> 5.14, 32 x 64 / 4
    7.77 -> 6.03, 32 x 128 / 8 7.72 -> 5.75, 64 x 128 / 8 9.17 -> 7.22 (spills 92 -> 0 B); the fallback loops
    unchanged (~4 per weight).
Formulations that did worse offline: the pair decode (`e2m1_pair_f16_mul` over bytes, then reshape/permute) gets
the LDS.128 too but keeps 48 PRMT (5.72 per weight); the placements in plain Triton, lo/hi fp16 halves joined,
64 PRMT (6.30); the four placements joined along J, a layout conversion before the dot (34 SHFL, 6.41).
NOTE: the asm's pack=2 relies on the pair t = 0, 1 of one word sharing a register (the join's dimension is the
layout's first register), as the other packed helpers do; the GPU test compares it bit for bit with plain Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.fp4_layout import is_tiled
from dsv4.ops.triton.fp4_decode import e2m1_pair_f16_mul
from dsv4.ops.triton.fp4_grouped import _byte_at, _e2m1, _e8m0, _row_at, _row_words, _word_at, check_grouped
from dsv4.ops.triton.fp4_grouped_prefill import _dot, _scales_too_wide, expert_offsets, fp16_blocks, scaled_blocks


@triton.jit
def _korder_tile(w_ptr, rows, n_ok, b0, factor, HALF: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr,
                 TILED: tl.constexpr):
    """The decoded tile [BLOCK_N, 128] of packed bytes b0 .. b0 + 63 in `K_ORDER` (value * 2^-14 * factor, fp16;
    factor [BLOCK_N, 4] per 32-group): dot column 32i + 16a + 8b + 2c + t holds element 32c + 8i + 4t + 2a + b,
    i.e. nibble J = 2a + b (t = 0) or J + 4 (t = 1) of int32 word 4c + i, which is one fp16x2 word of the bit
    placement (`fp4_decode._half2_bits(word, J)`): a thread's A registers (lane % 4 = c) are the 4 words 4c .. 4c + 3
    of each of its rows, one 128-bit load per row, each register one placement and one fp16x2 multiply."""
    words = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + _row_words(rows, HALF, TILED)[:, None]
                    + _word_at(b0 // 4 + tl.arange(0, 16), TILED)[None, :], mask=n_ok[:, None], other=0)
    # J as a broadcast dimension, not as tl.join of the four placements: a join's new dimension is a layout's
    # first register, which the dot operand gives to its K pairs (t), so joined J forced a layout conversion.
    J = tl.arange(0, 4)[None, None, None, :]
    w4 = tl.reshape(words, [BLOCK_N, 4, 4])[:, :, :, None] >> (4 * J)                  # [n, c, i, J]
    h = ((w4 << 9) & 0x0E000E00) | ((w4 << 12) & -2147450880)                          # 0x80008000: fp16x2 bits
    f = tl.broadcast_to(factor[:, :, None, None], [BLOCK_N, 4, 4, 4])
    if ASM:         # the fp16x2 word and its product as a pair of fp16 (pack=2: the pair t = 0, 1 of one word)
        w = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $3;", "=r,r,r,r", [tl.join(h, h), tl.join(f, f)],
                                      dtype=tl.float16, is_pure=True, pack=2)
    else:
        lo = (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        w = tl.join(lo, hi) * tl.join(f, f)                                             # [n, c, i, J, t]
    w = tl.permute(tl.reshape(w, [BLOCK_N, 4, 4, 2, 2, 2]), (0, 2, 3, 4, 1, 5))       # [n, i, a, b, c, t]
    return tl.reshape(w, [BLOCK_N, 128])


@triton.jit
def _swapped_packed_block(xh_row, xs_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0, HALF: tl.constexpr,
                          N_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr, KORDER: tl.constexpr,
                          TILED: tl.constexpr):
    """One 128-K block (packed bytes b0 .. b0 + 63) of out^T, fp32 [BLOCK_N, BLOCK_M]: `_packed_block`'s
    arithmetic with the operands swapped. KORDER: the weight tile and x's fp16 block (`fp16_blocks_korder`) in
    `K_ORDER`, else in element order."""
    at_s = s_ptr + rows[:, None] * N_SCALES + (b0 // 16 + tl.arange(0, 4))[None, :]
    sb = tl.load(at_s, mask=n_ok[:, None], other=127).to(tl.int32)                       # [BLOCK_N, 4]
    top = tl.max(sb, axis=1)
    factor = ((30 + sb - top[:, None]) << 10).to(tl.int16).to(tl.float16, bitcast=True)  # 2^(15 + t_g - T)
    if KORDER:
        w = _korder_tile(w_ptr, rows, n_ok, b0, factor, HALF, BLOCK_N, ASM, TILED)
    else:
        byte = tl.load(w_ptr + _row_at(rows, HALF, TILED)[:, None] + _byte_at(b0 + tl.arange(0, 64), TILED)[None, :],
                       mask=n_ok[:, None], other=0)
        factor = tl.reshape(tl.broadcast_to(factor[:, :, None], [BLOCK_N, 4, 16]), [BLOCK_N, 64])
        w = tl.reshape(e2m1_pair_f16_mul(byte, factor, ASM), [BLOCK_N, 128])            # column k = 2b + h
    xh = tl.load(xh_row + 2 * b0 + tl.arange(0, 128)[None, :], mask=m_ok[:, None], other=0.0)   # [BLOCK_M, 128]
    xs = tl.load(xs_row + b0 // 64, mask=m_ok, other=0.0)                                        # [BLOCK_M]
    return tl.dot(w, tl.trans(xh)) * (xs[None, :] * (_e8m0(top) * 0.5)[:, None])


@triton.jit
def _swapped_default_block(acc, x_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0, dtype: tl.constexpr, HALF: tl.constexpr,
                           N_SCALES: tl.constexpr, IEEE: tl.constexpr, TILED: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] plus the 32-K group at packed bytes b0 .. b0 + 15 (one scale per weight row), the
    weights decoded exactly per element (e2m1 value times 2^(t - 127)) into x's dtype, as
    `fp4_grouped_prefill._decoded_halves` does. One group per step keeps the tiles small: this loop's registers
    count for the whole kernel (ptxas allocates for the worst path)."""
    byte = tl.load(w_ptr + _row_at(rows, HALF, TILED)[:, None] + _byte_at(b0 + tl.arange(0, 16), TILED)[None, :],
                   mask=n_ok[:, None], other=0)
    byte = byte.to(tl.int32) & 0xFF
    sc = _e8m0(tl.load(s_ptr + rows * N_SCALES + b0 // 16, mask=n_ok, other=127))[:, None]      # [BLOCK_N, 1]
    w = tl.join((_e2m1(byte & 0xF) * sc).to(dtype), (_e2m1(byte >> 4) * sc).to(dtype))
    w = tl.reshape(w, [byte.shape[0], 32])                                               # column k = 2b + h
    xk = tl.load(x_row + 2 * b0 + tl.arange(0, 32)[None, :], mask=m_ok[:, None], other=0.0)      # [BLOCK_M, 32]
    return _dot(w, tl.trans(xk), acc, IEEE)


@triton.jit
def _fp4_grouped_swapped(x_ptr, xh_ptr, xs_ptr, offs_ptr, w_ptr, s_ptr, out_ptr, N, K, HALF: tl.constexpr,
                         N_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                         ASM: tl.constexpr, KORDER: tl.constexpr, UNROLL: tl.constexpr = 1,
                         TILED: tl.constexpr = False):
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
                                             HALF, N_SCALES, IEEE, TILED)
        else:
            xh_row = xh_ptr + offs_m[:, None].to(tl.int64) * K
            xs_row = xs_ptr + offs_m.to(tl.int64) * (K // 128)
            # UNROLL 128-K blocks per step: each row's next 64 * UNROLL bytes requested together (one DRAM page)
            for b0 in range(0, HALF, 64 * UNROLL):
                for j in tl.static_range(UNROLL):
                    acc += _swapped_packed_block(xh_row, xs_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0 + 64 * j, HALF,
                                                 N_SCALES, BLOCK_N, ASM, KORDER, TILED)
        # Masked rows (x = 0) times inf/NaN weights are NaN, but they are not stored.
        tl.store(out_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None], acc,
                 mask=m_ok[None, :] & n_ok[:, None])
        m0 += BLOCK_M


def fp16_blocks_korder(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp16_blocks(x)` with each 128-K block of the fp16 copy in `K_ORDER` (column p holds element K_ORDER[p]),
    in one permuting copy: no index tensor (nothing to move to the device inside a CUDA graph capture)."""
    M, K = x.shape
    q, s = scaled_blocks(x)
    xh = torch.empty(M, K, dtype=torch.float16, device=x.device)
    # element 32c + 8i + 4t + 2a + b -> column 32i + 16a + 8b + 2c + t
    xh.view(M, K // 128, 4, 2, 2, 4, 2).copy_(q.view(M, K // 128, 4, 4, 2, 2, 2).permute(0, 1, 3, 5, 6, 2, 4))
    return xh, s


def fp4_grouped_gemm_swapped(x: torch.Tensor, eid: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                             block_m: int = 16, block_n: int = 64, num_warps: int = 4, num_stages: int = 3,
                             packed: bool | str = True, korder: bool = False, unroll: int = 1) -> torch.Tensor:
    """`fp4_grouped_prefill.fp4_grouped_gemm_prefill(..., packed=packed)` with swapped operands: x [M, K]
    (bf16/fp16/fp32) sorted by expert, eid [M] non-decreasing (int32/int64), weight int8 [E, N, K/2] (or
    tile-major: `dsv4.ops.fp4_layout`), scale e8m0
    [E, N, K/32] -> fp32 [M, N]; K / 128 a power of two. block_m: tokens per tile (the MMA's N), block_n: weight
    rows (its M, 64 per warpgroup), both powers of two >= 16. `packed`: True decodes in inline PTX (CUDA only),
    "twin" in plain Triton (the CPU interpreter). Exact for x on the FP8 grid per 128 block (see `fp16_blocks`).
    `korder`: the fast path's dots over K permuted within each 128-K block (`K_ORDER`; the module docstring), the
    weight read as int32 words (its data pointer 4-byte aligned); same products, fp32 sums in another order.
    `unroll`: 128-K blocks per loop step (dividing K / 128), so each row's next 64 x unroll bytes are requested
    together; the same sums in the same order (GPU-unmeasured: bench/NOTES.md, thirtieth session)."""
    M, K, N, E, half = check_grouped("fp4_grouped_gemm_swapped", x, eid, weight, scale, block_m, 128)
    blocks = K // 128
    if packed not in (True, "twin") or (packed is True and x.device.type != "cuda") or blocks & (blocks - 1):
        raise ValueError(f"fp4_grouped_gemm_swapped: packed must be True (inline PTX: CUDA only) or 'twin', and "
                         f"K / 128 a power of two; got {packed!r} on {x.device.type}, K {K}")
    if any(b < 16 or b & (b - 1) for b in (block_m, block_n)):
        raise ValueError(f"fp4_grouped_gemm_swapped: block_m ({block_m}) and block_n ({block_n}) must be powers of "
                         f"two >= 16")
    if unroll < 1 or blocks % unroll:
        raise ValueError(f"fp4_grouped_gemm_swapped: unroll ({unroll}) must divide K / 128 ({blocks})")
    if eid.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fp4_grouped_gemm_swapped: eid must be int32/int64, got {eid.dtype}")
    weight = weight.contiguous()
    if korder and weight.data_ptr() % 4:
        raise ValueError("fp4_grouped_gemm_swapped: korder reads the weight as int32 words: its data pointer must "
                         "be 4-byte aligned")
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    offs = expert_offsets(eid.contiguous(), E)
    x = x.contiguous()
    xh, xs = fp16_blocks_korder(x) if korder else fp16_blocks(x)
    _fp4_grouped_swapped[(triton.cdiv(N, block_n), E)](
        x, xh, xs, offs, weight, scale.contiguous().view(torch.uint8), out, N, K, half, K // 32,
        BLOCK_M=block_m, BLOCK_N=block_n, IEEE=x.dtype == torch.float32, ASM=packed is True, KORDER=korder,
        UNROLL=unroll, TILED=is_tiled(weight), num_warps=num_warps, num_stages=num_stages)
    return out
