"""Sparse attention over per-query lists of KV rows with a per-head sink, fused: the twin `ops.ref.sparse_attention`
gathers every query's rows into a [b, s, k, d] tensor (10.7 GB per layer in fp32 at an 8k prefill chunk); this
kernel gathers each tile of rows by index in the program and keeps an online softmax, so nothing is materialised.

One program per (batch, query, block of BLOCK_H heads). KV is ONE head shared by all heads (K = V), so a tile is a
[BLOCK_H, d] x [d, BLOCK_K] score dot and a [BLOCK_H, BLOCK_K] x [BLOCK_K, d] PV dot over the same gathered rows.
Numerics are those of `ops.golden.attention_tiled(tile=BLOCK_K)`: scores fp32 (q.k, then * scale), running max and
sum in fp32 with the max EXCLUDING the sink, each tile's probabilities rounded to kv's dtype before the PV dot
(fp32 accumulation), the sink's exp(sink - m) added to the denominator only, at the end. Masked entries (-1) and
the list's tail past k load nothing and score -inf; a tile with nothing visible yet uses m = finfo.min as its
reference so that exp() gives 0 rather than NaN (what golden's tiled variant does).
Split k (flash-decoding): at decode there are only b * h / BLOCK_H programs, so each list may be cut into
`splits` runs of tiles, each program storing its un-normalised (m, l, acc) in fp32, and `_combine` rescales them
to the largest m and adds the sink: the same class as the tiled variant (probabilities rounded relative to each
split's own max), not bit-identical to it.
A query whose whole list is masked has no keys: the twin computes -inf - (-inf) = NaN there, and so does this
kernel, deliberately (golden's variants give 0 instead). The model never produces such a query: its window holds
the query itself.
The tile body (`_tile`) is shared by two loops: on CUDA a `for` loop, which Triton software-pipelines; in the CPU
interpreter a `while` loop (triton 3.6's interpreter cannot run `for` over a runtime bound under NumPy 2), so the
interpreter tests check everything but the `for` loop's control, which the Hopper compile test and the GPU test
cover.

Measured on an H200 (scripts/bench/sparse_attention.py, bench/results/h200_sparse_attention.log): an 8k prefill
chunk 41.4 ms (twin) -> 3.66 ms with 64 heads per program, 32-row tiles, 8 warps (4.67 ms at the defaults here):
dispatched for prefill with that configuration (`ops/attention.py`). Decode figures there include the index check's
host sync, so they say little; decode keeps the twin (fused by inductor in the compiled step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP32_MIN = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _tile(q, kv_base, idx_row, k0, k_end, offs_d, d_ok, m, l_i, acc, scale, D: tl.constexpr, BLOCK_K: tl.constexpr,
          precision: tl.constexpr):
    """One tile of BLOCK_K list entries: gather the rows, score, and update the running (m, l_i, acc)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    rows = tl.load(idx_row + offs_k, mask=offs_k < k_end, other=-1).to(tl.int64)
    valid = rows >= 0
    kv = tl.load(kv_base + rows[:, None] * D + offs_d[None, :], mask=valid[:, None] & d_ok[None, :],
                 other=0.0)                                                       # [BLOCK_K, BLOCK_D] gathered
    sc = tl.dot(q, tl.trans(kv), input_precision=precision) * scale               # [BLOCK_H, BLOCK_K] fp32
    sc = tl.where(valid[None, :], sc, float("-inf"))
    m_new = tl.maximum(m, tl.max(sc, axis=1))
    m_ref = tl.maximum(m_new, _FP32_MIN)                                          # nothing visible yet: exp -> 0
    p = tl.exp(sc - m_ref[:, None])
    alpha = tl.exp(m - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=precision)
    return m_new, l_i, acc


@triton.jit
def _sparse_attention(q_ptr, kv_ptr, sink_ptr, idx_ptr, out_ptr, m_ptr, l_ptr, S, N, K, TILES, scale,
                      H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_K: tl.constexpr, IEEE: tl.constexpr, PARTIAL: tl.constexpr,
                      PIPELINED: tl.constexpr, LSE: tl.constexpr):
    """Split program_id(2) covers tiles [split * TILES, (split + 1) * TILES) of the list. PARTIAL: store the
    un-normalised (m, l_i, acc) of this split in fp32 for `_combine` (out_ptr is then [b*s, splits, h, d] fp32).
    LSE (unsplit only): also store each row's log-sum-exp, sink included, at m_ptr [b*s, h] fp32 (training's
    forward, `sparse_attention_train.py`)."""
    bs = tl.program_id(0).to(tl.int64)                     # flat (batch, query)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok, d_ok = heads < H, offs_d < D
    q_at = q_ptr + (bs * H + heads[:, None]) * D + offs_d[None, :]
    q = tl.load(q_at, mask=h_ok[:, None] & d_ok[None, :], other=0.0)             # [BLOCK_H, BLOCK_D]
    kv_base = kv_ptr + (bs // S) * N * D
    precision: tl.constexpr = "ieee" if IEEE else "tf32"
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k_begin = tl.program_id(2) * TILES * BLOCK_K
    k_end = tl.minimum(k_begin + TILES * BLOCK_K, K)
    idx_row = idx_ptr + bs * K
    if PIPELINED:                     # GPU: a `for` loop, which Triton software-pipelines (num_stages)
        for k0 in tl.range(k_begin, k_end, BLOCK_K):
            m, l_i, acc = _tile(q, kv_base, idx_row, k0, k_end, offs_d, d_ok, m, l_i, acc, scale, D, BLOCK_K,
                                precision)
    else:                             # triton 3.6's interpreter cannot run `for` over a runtime bound (NumPy 2)
        k0 = k_begin
        while k0 < k_end:
            m, l_i, acc = _tile(q, kv_base, idx_row, k0, k_end, offs_d, d_ok, m, l_i, acc, scale, D, BLOCK_K,
                                precision)
            k0 += BLOCK_K
    if PARTIAL:
        row = (bs * tl.num_programs(2) + tl.program_id(2)) * H + heads            # [b*s, splits, h]
        tl.store(m_ptr + row, m, mask=h_ok)
        tl.store(l_ptr + row, l_i, mask=h_ok)
        tl.store(out_ptr + row[:, None] * D + offs_d[None, :], acc, mask=h_ok[:, None] & d_ok[None, :])
    else:
        _finish(acc, l_i, m, sink_ptr, out_ptr, bs, heads, offs_d, H, D, m_ptr, LSE)


@triton.jit
def _finish(acc, l_i, m, sink_ptr, out_ptr, bs, heads, offs_d, H: tl.constexpr, D: tl.constexpr, lse_ptr,
            LSE: tl.constexpr):
    """o = acc / (l_i + exp(sink - m)), stored in out's dtype; NaN where no key was visible (as the twin).
    LSE: also m + log(l_i + exp(sink - m)) at lse_ptr [b*s, h] (the sink's where nothing was visible)."""
    h_ok = heads < H
    sink = tl.load(sink_ptr + heads, mask=h_ok, other=0.0)
    none = m == float("-inf")
    m_ref = tl.where(none, sink, m)
    l_i = l_i + tl.exp(sink - m_ref)
    o = tl.where(none[:, None], float("nan"), acc / l_i[:, None])
    tl.store(out_ptr + (bs * H + heads[:, None]) * D + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=h_ok[:, None] & (offs_d < D)[None, :])
    if LSE:
        tl.store(lse_ptr + bs * H + heads, m_ref + tl.log(l_i), mask=h_ok)


@triton.jit
def _combine(part_ptr, m_ptr, l_ptr, sink_ptr, out_ptr, SPLITS, H: tl.constexpr, D: tl.constexpr,
             BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the splits' (m_j, l_j, acc_j) of one (query, head block): rescale each to the largest m_j (fp32)."""
    bs = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok, d_ok = heads < H, offs_d < D
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    j = 0
    while j < SPLITS:
        m = tl.maximum(m, tl.load(m_ptr + (bs * SPLITS + j) * H + heads, mask=h_ok, other=float("-inf")))
        j += 1
    m_ref = tl.maximum(m, _FP32_MIN)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    j = 0
    while j < SPLITS:
        row = (bs * SPLITS + j) * H + heads
        w = tl.exp(tl.load(m_ptr + row, mask=h_ok, other=float("-inf")) - m_ref)   # 0 for a split that saw nothing
        l_i += w * tl.load(l_ptr + row, mask=h_ok, other=0.0)
        part = tl.load(part_ptr + row[:, None] * D + offs_d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        acc += w[:, None] * part
        j += 1
    _finish(acc, l_i, m, sink_ptr, out_ptr, bs, heads, offs_d, H, D, m_ptr, False)


def _check(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor) -> None:
    """Clear errors naming the offending argument (the twin's contract)."""
    if q.dim() != 4 or kv.dim() != 3 or idx.dim() != 3:
        raise ValueError(f"sparse_attention: want q [b, s, h, d], kv [b, n, d], idx [b, s, k]; got q "
                         f"{tuple(q.shape)}, kv {tuple(kv.shape)}, idx {tuple(idx.shape)}")
    b, s, h, d = q.shape
    if kv.shape[0] != b or kv.shape[2] != d:
        raise ValueError(f"sparse_attention: kv {tuple(kv.shape)} does not match q {tuple(q.shape)} "
                         f"(want [{b}, n, {d}])")
    if tuple(idx.shape[:2]) != (b, s):
        raise ValueError(f"sparse_attention: idx {tuple(idx.shape)} does not match q's [b, s] = [{b}, {s}]")
    if tuple(sink.shape) != (h,) or sink.dtype != torch.float32:
        raise ValueError(f"sparse_attention: sink must be fp32 [{h}], got {sink.dtype} {tuple(sink.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float32) or kv.dtype != q.dtype:
        raise ValueError(f"sparse_attention: q and kv must both be bf16 or fp32, got q {q.dtype}, kv {kv.dtype}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sparse_attention: idx must be int32 or int64, got {idx.dtype}")
    if len({q.device, kv.device, sink.device, idx.device}) != 1:
        raise ValueError(f"sparse_attention: tensors on different devices: q {q.device}, kv {kv.device}, "
                         f"sink {sink.device}, idx {idx.device}")
    if idx.numel() and int(idx.max()) >= kv.shape[1]:
        raise ValueError(f"sparse_attention: idx holds row {int(idx.max())}, kv has only {kv.shape[1]} rows")


MAX_SPLITS = 4      # the partial results cost b * s * splits * h * d fp32 (Flash decode bs64: 33.5 MB at 4)


def default_splits(programs: int, tiles: int, device: torch.device) -> int:
    """Splits of each list: about two programs per SM when one sequence's `programs` (its s queries x head
    blocks) are few (decode), at most MAX_SPLITS and one per tile. From one sequence's programs, never from the
    batch: the split count sets the order in which a query's partial softmaxes merge, so a batch-dependent count
    gave a query other bits alone (the general step, batch 1) than batched (the fixed decode step): found on the
    H200 by scripts/bench/graph_divergence.py (bench/NOTES.md, seventh session)."""
    return 1 if device.type != "cuda" else plan_splits(programs, tiles, _sms(device))


def plan_splits(programs: int, tiles: int, sms: int) -> int:
    if programs >= 2 * sms:
        return 1
    return max(1, min(tiles, MAX_SPLITS, -(-2 * sms // programs)))


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
                     block_h: int = 16, block_k: int = 64, splits: int | None = None, num_warps: int = 4,
                     num_stages: int = 2, pipelined: bool | None = None, check: bool = True) -> torch.Tensor:
    """q [b, s, h, d] (bf16; fp32 for the interpreter), kv [b, n, d], sink [h] fp32, idx [b, s, k] int (-1 =
    masked, any order, repeats count twice) -> [b, s, h, d] in q's dtype. `splits` spreads each list over that
    many programs plus a merge (None: `default_splits`). `pipelined` (None: on CUDA) loops with `for` rather than
    `while` (the interpreter needs `while`). `check=False` skips the index range check (a host sync:
    leave it off inside CUDA graphs)."""
    if check:
        _check(q, kv, sink, idx)
    b, s, h, d = q.shape
    q, kv, idx, sink = q.contiguous(), kv.contiguous(), idx.contiguous(), sink.contiguous()
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    k = idx.shape[2]
    tiles, heads = triton.cdiv(k, block_k), triton.cdiv(h, block_h)
    splits = splits or default_splits(s * heads, tiles, q.device)          # per sequence: batch-invariant
    per_split = triton.cdiv(tiles, splits)
    shape = {"H": h, "D": d, "BLOCK_H": block_h, "BLOCK_D": max(16, triton.next_power_of_2(d))}
    run = {"num_warps": num_warps, "num_stages": num_stages}
    pipelined = q.is_cuda if pipelined is None else pipelined
    if splits == 1:
        _sparse_attention[(b * s, heads, 1)](q, kv, sink, idx, out, sink, sink, s, kv.shape[1], k, per_split,
                                             float(scale), **shape, BLOCK_K=block_k,
                                             IEEE=q.dtype == torch.float32, PARTIAL=False, PIPELINED=pipelined,
                                             LSE=False, **run)
        return out
    part = torch.empty(b * s, splits, h, d, dtype=torch.float32, device=q.device)
    m, l_i = (torch.empty(b * s, splits, h, dtype=torch.float32, device=q.device) for _ in range(2))
    _sparse_attention[(b * s, heads, splits)](q, kv, sink, idx, part, m, l_i, s, kv.shape[1], k, per_split,
                                              float(scale), **shape, BLOCK_K=block_k,
                                              IEEE=q.dtype == torch.float32, PARTIAL=True, PIPELINED=pipelined,
                                              LSE=False, **run)
    _combine[(b * s, heads)](part, m, l_i, sink, out, splits, **shape, num_warps=num_warps)
    return out
