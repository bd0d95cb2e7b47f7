"""Grouped GEMV over (row, expert) pairs with FP4 e2m1 expert weights decoded in-kernel (Hopper has no FP4 MMA).

out[p, n] = sum_k x[p, k] * fp4(W[ids[p], n, k]) * 2^(e[ids[p], n, k // 32] - 127), fp32 accumulation.
W is packed two codes per byte along K (element 2i = low nibble), scales are e8m0 bytes. Reads only the experts
that the pairs name, in their stored format: the decode shape of the routed-expert MoE.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fp4_pair_gemv(x_ptr, ids_ptr, w_ptr, s_ptr, out_ptr, N, K, HALF: tl.constexpr, N_SCALES: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    p = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(ids_ptr + p).to(tl.int64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = e * N + offs_n                                             # [BLOCK_N] rows of the stacked weight
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b0 in range(0, HALF, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)                           # packed byte = elements 2b, 2b+1
        byte = tl.load(w_ptr + rows[:, None] * HALF + offs_b[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
        byte = byte & 0xFF
        sc = tl.load(s_ptr + rows[:, None] * N_SCALES + (offs_b[None, :] // 16), mask=n_ok[:, None], other=127)
        scale = tl.exp2(sc.to(tl.int32).to(tl.float32) - 127.0)
        x_even = tl.load(x_ptr + p * K + 2 * offs_b).to(tl.float32)
        x_odd = tl.load(x_ptr + p * K + 2 * offs_b + 1).to(tl.float32)
        # e2m1 (bit 3 = sign) -> {0, .5, 1, 1.5, 2, 3, 4, 6}: mantissa bit m, exponent e: e == 0 ? m/2 : (1+m/2)*2^(e-1)
        lo, hi = byte & 0xF, byte >> 4
        m_lo, e_lo = (lo & 1).to(tl.float32), (lo & 7) >> 1
        m_hi, e_hi = (hi & 1).to(tl.float32), (hi & 7) >> 1
        v_lo = tl.where(e_lo == 0, m_lo * 0.5, (1.0 + m_lo * 0.5) * tl.exp2((e_lo - 1).to(tl.float32)))
        v_hi = tl.where(e_hi == 0, m_hi * 0.5, (1.0 + m_hi * 0.5) * tl.exp2((e_hi - 1).to(tl.float32)))
        v_lo = tl.where(lo >= 8, -v_lo, v_lo)
        v_hi = tl.where(hi >= 8, -v_hi, v_hi)
        prod = v_lo * x_even[None, :] + v_hi * x_odd[None, :]
        acc += tl.sum(prod * scale, axis=1)
    tl.store(out_ptr + p * N + offs_n, acc, mask=n_ok)


def fp4_pair_gemv(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  block_n: int = 32, block_b: int = 64) -> torch.Tensor:
    """x [P, K] (bf16/fp16/fp32), ids [P] expert per row, weight int8 [E, N, K/2], scale e8m0 [E, N, K/32]
    -> fp32 [P, N]."""
    P, K = x.shape
    E, N, half = weight.shape
    assert half * 2 == K and K % 32 == 0 and scale.shape == (E, N, K // 32), (x.shape, weight.shape, scale.shape)
    assert x.is_contiguous() and weight.is_contiguous() and scale.is_contiguous() and ids.shape == (P,)
    assert (half % block_b == 0) and block_b % 16 == 0, "K/2 must be a multiple of block_b (a multiple of 16)"
    out = torch.empty(P, N, dtype=torch.float32, device=x.device)
    grid = (P, triton.cdiv(N, block_n))
    _fp4_pair_gemv[grid](x, ids.contiguous(), weight, scale.view(torch.uint8), out, N, K, half, K // 32,
                         BLOCK_N=block_n, BLOCK_B=block_b)
    return out
