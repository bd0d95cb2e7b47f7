"""The finite-logits check over the vocabulary, reduced per row chunk first.

A decode step of batch 1 checks one row of 129,280 logits (`isfinite(...).all()`, then a device read). torch runs
a reduction with a single output in one thread block (15 us of a 1.63 ms H200 step in
bench/results/h200_s15_checks/profile.log); here the row is first reduced in chunks (one block each), then the
chunk results. Measured on an H100 with its device read, eager as the engine calls it
(bench/results/h100_s23/call2/rowwise.json): batch 1 66.1 -> 59.7 us, batch 8 and 64 unchanged.
The same split for the greedy argmax (first maximum per chunk, then the first chunk holding the row maximum)
was measured and dropped: its five eager launches cost more than the single-block kernel they replace (54 vs
35 us at batch 1, the host's launches being exposed after the check's device read). It is back
(`engine/sampling.argmax_rows`), and the decode step now reads this check with the sampled ids (`finite_flag`),
so those launches queue behind the replay.
"""

from __future__ import annotations

import torch

NON_FINITE = "non-finite logits (NaN/inf): the weights or inputs are broken"    # the error's one wording
MIN_CHUNK = 512          # elements per first-stage chunk: below this the second stage costs more than it saves
MAX_CHUNKS = 128         # chunks per row: enough blocks to fill the GPU at batch 1


def chunks_for(length: int) -> int:
    """Chunks per row for a reduction over `length` elements: the largest power of two <= MAX_CHUNKS that divides
    `length` and leaves chunks of at least MIN_CHUNK elements; 1 (no split) if none does."""
    c = MAX_CHUNKS
    while c > 1 and (length % c or length // c < MIN_CHUNK):
        c //= 2
    return c


def finite_flag(x: torch.Tensor) -> torch.Tensor:
    """torch.isfinite(x).all() as a 0-d bool tensor on x's device, reduced per row chunk first; no device read, so
    the caller can read it together with other results (the engine's decode step: with the sampled ids)."""
    c = chunks_for(x.shape[-1]) if x.dim() else 1
    if c == 1:
        return torch.isfinite(x).all()
    return torch.isfinite(x).reshape(-1, x.shape[-1] // c).all(-1).all()


def all_finite(x: torch.Tensor) -> bool:
    """bool(torch.isfinite(x).all()) (reads the device: a sync), reduced per row chunk first."""
    return bool(finite_flag(x))
