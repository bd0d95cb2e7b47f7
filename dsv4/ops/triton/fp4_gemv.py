"""Grouped GEMV over (row, expert) pairs with FP4 e2m1 expert weights decoded in-kernel (Hopper has no FP4 MMA).

out[p, n] = sum_k x[p, k] * fp4(W[ids[p], n, k]) * 2^(e[ids[p], n, k // 32] - 127), fp32 accumulation.
W is packed two codes per byte along K (element 2i = low nibble), scales are e8m0 bytes. Reads only the experts
that the pairs name, in their stored format: the decode shape of the routed-expert MoE.

The weight is read as int32 words (eight codes each, element 8i + J in nibble J) in tiles of
[BLOCK_N rows, BLOCK_G scale groups, 4 words], so each thread loads 16 contiguous bytes (one scale group of one
row) and the scale byte is read and applied once per 32 elements, after their sum. A code is decoded by bit
placement: its magnitude bits go to fp32 bits 22-24 and its sign to bit 31, which is the e2m1 value times 2^-126
(an fp32 subnormal for 0.5, still exact), and one exact multiply by 2^126 finishes it: about six integer/float ops
per element, with no table, no exp2 and no branch (the first version, one byte per lane with exp2 per element and
a scale load per element, ran at ~0.3 TB/s at Flash's decode shapes: 0.94 ms of a 2.4 ms decode step).
Products of an e2m1 value and a bf16/fp32 x are exact in fp32; sums are fp32, in another order than the twin's.

`packed` (off by default until measured): the packed decode of `ops/triton/fp4_decode.py`, one shift + mask pair
per two codes into fp16x2 (value * 2^-14) and one exact fp16 -> fp32 conversion per code; the 2^14 is restored
with the scale, once per 32 elements. SASS for sm_90 in the K loop, per weight element
(scripts/bench/fp4_gemv_sass.py, offline; block_n 16, block_g 32, 4 warps): default 8.34 instructions (LOP3 2.0,
IMAD 1.9, SHF 1.0, FMUL 1.0, FFMA 1.0, PRMT 0.5 for bf16 x, shared-memory broadcasts of x), packed 6.37. An H200
issues ~4 per FP4 element at the copy bandwidth, so both stay issue-bound; going lower needs tensor cores (no
conversion, no FFMA per element). A variant that also handed the kernel x as fp32 lanes in the weights' layout
(4.79 offline) was removed (2026-12-03): on the H200 it was not equal to the default decode, unexplained, and
nothing dispatched it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv4.ops.fp4_layout import is_tiled
from dsv4.ops.triton.fp4_decode import e2m1_word_f32
from dsv4.ops.triton.fp4_grouped import _e8m0, _row_words, _word_at, stack_dims

_TWO_POW_126 = tl.constexpr(2.0**126)
_TWO_POW_14 = tl.constexpr(2.0**14)


@triton.jit
def _e2m1_lane(word, J: tl.constexpr):
    """Nibble J (element 8i + J) of int32 words -> fp32 e2m1 value (see the module docstring)."""
    if 4 * J <= 22:
        mag = word << (22 - 4 * J)
    else:
        mag = word >> (4 * J - 22)                    # arithmetic shift: the high bits it drags in are masked off
    sign = word << (28 - 4 * J)
    bits = (mag & 0x01C00000) | (sign & -2147483648)
    return bits.to(tl.float32, bitcast=True) * _TWO_POW_126


@triton.jit
def _x_lane(at_x, J: tl.constexpr, shape: tl.constexpr):
    """x's columns 8i + J for the words' tile, fp32: one [G, 4] load of the stride-8 columns, which Triton
    broadcasts over the tile's rows through shared memory."""
    return tl.broadcast_to(tl.load(at_x + J).to(tl.float32)[None, :, :], shape)


@triton.jit
def _half2_part(word, at_x, ASM: tl.constexpr):
    """sum over J of element 8i + J of the words (decoded through fp16x2 placement, value * 2^-14) times x's
    column 8i + J: [BLOCK_N, BLOCK_G, 4] fp32, in the same order as the default decode's sum, so the result is
    that one times 2^-14 exactly unless a product |x * value| < 2^-112 (fp32 subnormal range)."""
    e0, e1, e2, e3, e4, e5, e6, e7 = e2m1_word_f32(word, ASM)
    part = e0 * _x_lane(at_x, 0, word.shape)
    part += e1 * _x_lane(at_x, 1, word.shape)
    part += e2 * _x_lane(at_x, 2, word.shape)
    part += e3 * _x_lane(at_x, 3, word.shape)
    part += e4 * _x_lane(at_x, 4, word.shape)
    part += e5 * _x_lane(at_x, 5, word.shape)
    part += e6 * _x_lane(at_x, 6, word.shape)
    part += e7 * _x_lane(at_x, 7, word.shape)
    return part


@triton.jit
def _fp4_pair_gemv(x_ptr, ids_ptr, w_ptr, s_ptr, out_ptr, N, K, WORDS: tl.constexpr, N_SCALES: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HALF2: tl.constexpr,
                   ASM: tl.constexpr, TILED: tl.constexpr = False):
    p = tl.program_id(0)
    e = tl.load(ids_ptr + p).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = e * N + offs_n                                             # [BLOCK_N] rows of the stacked weight
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, 4)
    at_row = w_ptr + _row_words(rows, 4 * WORDS, TILED)[:, None, None]                        # [N, 1, 1]
    words = g[:, None] * 4 + j[None, :]                                                      # [G, 4] of the row
    at_s = s_ptr + rows[:, None] * N_SCALES + g[None, :]                                     # [N, G] scales
    at_x = x_ptr + p.to(tl.int64) * K + words * 8                                            # [G, 4] -> lane 0
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    for g0 in range(0, N_SCALES, BLOCK_G):                            # N_SCALES is a multiple of BLOCK_G
        word = tl.load(at_row + _word_at(g0 * 4 + words, TILED)[None, :, :], mask=n_ok[:, None, None], other=0)
        sbyte = tl.load(at_s + g0, mask=n_ok[:, None], other=127)
        if HALF2:           # packed decode: the values times 2^-14, restored once per 32 elements with the scale
            part = _half2_part(word, at_x + g0 * 32, ASM)
            acc += (tl.sum(part, axis=2) * _TWO_POW_14) * _e8m0(sbyte)
        else:
            part = tl.zeros([BLOCK_N, BLOCK_G, 4], dtype=tl.float32)
            for J in tl.static_range(8):
                xj = tl.load(at_x + g0 * 32 + J).to(tl.float32)
                part += _e2m1_lane(word, J) * xj[None, :, :]
            acc += tl.sum(part, axis=2) * _e8m0(sbyte)
    tl.store(out_ptr + p.to(tl.int64) * N + offs_n, tl.sum(acc, axis=1), mask=n_ok)


def fp4_pair_gemv(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  block_n: int = 32, block_g: int = 32, num_warps: int = 4,
                  packed: bool | str = False) -> torch.Tensor:
    """x [P, K] (bf16/fp16/fp32), ids [P] expert per row, weight int8 [E, N, K/2] or tile-major
    (`dsv4.ops.fp4_layout`), scale e8m0 [E, N, K/32]
    -> fp32 [P, N]. block_g scale groups (32 elements each) per step, at most the largest power of two dividing
    K/32 (64 and 128 at Flash's shapes). Defaults: the fastest of scripts/bench/fp4_gemv.py's sweep on the H200
    (bench/results/h200_fp4_gemv.log: 25-26 us per call at batch 1, 0.25 of the copy bandwidth; issuing
    the next step's loads early measured no faster, so that option is gone); block_n 32 weight rows per program
    (h100_s33 call D, `fp4_decode_kernels.py --only gemv`, over the tile-major layout that CUDA models hold: 126.4
    against 16 rows' 134.4 us at 8 tokens, 21.6 against 21.3 at 1; over the stored layout 143.9 / 24.6 against
    141.8 / 22.6). One value for both layouts: the block sets the reduction order of a row's products, and the
    dispatched ops must give the same bits over either layout (test_fp4_tiled); never a function of P either (a
    row's bits must not depend on its batch). `packed` (off until measured): True
    decodes eight codes per word through fp16x2 bit placement in inline PTX (`ops/triton/fp4_decode.py`; CUDA
    only), "twin" runs the same arithmetic in plain Triton (the interpreter's check of it); both equal the default
    decode bit for bit unless a product |x * value| falls below 2^-112."""
    P, K = x.shape
    E, N, half = stack_dims("fp4_pair_gemv", weight)
    if half * 2 != K or K % 32 or tuple(scale.shape) != (E, N, K // 32) or ids.shape != (P,):
        raise ValueError(f"fp4_pair_gemv: x {tuple(x.shape)}, ids {tuple(ids.shape)}, weight {tuple(weight.shape)}"
                         f", scale {tuple(scale.shape)} do not fit [P, K], [P], [E, N, K/2], [E, N, K/32]")
    if block_g & (block_g - 1) or block_n & (block_n - 1):
        raise ValueError(f"fp4_pair_gemv: block_n = {block_n} and block_g = {block_g} must be powers of two")
    if packed not in (False, True, "twin") or (packed is True and x.device.type != "cuda"):
        raise ValueError(f"fp4_pair_gemv: packed must be False, True (inline PTX: CUDA only) or 'twin'; got "
                         f"{packed!r} on {x.device.type}")
    block_g = math.gcd(block_g, K // 32)                 # small K (tiny test models): fewer groups per step
    if not (x.is_contiguous() and weight.is_contiguous() and scale.is_contiguous()):
        raise ValueError("fp4_pair_gemv: x, weight and scale must be contiguous (the weight is read as int32 words)")
    out = torch.empty(P, N, dtype=torch.float32, device=x.device)
    if P:
        grid = (P, triton.cdiv(N, block_n))
        _fp4_pair_gemv[grid](x, ids.contiguous(), weight.view(torch.int32), scale.view(torch.uint8), out, N, K,
                             half // 4, K // 32, BLOCK_N=block_n, BLOCK_G=block_g,
                             HALF2=packed is not False, ASM=packed is True, TILED=is_tiled(weight),
                             num_warps=num_warps)
    return out
