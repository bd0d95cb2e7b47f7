"""Turning a loaded inference model into a trainable one, as module transforms (the model code is unchanged).

* full: every FP8/FP4 `Linear` becomes a `TrainLinear` holding its dequantised weight as a trainable parameter in
  the model's compute dtype. It keeps `fmt`, so `Linear.forward` still quantises activations per 128 when the QAT
  emulation is on, and the saver knows to re-quantise it; with `qat=True` the forward also sees the weight
  rounded to its storage format (straight-through gradient), i.e. exactly what the saved checkpoint computes.
  Attention's FP8 `wo_a` (`BlockDiagLinear`) likewise becomes a `TrainBlockDiagLinear`: its forward never quantises
  activations (the reference has no act quant on wo_a), and with `qat=True` its weight is rounded to FP8 like the
  other FP8 weights (it is saved FP8, and inference decodes exactly those values).
* lora: the base stays frozen as stored; chosen linears get `LoRALinear` adapters y += (x A^T B^T) * alpha/r,
  B zero-initialised so training starts at the base model.
Never trained: the indexer (its top-k selection has no gradient; DeepSeek trains it with a separate KL loss),
`tid2eid`, and the gate `bias` (moved by the optional load-balancing update, not by gradients).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from dsv4.model.pairs import unpack_pairs
from dsv4.model.primitives import BlockDiagLinear, Linear
from dsv4.quant import dequant_fp8, fp4_roundtrip, quant_fp8
from dsv4.quant.act import straight_through

LORA_TARGETS = {
    "attn": ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b"),
    "shared": ("shared_experts.w1", "shared_experts.w2", "shared_experts.w3"),
    "experts": ("experts.",),
}


def storage_roundtrip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w rounded to its checkpoint format (FP8 128x128 / FP4 per 32, e8m0 scales) and back, in w's dtype.
    Without the encoders' value checks: each is a GPU sync (~12 a training step), the scales are powers of two and
    the codes 0..15 by construction, and a NaN weight (which they would refuse) makes a NaN loss, which the trainer
    refuses before any optimizer step."""
    if fmt == "fp8":
        return dequant_fp8(*quant_fp8(w.detach(), check=False), w.dtype)
    if fmt == "fp4":
        return fp4_roundtrip(w.detach())  # = dequant_fp4(*quant_fp4(w, check=False), w.dtype), bit for bit
    return w


class TrainLinear(Linear):
    """A quantised-format Linear with a trainable dequantised weight (`fmt` stays the storage format)."""

    def __init__(self, src: Linear, dtype: torch.dtype, qat: bool):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.fmt = src.in_features, src.out_features, src.fmt
        self.quant_emulation, self.qat = src.quant_emulation, qat
        self.weight = nn.Parameter(src.dequantized().to(dtype))
        self.scale = None

    def dequantized(self) -> torch.Tensor:
        if not self.qat:
            return self.weight
        return straight_through(self.weight, self.roundtrip())

    def roundtrip(self) -> torch.Tensor:
        """The weight rounded to its storage format: the one `refresh_qat` left, while the weight is unchanged.
        NOTE: under torch.compile the version check is skipped (Dynamo cannot guard on `_version`: a graph break
        per linear); the trainer keeps the contract instead: `forget_qat` before the optimizer writes."""
        cached = getattr(self, "_roundtrip", None)
        if cached is not None and cached[1] is self.weight and (torch.compiler.is_compiling()
                                                                or cached[0] == self.weight._version):
            return cached[2]
        return storage_roundtrip(self.weight, self.fmt)

    def _cached_dequantized(self) -> torch.Tensor:
        return self.dequantized()

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, trainable (stored {self.fmt}), qat={self.qat}"


class TrainBlockDiagLinear(TrainLinear, BlockDiagLinear):
    """A quantised-format `BlockDiagLinear` (wo_a) with a trainable dequantised weight: `BlockDiagLinear.forward`
    (no act quant) on `TrainLinear`'s weight (rounded to FP8 under QAT)."""

    def __init__(self, src: BlockDiagLinear, dtype: torch.dtype, qat: bool):
        super().__init__(src, dtype, qat)
        self.groups = src.groups

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.groups} groups"


def refresh_qat(model: nn.Module) -> int:
    """Round every QAT `TrainLinear`'s weight to its storage format in one batched call per (format, shape) and
    keep the result on the module until the weight changes (its autograd version counter moves). Returns how many
    weights were rounded.

    Why: rounding is ~200 small kernels per weight (exact e8m0 exponent arithmetic); the built-in model has ~200
    quantised weights, so a per-weight, per-forward rounding was most of a GPU training step's ~60k kernel launches.
    Batched, it is ~10 calls per optimizer step, bit-identical (quant_fp8/quant_fp4 work per matrix on [..., out, in]).
    """
    groups = defaultdict(list)
    for m in model.modules():
        if isinstance(m, TrainLinear) and m.qat:
            groups[(m.fmt, tuple(m.weight.shape), m.weight.dtype, m.weight.device)].append(m)
    with torch.no_grad():
        for (fmt, *_), mods in groups.items():
            rounded = storage_roundtrip(torch.stack([m.weight.detach() for m in mods]), fmt)
            for m, r in zip(mods, rounded.unbind(0), strict=True):
                m._roundtrip = (m.weight._version, m.weight, r)
    return sum(len(v) for v in groups.values())


def forget_qat(model: nn.Module) -> None:
    """Drop what `refresh_qat` kept (the trainer does so before the optimizer moves the weights)."""
    for m in model.modules():
        if isinstance(m, TrainLinear):
            m._roundtrip = None


class LoRALinear(nn.Module):
    """base(x) + (x @ A^T @ B^T) * alpha / rank, base frozen; `lora_A`/`lora_B` in fp32."""

    def __init__(self, base: Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return self.base(x) + (delta * self.scaling).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _frozen_by_design(name: str) -> bool:
    return ".indexer." in name or name.endswith("tid2eid") or name.endswith("gate.bias")


def prepare_full(model: nn.Module, qat: bool = False) -> nn.Module:
    """Full fine-tuning: dequantise FP8/FP4 linears to trainable weights, widen the weights the loader held in bf16
    to the fp32 their modules train in; train everything but the indexer."""
    unpack_pairs(model)                   # its weights are re-homed below: the packed buffers would stay beside
    widen_held_bf16(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear) and m.fmt != "plain" and not isinstance(m, TrainLinear):
            cls = TrainBlockDiagLinear if isinstance(m, BlockDiagLinear) else TrainLinear
            _replace(model, name, cls(m, model.dtype, qat))
    for name, p in model.named_parameters():
        p.requires_grad_(p.is_floating_point() and not _frozen_by_design(name))
    return model


def widen_held_bf16(model: nn.Module) -> nn.Module:
    """fp32 parameters again for the bf16-stored matrices a 16-bit model's loader held as stored (`loader`'s
    `_held_bf16`): the same values, updated in fp32 by training."""
    for name in getattr(model, "held_bf16", ()):
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(parent)
        setattr(module, leaf, nn.Parameter(getattr(module, leaf).detach().float()))
    model.held_bf16 = ()
    return model


def prepare_lora(model: nn.Module, rank: int, alpha: float | None = None,
                 targets: tuple[str, ...] = ("attn", "shared")) -> nn.Module:
    """LoRA: freeze the model, wrap the target linears (`LORA_TARGETS` groups) with adapters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {sorted(LORA_TARGETS)}")
    model.requires_grad_(False)
    patterns = [p for t in targets for p in LORA_TARGETS[t]]
    names = [n for n, m in model.named_modules() if isinstance(m, Linear) and ".indexer." not in n
             and any(p in n for p in patterns)]
    if not names:
        raise ValueError(f"no linear matches the LoRA targets {targets}")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha or 2.0 * rank))
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{module}.lora_A` / `.lora_B` of every adapter (checkpoint names of the wrapped linear)."""
    return {n.replace(".base", ""): p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
