"""The lightning indexer's scores without the [n, heads, t] intermediate (`ops/indexer_scores.py` dispatches here).

One program per (query block, key block, sequence) tile: it loads its key block once and loops over the heads,
each a [BLOCK_S, d] x [d, BLOCK_T] tensor-core dot with fp32 accumulation followed by the twin's roundings in
registers: the dot rounded to the input dtype, relu, the product with w rounded to the input dtype (exact in fp32
before its rounding: a product of two 16-bit values fits fp32's significand), added to an fp32 sum over heads
that is rounded once at the store, like torch's 16-bit sum. With `visible`, entries t >= visible[row] are -inf,
and a key block that no row of the query block sees runs no head at all (causal prefill and training: half the
tiles, the arithmetic of `select`'s ratio-4 visibility).
Precision against the twin: the same roundings; the dot's fp32 summation order (cuBLAS's vs the MMA's) can move a
dot that lies within fp32 noise of a rounding boundary to the neighbouring 16-bit value, and the fp32 sum over
heads runs in another order (tests/test_indexer_scores.py derives the bound).
NOTE fp32 inputs use IEEE fp32 dots (not TF32); the dispatch sends only 16-bit calls here (the fp32 twin
accumulates in float64), fp32 is for the CPU interpreter's tests, whose bf16 dots are wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _indexer_scores(q_ptr, k_ptr, w_ptr, vis_ptr, out_ptr, S, T, sq_b, sq_s, sq_h, sk_b, sk_t, sw_b, sw_s, sw_h,
                    sv_b, sv_s, so_b, so_s, H: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[b, rows, cols] = sum_h rnd(relu(rnd(q[b, rows, h] . k[b, cols])) * w[b, rows, h]) (rnd: to the input
    dtype), -inf where cols >= vis[b, rows] if MASKED."""
    b = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    ok_r, ok_c = rows < S, cols < T
    heads = H
    if MASKED:           # a key block that no row of the query block sees runs no head (and stores -inf)
        vis = tl.load(vis_ptr + b * sv_b + rows * sv_s, mask=ok_r, other=0)
        heads = tl.where(tl.max(vis, axis=0) > tl.program_id(1) * BLOCK_T, H, 0)
    kt = tl.load(k_ptr + b * sk_b + cols[None, :] * sk_t + d[:, None], mask=ok_c[None, :], other=0.0)  # [D, BT]
    q_rows = q_ptr + b * sq_b + rows[:, None] * sq_s + d[None, :]                                      # [BS, D]
    w_rows = w_ptr + b * sw_b + rows * sw_s                                                            # [BS]
    acc = tl.zeros((BLOCK_S, BLOCK_T), dtype=tl.float32)
    for h in range(0, heads):
        q = tl.load(q_rows + h * sq_h, mask=ok_r[:, None], other=0.0)
        w = tl.load(w_rows + h * sw_h, mask=ok_r, other=0.0).to(tl.float32)
        if IEEE:
            dot = tl.dot(q, kt, input_precision="ieee")                                   # fp32, not TF32
        else:
            dot = tl.dot(q, kt)                                                           # fp32 accumulation
        dot = tl.maximum(dot.to(q.dtype).to(tl.float32), 0.0)                             # the twin's rounded dot
        acc += (dot * w[:, None]).to(q.dtype).to(tl.float32)                              # its rounded product
    if MASKED:
        acc = tl.where(cols[None, :] < vis[:, None], acc, float("-inf"))
    out = out_ptr + b * so_b + rows[:, None] * so_s + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok_r[:, None] & ok_c[None, :])


def _check(w: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None) -> None:
    """The launcher's preconditions, each named (a bad call must not silently compute garbage)."""
    if q.dim() != 4 or w.shape != q.shape[:3] or keys.dim() != 3 or keys.shape[::2] != q.shape[::3]:
        raise ValueError(f"want w [b, s, h], q [b, s, h, d], keys [b, t, d]; got {tuple(w.shape)}, "
                         f"{tuple(q.shape)}, {tuple(keys.shape)}")
    if not (q.dtype == w.dtype == keys.dtype) or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"w, q and keys must share one dtype of bf16, fp16 or fp32; got {w.dtype}, {q.dtype}, "
                         f"{keys.dtype}")
    d = q.shape[-1]
    if d < 16 or d & (d - 1) or q.stride(-1) != 1 or keys.stride(-1) != 1:
        raise ValueError(f"head dim must be a power of two >= 16 and contiguous; got {d}")
    if visible is not None and (visible.shape != q.shape[:2] or visible.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"visible must be int [b, s] = {tuple(q.shape[:2])}; got {visible.dtype} "
                         f"{tuple(visible.shape)}")


def default_config(s: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_T, num_warps). Prefill / training (s > 64): 64 x 64 tiles, 4 warps, the fastest measured on the
    H200 at both prefill shapes (bench/results/h200_s7_bench/indexer_scores.json: Flash 8k 0.554 ms against 0.760
    for 128 x 128 x 8 warps, builtin 32k 2.41 against 2.85 ms; 64 x 128 was 2.31 / 0.671); decode's few rows per
    sequence take the MMA's smallest M (16) rather than a tile of padding."""
    if s > 64:
        return 64, 64, 4
    return (16 if s <= 16 else 64), 128, 8


def indexer_scores(w: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None = None,
                   block_s: int | None = None, block_t: int | None = None, num_warps: int | None = None,
                   num_stages: int = 2) -> torch.Tensor:
    """scores [b, s, t] in q's dtype (w [b, s, h], q [b, s, h, d], keys [b, t, d], visible [b, s] or None)."""
    _check(w, q, keys, visible)
    b, s, h, d = q.shape
    t = keys.shape[1]
    bs, bt, nw = default_config(s)
    bs, bt, num_warps = block_s or bs, block_t or bt, num_warps or nw
    out = torch.empty(b, s, t, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    vis = visible if visible is not None else out          # any pointer: never read when not MASKED
    vs = visible.stride() if visible is not None else (0, 0)
    grid = (triton.cdiv(s, bs), triton.cdiv(t, bt), b)
    _indexer_scores[grid](q, keys, w, vis, out, s, t, q.stride(0), q.stride(1), q.stride(2), keys.stride(0),
                          keys.stride(1), w.stride(0), w.stride(1), w.stride(2), vs[0], vs[1], out.stride(0),
                          out.stride(1), H=h, D=d, MASKED=visible is not None, IEEE=q.dtype == torch.float32,
                          BLOCK_S=bs, BLOCK_T=bt, num_warps=num_warps, num_stages=num_stages)
    return out
