"""The tile-major layout of FP4 expert weights: the stored bytes permuted once at load so each 64-row x 128-K tile
is one contiguous 4 KB run.

Why: at decode every FP4 expert kernel reads a program's weight tile as 16-128 rows, 64 bytes of each per 128-K
block. In the stored order ([..., N, K/2], rows 2 KB apart at Flash) each step touches one DRAM page per row for 64
bytes of it; the kernels measured at ~1.5-1.6 TB/s at batch 64 whatever their instruction counts. Over this
layout the split-K decode kernel went from 565 to 439 us a batch-64 call and from 145 to 112 us at batch 8 (H100,
bench/results/h100_s30, calls B and C).

Layout: a packed weight [..., N, K/2] becomes [..., N/64, K/128, 64, 64]: tile (t, b) holds rows 64t .. 64t + 63,
packed bytes 64b .. 64b + 63 (elements 128b .. 128b + 127) of each, row-major. The scales ([..., N, K/32] e8m0)
are not permuted. The extra dimensions name the layout: an FP4 weight of 4 or more dimensions is tile-major, so a
reader that does not know it fails on the shape instead of reading garbage. Byte (r, c) of the rows order sits at
`row_offset(r) + byte_offset(c)` (the Triton helpers `fp4_grouped._row_at` and `_byte_at` compute the same):
    row_offset(r) = (r // 64) * 64 * K/2 + (r % 64) * 64,    byte_offset(c) = (c // 64) * 4096 + c % 64.
Every FP4 kernel reads through those; the plain twins take `to_rows(w)` (a copy per call: the reference path may
dequantise per call).
"""

from __future__ import annotations

import torch

ROWS = 64                # weight rows per tile
BYTES = 64               # packed bytes per tile row: one 128-K block


def is_tiled(weight: torch.Tensor) -> bool:
    """Is this packed FP4 weight (one [N, K/2], a stack [E, N, K/2] or gathered pairs) in the tile-major layout?"""
    return weight.dim() >= 4


def can_tile(out_features: int, in_features: int) -> bool:
    """Whole tiles only: N a multiple of 64 and K of 128 (every FP4 expert of Flash and Pro; not every tiny model)."""
    return out_features % ROWS == 0 and in_features % (2 * BYTES) == 0


def rows_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The rows-order shape [..., N, K/2] of a packed weight in either layout."""
    if not is_tiled(weight):
        return tuple(weight.shape)
    *lead, tiles, blocks, rows, width = weight.shape
    if (rows, width) != (ROWS, BYTES):
        raise ValueError(f"tile-major FP4 weight {tuple(weight.shape)}: its last two dimensions must be "
                         f"({ROWS}, {BYTES})")
    return (*lead, tiles * ROWS, blocks * BYTES)


def tiled_view(weight: torch.Tensor) -> torch.Tensor:
    """Packed [..., N, K/2] (rows order) -> a strided view [..., N/64, K/128, 64, 64] of the same bytes, in the
    tile-major index order (copying it into a contiguous tensor makes the layout)."""
    if is_tiled(weight):
        raise ValueError(f"to_tiled: the weight {tuple(weight.shape)} is tile-major already")
    *lead, n, half = weight.shape
    if not can_tile(n, 2 * half):
        raise ValueError(f"to_tiled: weight [..., {n}, {half}] is not whole 64-row x 128-K tiles")
    return weight.reshape(*lead, n // ROWS, ROWS, half // BYTES, BYTES).transpose(-3, -2)


def to_tiled(weight: torch.Tensor) -> torch.Tensor:
    """Packed [..., N, K/2] (rows order) -> [..., N/64, K/128, 64, 64], contiguous (a new tensor)."""
    return tiled_view(weight).contiguous()


def to_rows(weight: torch.Tensor) -> torch.Tensor:
    """The rows-order packed weight [..., N, K/2]: `weight` itself if it is in that order, else a copy."""
    if not is_tiled(weight):
        return weight
    return weight.transpose(-3, -2).reshape(rows_shape(weight))


def out_features(weight: torch.Tensor) -> int:
    """N of a packed FP4 weight (either layout; the rows-order dimension -2)."""
    return rows_shape(weight)[-2]
