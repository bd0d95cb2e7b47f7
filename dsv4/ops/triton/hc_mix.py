"""mHC pre (and head) mixing for decode-sized token counts in two launches, where the plain path runs a cuBLAS
fp32 GEMV, the norm's reduction, the Sinkhorn kernel and the weighted sum (bench/NOTES.md, "Fused mHC pre").

Stage 1 (`_partials`, split-K): program (split, token block) reads one 128-wide chunk of the widened streams
x [T, hc*D] and of fn [N, hc*D] and writes the chunk's N dot products (one fp32 `tl.dot` of the token block with
the chunk's N fn rows, padded to a power of two >= 16) and its sum of squares as fp32 partials.
Stage 2 (`_mix`, program (token, D chunk)): sums the token's partials over the splits (one fixed-shape `tl.sum`),
scales by rsqrt(mean(x^2) + eps), runs the split + Sinkhorn of `sinkhorn.split_sinkhorn` (the head: sigmoid + eps)
in registers and writes its D chunk of y = sum_k pre_k x_k, re-reading h. Every D chunk of a token recomputes the
same weights from the same partials with the same code (bit-identical); chunk 0 stores them. Stage 2 runs one
warp: the Sinkhorn's ~40 dependent reductions of a 4x4 tile then stay within it (shuffles, no barriers).
Stage 1's dot is IEEE fp32 (`input_precision="ieee"`: FMAs on the GPU, never TF32): the fp32 GEMV's class. Up to
the forty-first session it was N sequential in-register sums (a cross-warp reduction each: 24 a program for
hc_pre); the kernel in that form measured no faster at decode than the five launches it replaces (bench/NOTES.md,
thirty-sixth session). The dot form is GPU-unmeasured.
NOTE batch invariance: every tile shape and the split count depend on hc*D only, never on the token count, and no
reduction crosses tokens, so a token's outputs are bit-identical alone or in any batch.
Precision: fp32 class against the plain path (split-K partials summed in another order than cuBLAS's GEMV;
Triton's exp, sigmoid and rsqrt may differ from torch's by an ulp); y is rounded once to h's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.triton.sinkhorn import split_sinkhorn

BLOCK_T, BLOCK_K, BLOCK_D = 16, 128, 512


@triton.jit
def _partials(h_ptr, fn_ptr, part_ptr, T, K, N: tl.constexpr, NP: tl.constexpr, PW: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[split, t, :N] = x[t, chunk] @ fn[:, chunk]^T, part[split, t, N] = sum(x[t, chunk]^2)."""
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = split * BLOCK_K + tl.arange(0, BLOCK_K)
    n = tl.arange(0, NP)
    ok, ok_k, ok_n = rows < T, cols < K, n < N
    x = tl.load(h_ptr + rows[:, None] * K + cols[None, :], mask=ok[:, None] & ok_k[None, :], other=0.0)
    x = x.to(tl.float32)                                                             # [BLOCK_T, BLOCK_K]
    w = tl.load(fn_ptr + n[:, None] * K + cols[None, :], mask=ok_n[:, None] & ok_k[None, :], other=0.0)
    d = tl.dot(x, tl.trans(w), input_precision="ieee")                             # [BLOCK_T, NP]
    out = part_ptr + (split * T + rows) * PW
    tl.store(out[:, None] + n[None, :], d, mask=ok[:, None] & ok_n[None, :])
    tl.store(out + N, tl.sum(x * x, axis=1), mask=ok)


@triton.jit
def _summed(ptrs, ok):
    """The partials at ptrs [BLOCK_S, ...] (one row per split) summed over the splits: [1, ...]."""
    return tl.expand_dims(tl.sum(tl.load(ptrs, mask=ok, other=0.0), axis=0), 0)


@triton.jit
def _mix(h_ptr, part_ptr, scale_ptr, base_ptr, y_ptr, pre_ptr, post_ptr, comb_ptr, T, D, n_split, norm_eps, hc_eps,
         ITERS: tl.constexpr, HC: tl.constexpr, N: tl.constexpr, PW: tl.constexpr, HEAD: tl.constexpr,
         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    ok = s < n_split
    j = tl.arange(0, HC)
    jk = j[:, None] * HC + j[None, :]
    row = part_ptr + (s * T + t) * PW                                                # [BLOCK_S]
    rs = tl.rsqrt(tl.sum(tl.load(row + N, mask=ok, other=0.0), axis=0) / (HC * D) + norm_eps)
    pre = _summed(row[:, None] + j[None, :], ok[:, None]) * rs                      # [1, HC]
    if HEAD:
        pre = tl.sigmoid(pre * tl.load(scale_ptr) + tl.load(base_ptr + j)[None, :]) + hc_eps
    else:
        post = _summed(row[:, None] + HC + j[None, :], ok[:, None]) * rs
        comb = _summed(row[:, None, None] + 2 * HC + jk[None, :, :], ok[:, None, None]) * rs    # [1, HC, HC]
        pre, post, comb = split_sinkhorn(pre, post, comb, scale_ptr, base_ptr, hc_eps, ITERS, HC)
        if tl.program_id(1) == 0:
            tl.store(pre_ptr + t * HC + j[None, :], pre)
            tl.store(post_ptr + t * HC + j[None, :], post)
            tl.store(comb_ptr + t * HC * HC + jk[None, :, :], comb)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    x = tl.load(h_ptr + t * HC * D + j[:, None] * D + d[None, :], mask=d[None, :] < D, other=0.0)
    y = tl.sum(pre[:, :, None] * x.to(tl.float32)[None, :, :], axis=1)             # [1, BLOCK_D]
    tl.store(y_ptr + t * D + d[None, :], y.to(y_ptr.dtype.element_ty), mask=d[None, :] < D)


def _check(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, head: bool) -> None:
    n = hc if head else (2 + hc) * hc
    assert h.dtype in (torch.bfloat16, torch.float16) and h.shape[-2] == hc and hc & (hc - 1) == 0, h.shape
    assert fn.dtype == scale.dtype == base.dtype == torch.float32, (fn.dtype, scale.dtype, base.dtype)
    assert fn.shape == (n, hc * h.shape[-1]) and base.shape == (n,) and scale.shape == (1 if head else 3,)
    assert h.numel() < 2**31 and h.device == fn.device == scale.device == base.device


def hc_mix(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
           norm_eps: float, hc_eps: float, head: bool = False, out_dtype: torch.dtype | None = None):
    """`ops.hc_pre_mix` (y, pre, post, comb) or, with `head`, `ops.hc_head_mix` (y) for h [..., hc, D] bf16/fp16
    and fp32 parameters. y in `out_dtype` (default h's; fp32 gives the sum before its rounding, for tests)."""
    n = hc if head else (2 + hc) * hc
    _check(h, fn, scale, base, hc, head)
    lead, D = h.shape[:-2], h.shape[-1]
    x = h.reshape(-1, hc * D).contiguous()
    T, n_split, pw = x.shape[0], triton.cdiv(hc * D, BLOCK_K), triton.next_power_of_2(n + 1)
    y = torch.empty(T, D, dtype=out_dtype or h.dtype, device=h.device)
    pre, post = (torch.empty(T, hc, dtype=torch.float32, device=h.device) for _ in range(2))
    comb = torch.empty(T, hc, hc, dtype=torch.float32, device=h.device)
    if T:
        part = torch.empty(n_split, T, pw, dtype=torch.float32, device=h.device)
        _partials[(n_split, triton.cdiv(T, BLOCK_T))](x, fn.contiguous(), part, T, hc * D, N=n,
                                                     NP=max(16, triton.next_power_of_2(n)), PW=pw,
                                                     BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K)
        block_d = min(BLOCK_D, triton.next_power_of_2(D))
        _mix[(T, triton.cdiv(D, block_d))](x, part, scale.contiguous(), base.contiguous(), y, pre, post, comb, T, D,
                                           n_split, norm_eps, hc_eps, ITERS=iters, HC=hc, N=n, PW=pw, HEAD=head,
                                           BLOCK_S=triton.next_power_of_2(n_split), BLOCK_D=block_d,
                                           num_warps=1)
    if head:
        return y.view(*lead, D)
    return y.view(*lead, D), pre.view(*lead, hc), post.view(*lead, hc), comb.view(*lead, hc, hc)
