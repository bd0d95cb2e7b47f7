"""The expert-major FP4 grouped GEMM for prefill-sized row counts, decoded straight to bf16 WITH its scale: one
fp32 accumulator, no per-block rescaling, so the token tile can be as wide as wgmma's N (256) and each weight tile
is decoded about once per expert even at 8k-token prefill (192 rows per expert at Flash).

Why: the FP4 kernels here are bound by the decode arithmetic, not by bytes, and every kernel before this one
decodes a weight tile once per row tile of its expert. The expert-major kernel (`fp4_grouped_prefill.py`) at 8k
uses 128-row tiles (2 decodes per element) at 18 SASS instructions per weight; the swapped K-ordered kernel
(`fp4_grouped_swapped.py`) decodes in ~2.6 instructions per weight but its fp16 dots are rescaled per 128-K
block (x / s per row and block, weights relative to the block's largest scale), which costs two FP32 ops per
accumulator element per block and a second accumulator: at 64 tokens it was already 7.2 instructions per weight,
so it could not take wide token tiles (8k: 7.9 ms a call against 5.2 for the expert-major kernel, H200).
Here x stays bf16 (no scaling) and each weight is decoded into bf16 as its true value: `_bf16_tile` places the
e2m1 bits of two codes into a bf16x2 word (value * 2^-126) and multiplies by 2^(t - 1) (t the group's e8m0 byte)
in one `mul.rn.bf16x2`, which is exact: every bf16 x bf16 product is exact in fp32, so the arithmetic is the
expert-major kernel's (exact products, fp32 sums) and the twin's up to summation order.
The bf16 factor 2^(t - 1) exists for t <= 128 and the result stays a normal bf16 for t >= 16 (0.5 * 2^-111): a
program whose rows hold any scale byte outside 16 .. 128 (never in a real checkpoint: t = 128 already allows
weights of 12; byte 255 is NaN) runs the exact per-element decode instead (`fp4_grouped_swapped.
_swapped_default_block`, on x in element order).

Layout: the swapped kernel's `korder` (`korder.K_ORDER`; `fp4_grouped_swapped`'s docstring): out^T = W x^T, the decoded
weight tile wgmma's register A operand (64 rows per warpgroup), tokens its N; within each 128-K block the dot runs
over K permuted so that a thread's A registers are 16 contiguous bytes of one row (one 128-bit load), and x's
bf16 copy is written in the same order (`korder.to_korder`, one permuting copy per call; or, `xperm`, the kernel
permutes each loaded x tile itself). The stored weight is untouched.
The MoE carries its activations in K order end to end instead (`dsv4.ops.korder`; `x_korder`: x arrives K-ordered,
no copy; `out_korder`: weight row n is stored to output column K_ORDER^-1(n), so the w1 / w3 outputs, SwiGLU and the
act quant stay K-ordered for w2), stores bf16 and scatters w2's rows back to token-pair order (`out_index`): at 8k
prefill the three per-call copies of x (~0.6 ms a w1 / w3 call) and the fp32 round trips of the outputs go. With
K-ordered x the fallback runs its own loop (`_korder_fallback_block`): 32 K-ordered columns a step, their weights
decoded exactly per element into x's dtype.

`asm=False` (the twin, for Triton's CPU interpreter): the same tile in fp32 (`_e2m1` x `_e8m0`, exact), x's copy in
fp32 and IEEE fp32 dots: the same products and the same fp32 sums as the GPU path up to order (the interpreter
computes bf16 `tl.dot` wrongly in Triton 3.6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.fp4_layout import is_tiled
from dsv4.ops.korder import check_layout, to_korder
from dsv4.ops.triton.fp4_grouped import _e2m1, _e8m0, _row_words, _word_at, check_grouped
from dsv4.ops.triton.fp4_grouped_prefill import _dot, expert_offsets
from dsv4.ops.triton.fp4_grouped_swapped import _swapped_default_block

FAST_SCALES = (16, 128)          # scale bytes the bf16 decode takes exactly (the module docstring)


@triton.jit
def _bf16_tile(w_ptr, rows, n_ok, sb, b0, HALF: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr,
               TILED: tl.constexpr):
    """The decoded tile [BLOCK_N, 128] of packed bytes b0 .. b0 + 63 in K_ORDER, each weight its true value
    (e2m1 * 2^(t - 127), t = sb [BLOCK_N, 4], one byte per 32-group): bf16 with ASM, else fp32. Dot column
    32i + 16a + 8b + 2c + t holds nibble J = 2a + b (t = 0) or J + 4 (t = 1) of int32 word 4c + i of the row."""
    words = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + _row_words(rows, HALF, TILED)[:, None]
                    + _word_at(b0 // 4 + tl.arange(0, 16), TILED)[None, :], mask=n_ok[:, None], other=0)
    # J as a broadcast dimension (see fp4_grouped_swapped._korder_tile: a join of J would force a layout shuffle)
    J = tl.arange(0, 4)[None, None, None, :]
    w4 = tl.reshape(words, [BLOCK_N, 4, 4])[:, :, :, None] >> (4 * J)                  # [n, c, i, J]
    if ASM:
        # nibbles J and J + 4 as bf16x2: magnitude bits at 6..8 (exponent's low two, mantissa's top), sign at 15:
        # the bf16 value is e2m1 * 2^-126 (the subnormal 0.5 * 2^-126 too); times 2^(t - 1), exact.
        h = ((w4 << 6) & 0x01C001C0) | ((w4 << 12) & -2147450880)                       # 0x80008000
        factor = ((sb + 126) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)          # 2^(t - 1)
        f = tl.broadcast_to(factor[:, :, None, None], [BLOCK_N, 4, 4, 4])
        # pack=2: the pair t = 0, 1 of one word shares a register (as in _korder_tile)
        w = tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $3;", "=r,r,r,r", [tl.join(h, h), tl.join(f, f)],
                                      dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        sc = tl.broadcast_to(_e8m0(sb)[:, :, None, None], [BLOCK_N, 4, 4, 4])
        w = tl.join(_e2m1(w4 & 0xF) * sc, _e2m1((w4 >> 16) & 0xF) * sc)                # [n, c, i, J, t]
    w = tl.permute(tl.reshape(w, [BLOCK_N, 4, 4, 2, 2, 2]), (0, 2, 3, 4, 1, 5))       # [n, i, a, b, c, t]
    return tl.reshape(w, [BLOCK_N, 128])


@triton.jit
def _scales_in_range(s_ptr, rows, n_ok, N_SCALES: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr):
    """True when every scale byte of the program's weight rows lies in LO .. HI (the bf16 decode's exact range).
    Four bytes (one 128-K block) per step: K / 128 need not be a power of two."""
    lo, hi = tl.zeros([], tl.int32) + LO, tl.zeros([], tl.int32) + HI
    for g0 in range(0, N_SCALES, 4):
        sb = tl.load(s_ptr + rows[:, None] * N_SCALES + (g0 + tl.arange(0, 4))[None, :], mask=n_ok[:, None],
                     other=LO).to(tl.int32)
        lo, hi = tl.minimum(lo, tl.min(sb)), tl.maximum(hi, tl.max(sb))
    return (lo >= LO) & (hi <= HI)


@triton.jit
def _korder_fallback_block(acc, x_row, m_ok, w_ptr, s_ptr, rows, n_ok, k0, dtype: tl.constexpr, HALF: tl.constexpr,
                           N_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, TILED: tl.constexpr):
    """`fp4_grouped_swapped._swapped_default_block` for K-ordered x: acc plus its 32 columns k0 .. k0 + 31 (one
    contiguous load), i.e. for i = (k0 / 32) % 4 the block's columns 32i + 16a + 8b + 2c + t = element
    32c + 8i + 4t + 2a + b: nibble J = 2a + b (t = 0) or J + 4 (t = 1) of int32 word 4c + i of each weight row, the
    4 words at a stride of 4 (affine: no pointer per element), each group c with its own scale; decoded exactly per
    element into x's dtype. One 32-column step keeps the tiles small (this loop's registers and shared memory count
    for the whole kernel: a 128-column step doubled the kernel's shared memory)."""
    b0 = (k0 // 128) * 64                                               # the block's first packed byte
    i = (k0 // 32) % 4
    words = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + _row_words(rows, HALF, TILED)[:, None]
                    + _word_at(b0 // 4 + i + 4 * tl.arange(0, 4), TILED)[None, :], mask=n_ok[:, None],
                    other=0)                                                                       # [n, c]
    sc = _e8m0(tl.load(s_ptr + rows[:, None] * N_SCALES + (b0 // 16 + tl.arange(0, 4))[None, :],
                       mask=n_ok[:, None], other=127))                                            # [n, c]
    w4 = words[:, :, None] >> (4 * tl.arange(0, 4)[None, None, :])                                # [n, c, J]
    w = tl.join(_e2m1(w4 & 0xF) * sc[:, :, None], _e2m1((w4 >> 16) & 0xF) * sc[:, :, None])       # [n, c, J, t]
    w = tl.permute(tl.reshape(w, [BLOCK_N, 4, 2, 2, 2]), (0, 2, 3, 1, 4))                         # [n, a, b, c, t]
    xk = tl.load(x_row + k0 + tl.arange(0, 32)[None, :], mask=m_ok[:, None], other=0.0)          # [BLOCK_M, 32]
    return _dot(tl.reshape(w, [BLOCK_N, 32]).to(dtype), tl.trans(xk), acc, IEEE)


@triton.jit
def _fp4_grouped_direct(x_ptr, xk_ptr, offs_ptr, w_ptr, s_ptr, out_ptr, index_ptr, N, K, HALF: tl.constexpr,
                        N_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                        ASM: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, XPERM: tl.constexpr,
                        X_KORDER: tl.constexpr, OUT_KORDER: tl.constexpr, INDEX: tl.constexpr,
                        UNROLL: tl.constexpr = 1, TILED: tl.constexpr = False):
    e = tl.program_id(1)                        # grid (N blocks, E), N blocks fastest: an expert's x stays in L2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = e.to(tl.int64) * N + offs_n                                # [BLOCK_N] rows of the stacked weight
    cols = offs_n                                                     # the output columns of the tile's rows
    if OUT_KORDER:
        # weight row n goes to the output column that K order gives it (column p holds row K_ORDER[p]): the rows
        # n0 + 32c' + 8i + 4t + 2a + b (c' < R, n0 % 128 = 32 c0) are put in the order [i, a, b, c', t] before the
        # store, where row r lands in column 8 (r // 2R) + 2 c0 + r % 2R of the block: runs of 2R contiguous
        # columns. (Storing each row to its permuted column index directly made every store scalar: 4x the STG;
        # reading the weight rows permuted spilled in the K loop at 256 x 128: a pointer per row.)
        R: tl.constexpr = BLOCK_N // 32
        n0 = tl.program_id(0) * BLOCK_N
        r = tl.arange(0, BLOCK_N)
        cols = n0 - n0 % 128 + 8 * (r // (2 * R)) + 2 * ((n0 % 128) // 32) + r % (2 * R)
    start, end = tl.load(offs_ptr + e), tl.load(offs_ptr + e + 1)
    fast = _scales_in_range(s_ptr, rows, n_ok, N_SCALES, LO, HI)
    m0 = start
    while m0 < end:                 # (a while: see fp4_grouped_prefill; no rows, no iteration)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end                                           # rows past `end` are the next expert's
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)          # out^T tile
        if fast:
            xk_row = xk_ptr + offs_m[:, None].to(tl.int64) * K
            # UNROLL 128-K blocks per step: each row's next 64 * UNROLL bytes requested together
            for b0 in range(0, HALF, 64 * UNROLL):
                for j in tl.static_range(UNROLL):
                    sb = tl.load(s_ptr + rows[:, None] * N_SCALES + ((b0 + 64 * j) // 16 + tl.arange(0, 4))[None, :],
                                 mask=n_ok[:, None], other=127).to(tl.int32)             # [BLOCK_N, 4]
                    w = _bf16_tile(w_ptr, rows, n_ok, sb, b0 + 64 * j, HALF, BLOCK_N, ASM, TILED)
                    xk = tl.load(xk_row + 2 * (b0 + 64 * j) + tl.arange(0, 128)[None, :], mask=m_ok[:, None], other=0.0)
                    if XPERM:   # x in element order, K_ORDER'd here: [m, c, i, t, a, b] -> [m, i, a, b, c, t]
                        xk = tl.reshape(tl.permute(tl.reshape(xk, [BLOCK_M, 4, 4, 2, 2, 2]), (0, 2, 4, 5, 1, 3)),
                                        [BLOCK_M, 128])
                    if ASM:
                        acc = tl.dot(w, tl.trans(xk), acc)
                    else:
                        acc = tl.dot(w, tl.trans(xk), acc, input_precision="ieee")
        else:
            x_row = x_ptr + offs_m[:, None].to(tl.int64) * K
            if X_KORDER:    # x K-ordered: 32 of its columns per step, the weights of those columns gathered
                for k0 in range(0, 2 * HALF, 32):
                    acc = _korder_fallback_block(acc, x_row, m_ok, w_ptr, s_ptr, rows, n_ok, k0,
                                                 x_ptr.dtype.element_ty, HALF, N_SCALES, BLOCK_N, IEEE, TILED)
            else:
                for b0 in range(0, HALF, 16):
                    acc = _swapped_default_block(acc, x_row, m_ok, w_ptr, s_ptr, rows, n_ok, b0,
                                                 x_ptr.dtype.element_ty, HALF, N_SCALES, IEEE, TILED)
        if INDEX:                   # row m of the result goes to out row index[m] (the caller's scatter, fused)
            dest = tl.load(index_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
        else:
            dest = offs_m.to(tl.int64)
        # Masked rows (x = 0) times inf/NaN weights are NaN, but they are not stored.
        out = acc.to(out_ptr.dtype.element_ty)
        if OUT_KORDER:
            out = tl.reshape(tl.permute(tl.reshape(out, [BLOCK_N // 32, 4, 2, 2, 2, BLOCK_M]), (1, 3, 4, 0, 2, 5)),
                             [BLOCK_N, BLOCK_M])
        tl.store(out_ptr + dest[None, :] * N + cols[:, None], out, mask=m_ok[None, :] & n_ok[:, None])
        m0 += BLOCK_M


def fp4_grouped_gemm_direct(x: torch.Tensor, eid: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                            block_m: int = 256, block_n: int = 64, num_warps: int = 4, num_stages: int = 3,
                            asm: bool = True, xperm: bool = False, x_korder: bool = False, out_korder: bool = False,
                            out_dtype: torch.dtype = torch.float32, out_index: torch.Tensor | None = None,
                            unroll: int = 1) -> torch.Tensor:
    """x [M, K] sorted by expert, eid [M] non-decreasing (int32/int64), weight int8 [E, N, K/2] or tile-major
    (`dsv4.ops.fp4_layout`; 4-byte aligned),
    scale e8m0 [E, N, K/32] -> [M, N] (`out_dtype`: fp32, or bf16 / fp16 rounded to nearest from the fp32 sums), K
    a multiple of 128. block_m: tokens per tile (wgmma's N, a power of two 16 .. 256), block_n: weight rows (64 per
    warpgroup: block_n = 16 x num_warps keeps one A tile per warpgroup). asm=True (CUDA only): bf16 x, the bf16
    decode in inline PTX; asm=False: the fp32 twin (module docstring), any of bf16/fp16/fp32 x. Exact products
    either way; fp32 x on the GPU path would be rounded to bf16, so it is refused there. `xperm`: x's K order is
    permuted inside the kernel (the loaded tile reshaped, through shared memory) instead of by a copy before it:
    offline for sm_90 the same K loop count at 32 x 64 (5.0 per weight), +0.5 at 128 x 128 and spills at 256 x 128,
    so it pays where the tile is narrow.
    Layouts the MoE carries end to end (`dsv4.ops.korder`): `x_korder`: x's columns are already in K order per
    128 block (no copy, no in-kernel permutation); `out_korder`: the output's columns are written in K order (N a
    multiple of 128); `out_index` [M] (a permutation of 0 .. M - 1, int32/int64): row m of the result is written to
    row out_index[m] (the MoE's un-sort, fused into the store). `unroll`: 128-K blocks per step of the fast loop
    (dividing K / 128), so each row's next 64 x unroll bytes are requested together; the same sums in the same order
    (GPU-unmeasured: bench/NOTES.md, thirtieth session)."""
    M, K, N, E, half = check_grouped("fp4_grouped_gemm_direct", x, eid, weight, scale, block_m, 128)
    if asm and (x.device.type != "cuda" or x.dtype != torch.bfloat16):
        raise ValueError(f"fp4_grouped_gemm_direct: asm=True takes bf16 x on CUDA (got {x.dtype} on "
                         f"{x.device.type}); asm=False is the twin")
    if unroll < 1 or (x.shape[1] // 128) % unroll:
        raise ValueError(f"fp4_grouped_gemm_direct: unroll ({unroll}) must divide K / 128 ({x.shape[1] // 128})")
    if block_m > 256 or any(b < 16 or b & (b - 1) for b in (block_m, block_n)):
        raise ValueError(f"fp4_grouped_gemm_direct: block_m ({block_m}) and block_n ({block_n}) must be powers of "
                         f"two >= 16, block_m <= 256")
    if eid.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fp4_grouped_gemm_direct: eid must be int32/int64, got {eid.dtype}")
    check_layout("fp4_grouped_gemm_direct", M, N, out_korder, out_dtype, out_index)
    if out_korder and not 32 <= block_n <= 128:
        raise ValueError(f"fp4_grouped_gemm_direct: out_korder permutes rows within one 128-row block per tile: "
                         f"block_n must be 32 .. 128, got {block_n}")
    weight = weight.contiguous()
    if weight.data_ptr() % 4:
        raise ValueError("fp4_grouped_gemm_direct: the weight is read as int32 words: its data pointer must be "
                         "4-byte aligned")
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    if M == 0:
        return out
    offs = expert_offsets(eid.contiguous(), E)
    x = x.contiguous()
    if xperm or x_korder:
        xk = x if asm else x.float()
    else:
        xk = to_korder(x, torch.bfloat16 if asm else torch.float32)
    index = out_index.contiguous() if out_index is not None else offs       # (offs: any pointer, never read)
    _fp4_grouped_direct[(triton.cdiv(N, block_n), E)](
        x, xk, offs, weight, scale.contiguous().view(torch.uint8), out, index, N, K, half, K // 32, BLOCK_M=block_m,
        BLOCK_N=block_n, IEEE=x.dtype == torch.float32, ASM=asm, LO=FAST_SCALES[0], HI=FAST_SCALES[1],
        XPERM=xperm and not x_korder, X_KORDER=x_korder, OUT_KORDER=out_korder, INDEX=out_index is not None,
        UNROLL=unroll, TILED=is_tiled(weight), num_warps=num_warps, num_stages=num_stages)
    return out
