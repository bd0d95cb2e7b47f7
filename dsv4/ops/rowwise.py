"""Reductions over the vocabulary for few rows: the argmax of greedy decoding and the finite-logits check.

A decode step of batch 1 reduces one row of 129,280 logits twice (the argmax, and `isfinite(...).all()`).
torch runs a reduction with a single output in one thread block: on an H200 the argmax took 28 us and the check
15 us of a 1.63 ms step (bench/results/h200_s15_checks/profile.log), ~50x the time their 0.5 MB need. Both are
split here into a first stage over chunks of the row (one block per chunk) and a second over the chunk results.
The results are exactly torch's: the argmax is the FIRST index of the row's maximum (each chunk's max returns
its first maximum's index, and the argmax over the chunk maxima the first chunk that holds the row's maximum),
and a row with a NaN still yields a NaN's index, as torch.argmax does. Rows long enough to be worth it only;
shorter rows (and vocabularies without a suitable divisor) take torch's reduction itself, the twin.
"""

from __future__ import annotations

import torch

MIN_CHUNK = 512          # elements per first-stage chunk: below this the second stage costs more than it saves
MAX_CHUNKS = 128         # chunks per row: enough blocks to fill the GPU at batch 1


def chunks_for(length: int) -> int:
    """Chunks per row for a reduction over `length` elements: the largest power of two <= MAX_CHUNKS that divides
    `length` and leaves chunks of at least MIN_CHUNK elements; 1 (no split) if none does."""
    c = MAX_CHUNKS
    while c > 1 and (length % c or length // c < MIN_CHUNK):
        c //= 2
    return c


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) (the same indices), in two stages where the row is long enough to split."""
    length = x.shape[-1]
    c = chunks_for(length)
    if c == 1 or x.numel() == 0:
        return x.argmax(-1)
    width = length // c
    values, where = x.reshape(-1, c, width).max(-1)            # [rows, c]: each chunk's first maximum
    chunk = values.argmax(-1, keepdim=True)                    # [rows, 1]: the first chunk holding the row max
    return (chunk * width + where.gather(-1, chunk)).view(x.shape[:-1])


def all_finite(x: torch.Tensor) -> bool:
    """bool(torch.isfinite(x).all()) (reads the device: a sync), reduced per row chunk first."""
    c = chunks_for(x.shape[-1]) if x.dim() else 1
    if c == 1:
        return bool(torch.isfinite(x).all())
    return bool(torch.isfinite(x).reshape(-1, x.shape[-1] // c).all(-1).all())
