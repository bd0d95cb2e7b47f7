"""FP8 block weights: float8_e4m3fn values with one e8m0 scale per 128x128 block (spec §5.3).

The scale grid is [ceil(out/128), ceil(in/128)]; edge blocks are partial. Scales are powers of two, so
value * scale is exact in fp32 and the only rounding anywhere is the cast to e4m3 in `quant_fp8`.

NOTE: never cast float64 straight to e4m3: torch 2.13 converts float64 -> float8 through fp32, which double-rounds
(1.0625 + 2**-40 -> 1.0625 -> 1.0 instead of 1.125). `to_e4m3` rounds float64 to fp32 *to odd* first, which keeps
the sticky bit, so the one visible rounding is correct. Out-of-range fp32 values (even inf) saturate to +-448 on
CPU, but we clamp first and never rely on that.
"""

from __future__ import annotations

import torch

from dsv4.quant.e8m0 import e8m0_to_float, float_to_e8m0, pow2_ceil_scale

BLOCK = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4  # the reference's floor, so all-zero blocks get a finite scale


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for every input dtype except float64, which keeps its precision (so it is rounded only once)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 / float64 -> float8_e4m3fn, nearest-even; x must already be clamped to [-448, 448] (or NaN)."""
    if x.dtype == torch.float64:
        # Round to odd: truncate toward zero to fp32, then set the last bit if anything was dropped. fp32 keeps
        # more than e4m3's 4 + 2 bits, so rounding that to e4m3 gives the correctly rounded float64 result.
        y = x.float()
        inexact = (y.double() != x) & ~torch.isnan(x)
        bits = y.view(torch.int32) - (inexact & (y.double().abs() > x.abs())).to(torch.int32)
        x = torch.where(inexact, bits | 1, bits).view(torch.float32)
    return x.float().to(torch.float8_e4m3fn)


def grid_shape(out_features: int, in_features: int, block: int = BLOCK) -> tuple[int, int]:
    """Scale grid of a blocked weight: one entry per (partial) block x block tile."""
    return -(-out_features // block), -(-in_features // block)


def expand_blocks(scale: torch.Tensor, shape: torch.Size, rows: int, cols: int) -> torch.Tensor:
    """Broadcast a per-tile grid [..., R, C] to elementwise [..., out, in] (tiles rows x cols, cropped at edges)."""
    full = scale.repeat_interleave(rows, dim=-2).repeat_interleave(cols, dim=-1)
    return full[..., : shape[-2], : shape[-1]]


def tile_amax(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """max |x| per rows x cols tile of the last two dims of a float tensor -> [..., ceil(out/rows), ceil(in/cols)]."""
    out_f, in_f = x.shape[-2:]
    pad_r, pad_c = -out_f % rows, -in_f % cols
    a = torch.nn.functional.pad(x.abs(), (0, pad_c, 0, pad_r))  # zero padding never wins a max of |x|
    a = a.unflatten(-1, (-1, cols)).unflatten(-3, (-1, rows))  # [..., R, rows, C, cols]
    return a.amax(dim=(-3, -1))


def _check_scale_grid(weight: torch.Tensor, scale: torch.Tensor) -> None:
    assert weight.dim() >= 2, f"FP8 weight must be [..., out, in], got shape {tuple(weight.shape)}"
    expected = (*weight.shape[:-2], *grid_shape(*weight.shape[-2:]))
    assert tuple(scale.shape) == expected, (
        f"FP8 scale shape {tuple(scale.shape)} does not match weight {tuple(weight.shape)}: expected {expected}"
    )


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[i, j] = fp8[i, j] * 2**(e[i // 128, j // 128] - 127), returned in `dtype`.

    `scale` is e8m0 (or uint8 bytes); an fp32 scale grid is also accepted and used as is.
    """
    assert weight.dtype == torch.float8_e4m3fn, f"FP8 weight must be float8_e4m3fn, got {weight.dtype}"
    _check_scale_grid(weight, scale)
    s = scale if scale.dtype == torch.float32 else e8m0_to_float(scale)
    return (weight.float() * expand_blocks(s, weight.shape, BLOCK, BLOCK)).to(dtype)


def quant_fp8(w: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [..., out, in] -> (float8_e4m3fn [..., out, in], e8m0 scale grid [..., ceil(out/128), ceil(in/128)]).

    Per block: s = 2**ceil(log2(max(amax, 1e-4) / 448)), q = e4m3(clamp(w / s, -448, 448)), nearest-even.
    `check=False`: the same bytes without the scales' value check (a GPU sync).
    """
    assert w.is_floating_point() and w.dim() >= 2, f"quant_fp8 needs a float [..., out, in], got {w.dtype} {w.shape}"
    wf = w.to(work_dtype(w))
    s = pow2_ceil_scale(tile_amax(wf, BLOCK, BLOCK).clamp(min=AMAX_FLOOR), E4M3_MAX)
    q = (wf / expand_blocks(s, wf.shape, BLOCK, BLOCK)).clamp(-E4M3_MAX, E4M3_MAX)  # exact: s is a power of two
    return to_e4m3(q), float_to_e8m0(s, check)
