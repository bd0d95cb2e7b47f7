"""Sparse attention for training: the fused forward (`sparse_attention.py`'s tiles) keeping each row's log-sum-exp,
and a fused backward; `ops/attention.py` makes the pair one torch custom op with autograd (`sparse_attention_train`,
usable eager and inside compiled training blocks).

Why: training ran the twin (`ops.ref.sparse_attention`) under activation checkpointing: every query's rows gathered
into [b, s, k, d], upcast to fp32, in the forward, its recomputation and the backward (~25 % of a training step's
memory traffic by the CPU byte proxy, bench/notes/train_speed.md). Here nothing [b, s, k, *] is materialised: the
forward stores the output and a log-sum-exp per (query, head); the backward recomputes each tile's probabilities
from them (flash-attention's scheme).

Forward: the inference kernel itself (`sparse_attention._sparse_attention`, unsplit, with LSE: scores fp32, online
softmax with the max excluding the sink, each tile's probabilities rounded to kv's dtype before the PV dot, then
o = acc / (l + exp(sink - m)) and lse = m + log(l + exp(sink - m))): golden's "tiled" class.
Backward, per (query, block of heads), over the same tiles: p = exp(s - lse) (normalised, the sink included in the
denominator), dp = dO . kv, ds = p * (dp - delta) with delta = dO . o (fp32), then
dq += ds kv * scale; dkv[row] += p^T dO + ds^T q * scale (K = V: one shared row gets both), added with fp32 atomics
(a row is in many queries' lists; the twin's index_select backward also adds with atomics on CUDA: neither is
bit-reproducible there); dsink = -sum over queries of exp(sink - lse) * delta (per query stored, summed in order).
The dots take kv's dtype (p and ds rounded to it, as flash-attention does): bf16 class on the GPU; in the
interpreter (fp32 inputs) everything is fp32, so the CPU tests hold it to the twin's gradients at fp32 class.
Measured on the H200 (scripts/bench/sparse_attention_train.py, bench/results/h200_s18/sparse_attention_train.log):
one layer's forward + backward at 32k tokens 1.63 ms against the recomputed twin's 29.7 ms, 0.45 against 7.4 GiB;
relative error vs float64 ~2e-3 for the output and each gradient (the bf16 twin: 2e-3 to 1.1e-2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.triton.sparse_attention import _sparse_attention


@triton.jit
def _backward_tile(q, do, delta, lse, kv_base, dkv_base, idx_row, k0, K, offs_d, d_ok, h_ok, dq, scale,
                   D: tl.constexpr, BLOCK_K: tl.constexpr, precision: tl.constexpr):
    """One tile of list entries: recompute p, add this tile's share of dq, and add its rows' dkv (atomics)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    rows = tl.load(idx_row + offs_k, mask=offs_k < K, other=-1).to(tl.int64)
    valid = rows >= 0
    kv = tl.load(kv_base + rows[:, None] * D + offs_d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
    sc = tl.dot(q, tl.trans(kv), input_precision=precision) * scale                   # [BLOCK_H, BLOCK_K] fp32
    p = tl.where(valid[None, :] & h_ok[:, None], tl.exp(sc - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(kv), input_precision=precision)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kv.dtype), kv, input_precision=precision) * scale
    dkv = (tl.dot(tl.trans(p.to(kv.dtype)), do, input_precision=precision)
           + tl.dot(tl.trans(ds.to(kv.dtype)), q, input_precision=precision) * scale)   # [BLOCK_K, BLOCK_D] fp32
    tl.atomic_add(dkv_base + rows[:, None] * D + offs_d[None, :], dkv, mask=valid[:, None] & d_ok[None, :],
                  sem="relaxed")
    return dq


@triton.jit
def _backward(q_ptr, kv_ptr, sink_ptr, idx_ptr, out_ptr, lse_ptr, do_ptr, dq_ptr, dkv_ptr, dsink_ptr, S, N, K, scale,
              H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_K: tl.constexpr, IEEE: tl.constexpr, PIPELINED: tl.constexpr):
    bs = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok, d_ok = heads < H, offs_d < D
    at = (bs * H + heads[:, None]) * D + offs_d[None, :]
    hd_ok = h_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + at, mask=hd_ok, other=0.0)
    do = tl.load(do_ptr + at, mask=hd_ok, other=0.0)
    o = tl.load(out_ptr + at, mask=hd_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)                      # [BLOCK_H] dO . o
    lse = tl.load(lse_ptr + bs * H + heads, mask=h_ok, other=0.0)
    kv_base = kv_ptr + (bs // S) * N * D
    dkv_base = dkv_ptr + (bs // S) * N * D
    precision: tl.constexpr = "ieee" if IEEE else "tf32"
    dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    idx_row = idx_ptr + bs * K
    if PIPELINED:
        for k0 in tl.range(0, K, BLOCK_K):
            dq = _backward_tile(q, do, delta, lse, kv_base, dkv_base, idx_row, k0, K, offs_d, d_ok, h_ok, dq, scale,
                                D, BLOCK_K, precision)
    else:
        k0 = 0
        while k0 < K:
            dq = _backward_tile(q, do, delta, lse, kv_base, dkv_base, idx_row, k0, K, offs_d, d_ok, h_ok, dq, scale,
                                D, BLOCK_K, precision)
            k0 += BLOCK_K
    tl.store(dq_ptr + at, dq.to(dq_ptr.dtype.element_ty), mask=hd_ok)
    sink = tl.load(sink_ptr + heads, mask=h_ok, other=0.0)
    tl.store(dsink_ptr + bs * H + heads, -tl.exp(sink - lse) * delta, mask=h_ok)       # per query: summed after


def _shape(q: torch.Tensor, block_h: int) -> dict:
    h, d = q.shape[2], q.shape[3]
    return {"H": h, "D": d, "BLOCK_H": block_h, "BLOCK_D": max(16, triton.next_power_of_2(d))}


def _block_h(h: int) -> int:
    return min(64, max(16, triton.next_power_of_2(h)))     # tl.dot needs >= 16 rows (the dkv dot's inner size)


def forward(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
            block_k: int = 32, num_warps: int = 4, pipelined: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [b, s, h, d] in q's dtype, lse [b, s, h] fp32): the inference kernel, unsplit, storing the lse too.
    Inputs as `sparse_attention.sparse_attention`'s."""
    b, s, h = q.shape[:3]
    out = torch.empty_like(q)
    lse = torch.empty(b, s, h, dtype=torch.float32, device=q.device)
    if out.numel():
        block_h, k = _block_h(h), idx.shape[2]
        _sparse_attention[(b * s, triton.cdiv(h, block_h), 1)](
            q, kv, sink, idx, out, lse, sink, s, kv.shape[1], k, triton.cdiv(k, block_k), float(scale),
            **_shape(q, block_h), BLOCK_K=block_k, IEEE=q.dtype == torch.float32, PARTIAL=False,
            PIPELINED=q.is_cuda if pipelined is None else pipelined, LSE=True, num_warps=num_warps)
    return out, lse


def backward(do: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, scale: float, block_k: int = 32, num_warps: int = 4,
             pipelined: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq in q's dtype, dkv in kv's dtype, dsink fp32 [h]) for the output gradient `do`."""
    b, s, h = q.shape[:3]
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)        # atomics add into fp32
    per_query = torch.empty(b, s, h, dtype=torch.float32, device=q.device)
    if q.numel():
        block_h = _block_h(h)
        _backward[(b * s, triton.cdiv(h, block_h))](
            q, kv, sink, idx, out, lse, do.contiguous(), dq, dkv, per_query, s, kv.shape[1], idx.shape[2],
            float(scale), **_shape(q, block_h), BLOCK_K=block_k, IEEE=q.dtype == torch.float32,
            PIPELINED=q.is_cuda if pipelined is None else pipelined, num_warps=num_warps)
    return dq, dkv.to(kv.dtype), per_query.flatten(0, 1).sum(0)
