"""Two linears that read the same input, run as one call: attention's wq_a / wkv and the shared expert's w1 / w3 as
one FP8 linear, the compressors' wkv / wgate as one fp32-product GEMM (`ops.widened_dense`).

Why: at batch 1 an FP8 small-M call costs ~5 us beyond its bytes' time (launch, ramp, tail: the thirty-second
session's profile, 29 calls a 4-layer step, 261 us for ~90 us of bytes), and the compressors' GEMVs are cuBLAS
calls of a few us each plus their split-K reduces. Each pair reads the same x, so one call over both weights saves
a launch (and, for FP8, an act quant of x) per pair and layer: 8 FP8 calls and 3 GEMMs fewer in a 4-layer step,
predicted -50..-80 us at batch 1 (bench/NOTES.md, thirty-fifth session).
How: `pack_pairs(model)` (the loader, for a model on CUDA; DSV4_PAIRS=0 turns it off) copies each pair's weights
into one buffer, first's rows then second's, and their scales likewise, and makes the two parameters views of it:
the same names and values, one copy (issue 16: nothing held twice). FP8 needs first's rows in whole 128-row scale
blocks, so that the two scale grids stack. `paired` / `paired_widened` then run the op once over the buffer and
split its output; anywhere else (autograd, a pair never packed or since re-homed, a LoRA wrapper; the loader packs
on CUDA only) the two linears run as before. Training forgets the pairs before it re-homes weights
(`unpack_pairs`).
Arithmetic: FP8, the same act-quant codes of x (one quantisation per row and 128 block, as each linear's own) and the
same FP8 x FP8 products with fp32 sums per output; only the kernel's split plan sees the wider N, so the bits are
those of the FP8 linear's class (bf16 output, tests/test_fp8_linear.py), not the two calls' bits. Plain: the
fp32 products of `widened_dense`, another summation order (its fp32 class).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4 import ops
from dsv4.model.primitives import Linear


def can_pair(first: nn.Module, second: nn.Module) -> bool:
    """Two plain `Linear`s of one input width, one format and dtype, on one device: FP8 with first's rows in whole
    128-row scale blocks, or "plain" (the compressors' wkv / wgate, held in bf16 by a 16-bit model's loader)."""
    return (type(first) is Linear and type(second) is Linear and first.fmt == second.fmt in ("fp8", "plain")
            and first.in_features == second.in_features
            and (first.fmt == "plain" or first.out_features % 128 == 0)
            and first.weight.dtype == second.weight.dtype and first.weight.device == second.weight.device
            and not first.weight.is_meta)


def pack(first: Linear, second: Linear) -> bool:
    """Re-home the pair's weights (and scales) into one buffer each (the parameters become views of it)."""
    if not can_pair(first, second):
        return False
    n = first.out_features
    with torch.no_grad():
        w = _cat(first.weight, second.weight)
        s = None if first.scale is None else _cat(first.scale, second.scale)
    first.weight = nn.Parameter(w[:n], requires_grad=first.weight.requires_grad)
    second.weight = nn.Parameter(w[n:], requires_grad=second.weight.requires_grad)
    if s is not None:
        first.scale = nn.Parameter(s[: n // 128], requires_grad=False)
        second.scale = nn.Parameter(s[n // 128:], requires_grad=False)
    first._pair = (second, w, s)
    return True


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.cat([a, b]); 1-byte formats (e4m3, e8m0) through uint8 views: the bytes are what is copied, and no
    device needs a cat kernel for the float8 types."""
    if a.element_size() == 1:
        return torch.cat([a.view(torch.uint8), b.view(torch.uint8)]).view(a.dtype)
    return torch.cat([a, b])


def pack_pairs(model: nn.Module) -> int:
    """Pack every pair a module names in `PAIRS` (submodule paths). Returns how many were packed."""
    packed = 0
    for module in model.modules():
        for a, b in getattr(module, "PAIRS", ()):
            packed += pack(module.get_submodule(a), module.get_submodule(b))
    return packed


def unpack_pairs(model: nn.Module) -> None:
    """Forget every packed pair (training re-homes weights: the buffers would be held beside the new ones). The
    parameters stay views of the buffers until replaced, so nothing is copied here."""
    for module in model.modules():
        module.__dict__.pop("_pair", None)


def _packed(first: nn.Module, second: nn.Module, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, scale) of the packed pair of format `fmt`, or None where it is not packed (e.g. a LoRA wrapper) or
    no longer holds their weights."""
    pair = getattr(first, "_pair", None)
    if (pair is None or pair[0] is not second or first.fmt != fmt
            or first.quant_emulation != second.quant_emulation):
        return None
    _, w, s = pair
    # still views of the buffers (a weight re-assigned since, e.g. by `.to()` or training, leaves them stale); not
    # checkable in a torch.compile trace (data pointers), where the trace follows the eager step's layout
    if torch.compiler.is_compiling():
        return w, s
    views = _views_of(w, first.weight, second.weight) and (s is None or _views_of(s, first.scale, second.scale))
    return (w, s) if views else None


def _views_of(buffer: torch.Tensor, *params: torch.Tensor) -> bool:
    storage = buffer.untyped_storage().data_ptr()
    return all(p.untyped_storage().data_ptr() == storage for p in params)


def _split(y: torch.Tensor, first: Linear, second: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(y.split([first.out_features, second.out_features], dim=-1))


def paired(first: nn.Module, second: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first(x), second(x)): one FP8 call over a packed pair without autograd, else the two calls."""
    pair = None if torch.is_grad_enabled() else _packed(first, second, "fp8")
    if pair is None:
        return first(x), second(x)
    return _split(ops.linear(x, *pair, "fp8", first.quant_emulation, None), first, second)


def paired_widened(first: Linear, second: Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(widened_dense(x, first.weight), widened_dense(x, second.weight)), the fp32 products of the compressors'
    projections: one call over a packed plain pair without autograd, else the two calls."""
    pair = None if torch.is_grad_enabled() else _packed(first, second, "plain")
    if pair is None:
        return ops.widened_dense(x, first.weight), ops.widened_dense(x, second.weight)
    return _split(ops.widened_dense(x, pair[0]), first, second)
