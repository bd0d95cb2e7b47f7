"""Grouped GEMM over rows sorted by expert, FP4 e2m1 expert weights decoded in-kernel (Hopper has no FP4 MMA).

out[m, n] = sum_k x[m, k] * fp4(W[eid[m], n, k]) * 2^(s[eid[m], n, k // 32] - 127), fp32 accumulation.
Static grid over (row blocks, column blocks): no host synchronisation, so CUDA graphs can capture it. A row
block may hold several experts; the program visits each expert present (the next one is the smallest id above
the current: absent ids cost nothing), decodes that expert's weight tiles to x's dtype (exact: e2m1 values times
powers of two, within bf16/fp32 range) and multiplies them with the block's rows (other experts' rows zeroed),
keeping the result for that expert's rows only. Sorting is for speed only (each expert's weights are then read
about once per row block it appears in); any order gives the right result. Packed bytes hold elements 2i (low
nibble) and 2i + 1 (high nibble), so the even and odd columns of x meet the low and high codes in two half-width
dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.fp4_layout import is_tiled, rows_shape

_NO_EXPERT = tl.constexpr(2**30)            # above every expert id: ends a block's expert walk


@triton.jit
def _e2m1(code):
    """4-bit code (bit 3 = sign, e = bits 2-1, m = bit 0) -> fp32 {0, .5, 1, 1.5, 2, 3, 4, 6} by bit placement (no
    exp2 on the special-function units): exponent 126 + e, mantissa m/2 gives 2^(e-1) (1 + m/2), the value for
    e >= 1; for e == 0 it gives 1/2 + m/4, and 2v - 1 = m/2 (exact)."""
    v = (((code & 7) << 22) + (126 << 23)).to(tl.float32, bitcast=True)
    v = tl.where((code & 6) == 0, 2.0 * v - 1.0, v)
    return tl.where(code >= 8, -v, v)


@triton.jit
def _e8m0(byte):
    """e8m0 byte b -> 2^(b - 127) by placing b in the fp32 exponent (b == 0: 2^-127 is subnormal, set apart;
    b == 255 is NaN, as in the definition, not inf: a mantissa bit is set)."""
    b = byte.to(tl.int32)
    bits = (b << 23) | ((b == 255).to(tl.int32) << 22)
    return tl.where(b == 0, 5.877471754111438e-39, bits.to(tl.float32, bitcast=True))


@triton.jit
def _row_at(rows, HALF: tl.constexpr, TILED: tl.constexpr):
    """Byte offset of each weight row's byte 0 in the stack: rows * K/2, or its place in its 64-row tile of the
    tile-major layout (`dsv4.ops.fp4_layout`, TILED). A row's packed byte c is at `_row_at + _byte_at(c)`."""
    if TILED:
        return (rows // 64) * (64 * HALF) + (rows % 64) * 64
    else:
        return rows * HALF


@triton.jit
def _byte_at(byte, TILED: tl.constexpr):
    """Offset of a row's packed byte `byte` from the row's `_row_at` (the 128-K block's tile is 4 KB further on
    per block in the tile-major layout)."""
    if TILED:
        return (byte // 64) * 4096 + byte % 64
    else:
        return byte


@triton.jit
def _row_words(rows, HALF: tl.constexpr, TILED: tl.constexpr):
    """`_row_at` in int32 words (the kernels that read the weight as words)."""
    if TILED:
        return (rows // 64) * (16 * HALF) + (rows % 64) * 16
    else:
        return rows * (HALF // 4)


@triton.jit
def _word_at(word, TILED: tl.constexpr):
    """`_byte_at` in int32 words."""
    if TILED:
        return (word // 16) * 1024 + word % 16
    else:
        return word


@triton.jit
def _fp4_grouped_gemm(x_ptr, eid_ptr, w_ptr, s_ptr, out_ptr, M, N, K, HALF: tl.constexpr, N_SCALES: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, IEEE: tl.constexpr,
                      TILED: tl.constexpr = False):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    eids = tl.load(eid_ptr + offs_m, mask=m_ok, other=_NO_EXPERT).to(tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    e = tl.min(eids, axis=0)
    while e < _NO_EXPERT:
        mine = eids == e                                              # [BLOCK_M] rows of expert e
        rows = e.to(tl.int64) * N + offs_n                            # [BLOCK_N] rows of the stacked weight
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for b0 in range(0, HALF, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)                       # packed byte b = elements 2b, 2b + 1
            w_at = _row_at(rows, HALF, TILED)[None, :] + _byte_at(offs_b, TILED)[:, None]   # [BLOCK_B, BLOCK_N]: W^T
            byte = tl.load(w_ptr + w_at, mask=n_ok[None, :], other=0).to(tl.int32) & 0xFF
            sc = tl.load(s_ptr + rows[None, :] * N_SCALES + offs_b[:, None] // 16, mask=n_ok[None, :], other=127)
            scale = _e8m0(sc)
            x_at = x_ptr + offs_m[:, None].to(tl.int64) * K + 2 * offs_b[None, :]
            x_even = tl.load(x_at, mask=mine[:, None], other=0.0)
            x_odd = tl.load(x_at + 1, mask=mine[:, None], other=0.0)
            w_lo = (_e2m1(byte & 0xF) * scale).to(x_even.dtype)
            w_hi = (_e2m1(byte >> 4) * scale).to(x_even.dtype)
            if IEEE:                                                  # fp32 x: no TF32 rounding of operands
                part = tl.dot(x_even, w_lo, part, input_precision="ieee")
                part = tl.dot(x_odd, w_hi, part, input_precision="ieee")
            else:
                part = tl.dot(x_even, w_lo, part)
                part = tl.dot(x_odd, w_hi, part)
        # Other experts' rows were multiplied by zeros: keep them out (0 * inf/NaN weights would poison them).
        acc = tl.where(mine[:, None], part, acc)
        e = tl.min(tl.where(eids > e, eids, _NO_EXPERT), axis=0)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def stack_dims(name: str, weight: torch.Tensor) -> tuple[int, int, int]:
    """(E, N, K/2) of a packed FP4 expert stack in either layout; a ValueError naming `name` for other shapes."""
    if weight.dim() not in (3, 5):
        raise ValueError(f"{name}: weight {tuple(weight.shape)} is not an expert stack [E, N, K/2] or its tile-major "
                         f"[E, N/64, K/128, 64, 64]")
    return rows_shape(weight)


def check_grouped(name: str, x: torch.Tensor, eid: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  block_m: int, block_k: int) -> tuple[int, int, int, int, int]:
    """(M, K, N, E, K/2) of a grouped FP4 GEMM's operands (the weight in either layout, `dsv4.ops.fp4_layout`); a
    ValueError naming `name` when they do not fit."""
    M, K = x.shape
    E, N, half = stack_dims(name, weight)
    if half * 2 != K or scale.shape != (E, N, K // 32) or eid.shape != (M,):
        raise ValueError(f"{name}: x {tuple(x.shape)}, eid {tuple(eid.shape)}, weight "
                         f"{tuple(weight.shape)}, scale {tuple(scale.shape)} do not match")
    if K % block_k or block_k % 32 or block_m < 16 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name}: K={K} must be a multiple of block_k={block_k} (a multiple of 32), "
                         f"block_m={block_m} >= 16, x bf16/fp16/fp32 (got {x.dtype})")
    return M, K, N, E, half


def fp4_grouped_gemm(x: torch.Tensor, eid: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     block_m: int = 16, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32; fp16 is exact only while the scaled weights fit fp16), eid [M] expert per row
    (int32/int64, best sorted), weight int8 [E, N, K/2] or tile-major, scale e8m0 [E, N, K/32] -> fp32 [M, N]."""
    M, K, N, _, half = check_grouped("fp4_grouped_gemm", x, eid, weight, scale, block_m, block_k)
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp4_grouped_gemm[grid](x.contiguous(), eid.contiguous(), weight.contiguous(),
                            scale.contiguous().view(torch.uint8), out, M, N, K, half, K // 32, BLOCK_M=block_m,
                            BLOCK_N=block_n, BLOCK_B=block_k // 2, IEEE=x.dtype == torch.float32,
                            TILED=is_tiled(weight))
    return out
