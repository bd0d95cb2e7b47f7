"""The sum of a split-K kernel's fp32 partials [split, ...] as the traced caller computes it.

In split order, one add at a time: the bits of `ops/triton/splitk._sum_splits` (before its rounding), and the same
bits eagerly and under torch.compile, which unrolls a reduction of up to 8 elements into these pointwise adds and
fuses them into the consumer. `torch.sum(0)` would not do: its order is the reduction kernel's, which may change
with the tensor's size (a row's bits would then depend on its batch).
"""

from __future__ import annotations

import torch


def sum_splits(part: torch.Tensor) -> torch.Tensor:
    """part [split, ...] -> [...]: ((p0 + p1) + p2) + ..."""
    acc = part[0]
    for k in range(1, part.shape[0]):
        acc = acc + part[k]
    return acc
