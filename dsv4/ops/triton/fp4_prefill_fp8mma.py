"""The expert-major FP4 prefill GEMM on FP8 tensor cores: the reference `fp4_gemm`'s own arithmetic (spec §2.2).

Same contract as `fp4_grouped_prefill.fp4_grouped_gemm_prefill` (its `fp8mma` option calls this), for x on the FP8
grid per 128-K block (what the MoE feeds with the act-quant emulation on): x becomes e4m3 codes and power-of-two
scales again (`act_quant_fp8`, which reproduces such x exactly), the weight nibbles become e4m3 codes by bit
placement (value * 2^-6, `fp4_decode.e2m1_byte_e4m3`: no float conversion), and each 32-K sub-block is one FP8
wgmma (K = 32) from a zero accumulator, its partial added as `partial * sB[n, k // 32]` to the 128-K block's sum,
which is added as `block * sA[m, k // 128]` to the fp32 accumulator: the reference's sums, in its order.
Operands (as OpenAI's triton_kernels place mixed-precision MoE weights on Hopper): out^T = W x^T, so the decoded
weight tile is the wgmma's register-sourced A operand [BLOCK_N, 32] and the tokens are its N dimension (8..256: a
tile as small as an expert's rows); x^T is the shared-memory B operand, K-major as FP8 wgmma requires (x rows are
K-contiguous), loaded straight from global memory by the pipelined async copies.
x's codes and scales come from one launch (`x_operand`): act_quant, each code stored at its dot column.
K order inside a 32-K sub-block: a thread's A registers hold dot columns 4c..4c+3 and 16+4c..16+4c+3 (c = lane % 4)
of two rows; the bit-placement decode of one 32-bit word (packed bytes 4c..4c+3, elements 8c..8c+7) gives its
four low-nibble codes (elements 8c, 8c+2, 8c+4, 8c+6) in one register and its high-nibble codes in another. So dot
column 16h + 4c + j holds element 8c + 2j + h (`X_ORDER`), and x's codes are stored in that order (`x_operand`):
the sum over a sub-block does not depend on the order, and each thread then reads one aligned word per row and
sub-block, with no layout shuffle (compiled for sm_90: no PRMT in the K loop).
Scale bytes 0 (2^-127, an fp32 subnormal) and 255 (NaN) need the exact e8m0 decode; a program whose weight rows hold
any runs it, the others place the byte in the fp32 exponent (one shift and mask).
`fold` (the spec's convert path, per 128-K block, only where exact): the four sub-block scales go into the e4m3
codes, code = e2m1 * 2^(t_g - T + 6) with T the block's largest exponent, so one K = 128 dot per block (4 wgmmas
chained in the MMA's accumulator) is scaled once, by 2^(T - 133) and x's scale: 2 FP32 ops per output per 128 K
instead of 5. Exact while the four span <= 11 binades (the smallest code, 0.5 * 2^(t_g - T + 6), stays a normal
e4m3 number and 6 * 2^6 = 384 <= 448); a program whose rows span more anywhere, or hold byte 0 / 255, takes the
per-32 path (`_scale_flags`). The codes come from a table (`_lut_codes`: per sub-block and row, the 8 e4m3 codes
of the magnitudes, looked up by prmt), which takes four consecutive codes per register, so with `fold` x's codes
are stored in `X_ORDER_LUT` and its per-32 path uses the same table with unscaled codes.
Measured offline for sm_90 (scripts/bench/grouped_prefill_regs.py), SASS instructions per weight element in the K
loop: see bench/NOTES.md, "FP8-MMA expert-major prefill".
Precision: every product is exact (e4m3 x e2m1 needs 6 significant bits), the scalings are by powers of two. In the
CPU interpreter the dot is fp32 (IEEE) over the same codes (bit placement, `_e4m3_bytes_to_f32`): the fp32
summation class. On the GPU the FP8 MMA sums a sub-block's 32 products in its own fixed-point accumulator, below
fp32 (DeepSeek-V3 report, "Increasing Accumulation Precision": ~14 bits), as the reference kernel does; the fresh
accumulator per 32 K bounds it (tests/test_fp4_prefill_fp8mma.py derives both bounds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.fp4_layout import is_tiled
from dsv4.ops.triton.fp4_decode import e2m1_byte_e4m3
from dsv4.ops.triton.fp4_grouped import _byte_at, _e8m0, _row_at, stack_dims
from dsv4.ops.triton.fp8_linear import _e4m3_bytes_to_f32
from dsv4.ops.triton.quant import fp8_block_quant


@triton.jit
def _dot8(w, xq, HW: tl.constexpr):
    """w uint8 e4m3 codes [BN, K], xq e4m3 [BM, K] (float8e4nv on the GPU, uint8 codes in the interpreter) ->
    fp32 [BN, BM] = w xq^T from a zero accumulator."""
    if HW:
        out = tl.dot(w.to(tl.float8e4nv, bitcast=True), tl.trans(xq))
    else:
        out = tl.dot(_e4m3_bytes_to_f32(w), tl.trans(_e4m3_bytes_to_f32(xq)), input_precision="ieee")
    return out


@triton.jit
def _placed_codes(w_ptr, rows, n_ok, b0, HALF: tl.constexpr, ASM: tl.constexpr, TILED: tl.constexpr):
    """e4m3 codes (uint8, value * 2^-6) [BN, 32] of the sub-block at packed bytes b0 .. b0 + 15, dot column
    16h + 4c + j = element 8c + 2j + h (the module docstring's order)."""
    byte = tl.load(w_ptr + _row_at(rows, HALF, TILED)[:, None] + _byte_at(b0 + tl.arange(0, 16), TILED)[None, :],
                   mask=n_ok[:, None], other=0)
    lo = e2m1_byte_e4m3(byte, False, ASM).to(tl.uint8, bitcast=True)
    hi = e2m1_byte_e4m3(byte, True, ASM).to(tl.uint8, bitcast=True)
    codes = tl.reshape(tl.join(lo, hi), [byte.shape[0], 4, 4, 2])                 # [n, word c, byte j, nibble h]
    return tl.reshape(tl.permute(codes, (0, 3, 1, 2)), [byte.shape[0], 32])


# One packed word (pack=4: bytes 4c .. 4c + 3 of a sub-block, eight codes) -> the e4m3 codes of its low half
# (elements 8c .. 8c + 3) in $0 and of its high half in $1, by a table: in each half the four nibbles are the four
# codes in order; prmt looks the magnitudes (nibble & 7) up in the 8-byte table ($3 = entries 0-3, $7 = entries
# 4-7; the other copies of the packed table operands are unused), a second prmt turns the sign bits into bytes
# (prmt's sign-replicate mode on 0x40: 0x40 for a positive code, 0 for a negative one), and lop3 sets bit 7 where
# that byte is 0: mag | (~(d << 1) & 0x80808080). NOTE: not elementwise within the pack: it relies on the four
# bytes of a word being one packed register (the GPU test compares it with the plain-Triton twin).
_HALF_LUT = ("and.b32 sel, {w}, 0x7777; prmt.b32 mag, $3, $7, sel; prmt.b32 d, k, k, {w}; shl.b32 d, d, 1; "
             "lop3.b32 {out}, mag, d, 0x80808080, 0xF2; ")
_LUT_E4M3 = tl.constexpr("{ .reg .b32 hw, sel, mag, k, d; mov.b32 k, 0x40404040; " + _HALF_LUT.format(w="$2", out="$0")
                         + "shr.b32 hw, $2, 16; " + _HALF_LUT.format(w="hw", out="$1") + "}")
_MAX_SPREAD = tl.constexpr(11)              # scale exponents a 128-K block may span on the folded path


@triton.jit
def _lut_codes(byte, tlo, thi, ASM: tl.constexpr):
    """Packed bytes [BN, G, 16] (G sub-blocks) and tables [BN, G] (int32 pairs: entry i = e4m3 code of magnitude i)
    -> uint8 e4m3 codes [BN, 32 G], dot column 32g + 16h + 4c + i = element 32g + 8c + 4h + i (`X_ORDER_LUT`):
    a thread's two registers per row and sub-block are the two halves of one packed word."""
    BN: tl.constexpr = byte.shape[0]
    G: tl.constexpr = byte.shape[1]
    words = tl.reshape(byte, [BN, G, 4, 4])                           # [n, g, word c, byte]
    lo = tl.broadcast_to(tlo[:, :, None, None], words.shape)
    hi = tl.broadcast_to(thi[:, :, None, None], words.shape)
    if ASM:
        half0, half1 = tl.inline_asm_elementwise(_LUT_E4M3, "=r,=r,r,r,r,r,r,r,r,r,r", [words, lo, hi],
                                                 dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
        codes = tl.join(half0, half1)                                 # [n, g, c, i, half h]: element 8c + 4h + i
    else:
        b = tl.reshape(words, [BN, G, 4, 2, 2])                       # [n, g, c, half h, byte in half]
        pair = tl.join(b, b)                                          # [..., nibble]
        nib = tl.arange(0, 2)[None, None, None, None, None, :]
        code = (pair.to(tl.int32) >> (4 * nib)) & 0xF
        mag = code & 7
        shape: tl.constexpr = pair.shape
        lo6 = tl.broadcast_to(tlo[:, :, None, None, None, None], shape)
        hi6 = tl.broadcast_to(thi[:, :, None, None, None, None], shape)
        entry = (tl.where(mag < 4, lo6, hi6) >> (8 * (mag & 3))) & 0xFF
        codes = (entry | ((code & 8) << 4)).to(tl.uint8)              # [n, g, c, h, byte in half, nibble]
        codes = tl.reshape(tl.permute(codes, (0, 1, 2, 4, 5, 3)), [BN, G, 4, 4, 2])
    return tl.reshape(tl.permute(codes, (0, 1, 4, 2, 3)), [BN, G * 32])


@triton.jit
def _fold_tables(sb):
    """Scale bytes [BN, 4] of a 128-K block (1..254, spanning at most _MAX_SPREAD binades) -> (tables lo, hi
    [BN, 4], 2^(T - 127) [BN]) with T the largest byte: sub-block g's table codes e2m1 values times
    2^(j - 6), j = 12 - (T - t_g) in 1..12 (0.5 * 2^(j - 6) is then normal: entry 1 is j << 3, entry m >= 2 is
    m << 2 plus j << 3), so code * 2^(T - 127 - 6) is the weight; 6 * 2^6 = 384 <= 448 at j = 12."""
    top = tl.max(sb, axis=1)
    j4 = (96 - 8 * (top[:, None] - sb)) * 0x01010101                  # j << 3 in every byte
    return (j4 & -256) + 0x0C080000, j4 + 0x1C181410, (top << 23).to(tl.float32, bitcast=True)


@triton.jit
def _sub_block_scale(sw, g: tl.constexpr, EXACT: tl.constexpr):
    """2^(b - 127) for scale byte g of the words sw (four e8m0 bytes, sub-block g in byte g). EXACT: the e8m0
    decode with 0 and 255; else the byte placed in the fp32 exponent (right for bytes 1..254)."""
    b = (sw >> (8 * g)) & 0xFF
    if EXACT:
        out = _e8m0(b)
    else:
        out = (b << 23).to(tl.float32, bitcast=True)
    return out


@triton.jit
def _per32_block(acc, xq_row, xs, m_ok, w_ptr, s_ptr, rows, n_ok, kb, HALF: tl.constexpr, N_SCALES: tl.constexpr,
                 K: tl.constexpr, EXACT: tl.constexpr, LUT: tl.constexpr, HW: tl.constexpr, ASM: tl.constexpr,
                 TILED: tl.constexpr):
    """acc [BN, BM] plus the 128-K block kb: four K = 32 dots, each scaled by its weight scales, then by x's.
    LUT: the codes by `_lut_codes` with the base table (x in `X_ORDER_LUT`), else by bit placement."""
    sw = tl.load(s_ptr.to(tl.pointer_type(tl.int32)) + rows * (N_SCALES // 4) + kb, mask=n_ok, other=0x7F7F7F7F)
    blk = tl.zeros(acc.shape, dtype=tl.float32)
    for g in tl.static_range(4):
        if LUT:
            byte = tl.load(w_ptr + _row_at(rows, HALF, TILED)[:, None, None]
                           + _byte_at(kb * 64 + g * 16 + tl.arange(0, 16), TILED)[None, None, :],
                           mask=n_ok[:, None, None], other=0)
            base = tl.zeros([rows.shape[0], 1], dtype=tl.int32)
            w = _lut_codes(byte, base + 0x0C080400, base + 0x1C181410, ASM)     # entries mag << 2 (value * 2^-6)
        else:
            w = _placed_codes(w_ptr, rows, n_ok, kb * 64 + g * 16, HALF, ASM, TILED)
        xq = tl.load(xq_row + kb * 128 + g * 32 + tl.arange(0, 32)[None, :], mask=m_ok[:, None], other=0.0)
        blk += _dot8(w, xq, HW) * _sub_block_scale(sw, g, EXACT)[:, None]
    return acc + blk * xs[None, :]


@triton.jit
def _per32_k_loop(acc, xq_row, xs_ptr, offs_m, m_ok, M, w_ptr, s_ptr, rows, n_ok, HALF: tl.constexpr,
                  N_SCALES: tl.constexpr, K: tl.constexpr, EXACT: tl.constexpr, LUT: tl.constexpr, HW: tl.constexpr,
                  ASM: tl.constexpr, TILED: tl.constexpr):
    for kb in range(0, K // 128):
        xs = tl.load(xs_ptr + kb * M + offs_m, mask=m_ok, other=0.0)
        acc = _per32_block(acc, xq_row, xs, m_ok, w_ptr, s_ptr, rows, n_ok, kb, HALF, N_SCALES, K, EXACT, LUT, HW,
                           ASM, TILED)
    return acc * 64.0                                                 # undo the codes' bias 2^-6


@triton.jit
def _fold_k_loop(acc, xq_row, xs_ptr, offs_m, m_ok, M, w_ptr, s_ptr, rows, n_ok, HALF: tl.constexpr,
                 N_SCALES: tl.constexpr, K: tl.constexpr, HW: tl.constexpr, ASM: tl.constexpr, TILED: tl.constexpr):
    """The folded path: per 128-K block one K = 128 dot over codes carrying the sub-block scales relative to the
    block's largest (`_fold_tables`), scaled once by 2^(T - 127) and by x's scales."""
    for kb in range(0, K // 128):
        xs = tl.load(xs_ptr + kb * M + offs_m, mask=m_ok, other=0.0)
        sb = tl.load(s_ptr + rows[:, None] * N_SCALES + kb * 4 + tl.arange(0, 4)[None, :], mask=n_ok[:, None],
                     other=127).to(tl.int32) & 0xFF
        tlo, thi, top = _fold_tables(sb)
        at = _byte_at(kb * 64 + tl.arange(0, 4)[:, None] * 16 + tl.arange(0, 16)[None, :], TILED)     # [4, 16]
        byte = tl.load(w_ptr + _row_at(rows, HALF, TILED)[:, None, None] + at[None, :, :], mask=n_ok[:, None, None],
                       other=0)
        w = _lut_codes(byte, tlo, thi, ASM)
        xq = tl.load(xq_row + kb * 128 + tl.arange(0, 128)[None, :], mask=m_ok[:, None], other=0.0)
        acc += _dot8(w, xq, HW) * (top[:, None] * xs[None, :])
    return acc * 0.015625                                             # codes * 2^(T - 127 - 6)


@triton.jit
def _scale_flags(s_ptr, rows, n_ok, N_SCALES: tl.constexpr):
    """(special, wide) of the tile's weight rows: some scale byte is 0 or 255 (the exact e8m0 decode's cases);
    some 128-K block's four scale exponents span more than _MAX_SPREAD binades (the fold's exact range)."""
    special = tl.zeros([rows.shape[0]], dtype=tl.int32)
    spread = tl.zeros([rows.shape[0]], dtype=tl.int32)
    for c0 in range(0, N_SCALES, 4):                                  # one 128-K block's four bytes per step
        at = rows[:, None] * N_SCALES + c0 + tl.arange(0, 4)[None, :]
        sb = tl.load(s_ptr + at, mask=n_ok[:, None], other=127).to(tl.int32) & 0xFF          # [BN, 4]
        special |= tl.max(((sb == 0) | (sb == 255)).to(tl.int32), axis=1)
        spread = tl.maximum(spread, tl.max(sb, axis=1) - tl.min(sb, axis=1))
    return tl.max(special, axis=0) > 0, tl.max(spread, axis=0) > _MAX_SPREAD


@triton.jit
def _fp4_prefill_fp8mma(xq_ptr, xs_ptr, offs_ptr, w_ptr, s_ptr, out_ptr, M, N, K: tl.constexpr, HALF: tl.constexpr,
                        N_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FOLD: tl.constexpr,
                        HW: tl.constexpr, ASM: tl.constexpr, TILED: tl.constexpr = False):
    e = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = e.to(tl.int64) * N + offs_n                                # [BLOCK_N] rows of the stacked weight
    start, end = tl.load(offs_ptr + e), tl.load(offs_ptr + e + 1)
    special, wide = _scale_flags(s_ptr, rows, n_ok, N_SCALES)
    m0 = start
    while m0 < end:                 # (a while: see fp4_grouped_prefill; no rows, no iteration)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        xq_row = xq_ptr + offs_m[:, None].to(tl.int64) * K
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)          # out^T tile
        if special:
            acc = _per32_k_loop(acc, xq_row, xs_ptr, offs_m, m_ok, M, w_ptr, s_ptr, rows, n_ok, HALF, N_SCALES, K,
                                True, FOLD, HW, ASM, TILED)
        elif FOLD and not wide:
            acc = _fold_k_loop(acc, xq_row, xs_ptr, offs_m, m_ok, M, w_ptr, s_ptr, rows, n_ok, HALF, N_SCALES, K, HW,
                               ASM, TILED)
        else:
            acc = _per32_k_loop(acc, xq_row, xs_ptr, offs_m, m_ok, M, w_ptr, s_ptr, rows, n_ok, HALF, N_SCALES, K,
                                False, FOLD, HW, ASM, TILED)
        # masked rows (x = 0) times inf/NaN weights are NaN, but they are not stored
        tl.store(out_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None], acc,
                 mask=m_ok[None, :] & n_ok[:, None])
        m0 += BLOCK_M


# Element of a 32-K sub-block at each dot column: bit placement (16h + 4c + j), the table decode (16h + 4c + i).
X_ORDER = torch.tensor([8 * c + 2 * j + h for h in range(2) for c in range(4) for j in range(4)])
X_ORDER_LUT = torch.tensor([8 * c + 4 * h + i for h in range(2) for c in range(4) for i in range(4)])


@triton.jit
def _x_operand(x_ptr, q_ptr, s_ptr, n_rows, n_cols, LUT: tl.constexpr):
    """act_quant of one row's 128-K block (`fp8_block_quant`, as `act_quant_fp8`), each code stored at its dot
    column (the inverse of X_ORDER / X_ORDER_LUT, in integers: no table to copy, nothing to sync or capture)."""
    row = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    e = tl.arange(0, 128)
    x = tl.load(x_ptr + row * n_cols + kb * 128 + e).to(tl.float32)
    q, s = fp8_block_quant(x, tl.maximum(tl.max(tl.abs(x), axis=0), 1e-4))
    w = e % 32                                                        # element of its 32-K sub-block
    if LUT:
        col = 16 * ((w % 8) // 4) + 4 * (w // 8) + w % 4
    else:
        col = 16 * (w % 2) + 4 * (w // 8) + (w % 8) // 2
    tl.store(q_ptr + row * n_cols + kb * 128 + (e // 32) * 32 + col, q.to(q_ptr.dtype.element_ty))
    tl.store(s_ptr + kb * n_rows + row, s)


def x_operand(x: torch.Tensor, lut: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 codes [M, K], each 32-K sub-block in `X_ORDER` or, `lut`, `X_ORDER_LUT`; scales fp32
    [K / 128, M]) in one launch: act_quant per 128 (bit-identical to `dsv4.quant.act_quant`), which gives back x
    exactly when x is on the FP8 grid per 128 block (e4m3 values times a power of two, the block's amax from
    act_quant's own rounding)."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(K // 128, M, dtype=torch.float32, device=x.device)
    if M:
        _x_operand[(M, K // 128)](x.contiguous(), q, s, M, K, LUT=lut)
    return q, s


def fp4_grouped_gemm_fp8mma(x: torch.Tensor, offs: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                            block_m: int = 32, block_n: int = 128, num_warps: int = 4, num_stages: int = 3,
                            fold: bool = False, asm: bool = True, maxnreg: int | None = None) -> torch.Tensor:
    """x [M, K] sorted by expert, offs int32 [E + 1] (`expert_offsets`), weight int8 [E, N, K/2] (or tile-major:
    `dsv4.ops.fp4_layout`), scale e8m0
    [E, N, K/32] -> fp32 [M, N]; checked by the caller (`fp4_grouped_gemm_prefill`). Exact products for x on the
    FP8 grid per 128 block; other x is act-quantised first (the reference's FP4 GEMM input). `fold`: one K = 128
    dot per block where the block's four scales span <= 11 binades (the per-32 dots elsewhere); `asm` False: the
    plain-Triton decode on the GPU too (for the GPU test). `maxnreg`: ptxas's register cap (168 at 32 x 128 with
    4 warps: three programs per SM instead of two, the spills outside the K loop)."""
    M, K = x.shape
    E, N, half = stack_dims("fp8mma", weight)
    if K % 128 or block_n % 64 or block_m < 8 or block_m & (block_m - 1):
        raise ValueError(f"fp8mma: K ({K}) must be a multiple of 128, block_n ({block_n}) of 64 (the wgmma's M), "
                         f"block_m ({block_m}) a power of two >= 8")
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    hw = x.device.type == "cuda"
    xq, xs = x_operand(x, fold)
    _fp4_prefill_fp8mma[(triton.cdiv(N, block_n), E)](
        xq if hw else xq.view(torch.uint8), xs, offs, weight.contiguous(), scale.contiguous().view(torch.uint8),
        out, M, N, K, half, K // 32, BLOCK_M=block_m, BLOCK_N=block_n, FOLD=fold, HW=hw, ASM=hw and asm,
        TILED=is_tiled(weight), num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return out
