"""RMSNorm and the format-aware Linear (spec §2.1, §2.2).

Parameter names equal checkpoint names: a quantised Linear owns `weight` and `scale`, exactly as stored.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv4 import ops
from dsv4.ops.ref import mean_square, widen

FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class RMSNorm(nn.Module):
    """y = w * x * rsqrt(mean(x^2) + eps) in fp32, cast back to x's dtype; w is held in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = widen(x)
        xf = xf * torch.rsqrt(mean_square(xf) + self.eps)
        return (self.weight * xf).to(x.dtype)


class Linear(nn.Module):
    """y = x @ W^T, no bias. `fmt`: "fp8" (e4m3 + 128x128 e8m0 scales), "fp4" (packed e2m1 + per-32
    e8m0 scales) or "plain" (`dtype`). Quantised formats quantise their input to FP8 per 128 when
    `quant_emulation` is on (spec §4.3 item 1); with it off they compute with the dequantised weight.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.quant_emulation = True
        if fmt == "fp8":
            self.weight = _frozen(torch.empty(out_features, in_features, dtype=FP8))
            blocks = (math.ceil(out_features / 128), math.ceil(in_features / 128))
            self.scale = _frozen(torch.empty(blocks, dtype=E8M0))
        elif fmt == "fp4":
            self.weight = _frozen(torch.empty(out_features, in_features // 2, dtype=torch.int8))
            self.scale = _frozen(torch.empty(out_features, in_features // 32, dtype=E8M0))
        elif fmt == "plain":
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
            self.scale = None
        else:
            raise ValueError(f"unknown weight format {fmt!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act_quant_on = self.quant_emulation and self.fmt != "plain"
        return ops.linear(x, self.weight, self.scale, self.fmt, act_quant_on, self._cached_dequantized())

    def dequantized(self) -> torch.Tensor:
        return ops.dequant_weight(self.weight, self.scale, self.fmt)

    def weight_value(self) -> torch.Tensor:
        """The weight `forward` multiplies by: as stored (plain), else decoded (the CPU cache when there is one)."""
        if self.fmt == "plain":
            return self.weight
        cached = self._cached_dequantized()
        return cached if cached is not None else self.dequantized()

    def _cached_dequantized(self) -> torch.Tensor | None:
        """The fp32 weight, decoded once, for the plain path on CPU (decoding FP8/FP4 every call made a tiny
        model's decode step 10x slower). Never on accelerators: there the cache would cost 2-4x the weight
        memory and the fast kernels read the stored format. Keyed on the tensors' versions, so writes show.
        Not under torch.compile (the compiled graph decodes in place)."""
        if self.fmt == "plain" or self.weight.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        key = (self.weight._version, self.scale._version, self.weight.data_ptr())
        if getattr(self, "_deq_key", None) != key:
            self._deq, self._deq_key = self.dequantized(), key
        return self._deq

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, {self.fmt}"


class BlockDiagLinear(Linear):
    """`groups` linears of in_features -> out_features / groups in one weight [out_features, in_features], held as
    stored like `Linear`'s: x [..., G, K] -> [..., G, R], group g times weight rows g*R..(g+1)*R (a block-diagonal
    linear). Attention's `wo_a` (spec §3.4): FP8 on disk with 128x128 scales whose row blocks run across the
    groups as stored; held so, once (inference holds each weight in its checkpoint format), where the reference
    holds a dequantised bf16 copy: the values are the same (an e4m3 value times a power-of-two scale is exact in
    bf16). NOTE: never act-quantised, whatever `quant_emulation` says: the reference runs wo_a as a bf16 einsum."""

    def __init__(self, in_features: int, out_features: int, fmt: str, dtype: torch.dtype, groups: int):
        if out_features % groups:
            raise ValueError(f"{out_features} output features do not split into {groups} groups")
        super().__init__(in_features, out_features, fmt, dtype)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.block_diag_linear(x, self.weight, self.scale, self.fmt, self._cached_dequantized())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.groups} groups"


class Head(Linear):
    """The LM head: stored bf16; logits are an fp32 product (spec §3.1). A bf16 model holds it as stored (bf16,
    once: the twin upcasts per call, the fast path multiplies the bf16 weight directly); fp32 / float64 models
    (CPU reference, training masters) hold it in fp32, where training updates it."""

    def __init__(self, dim: int, vocab_size: int, dtype: torch.dtype = torch.float32):
        super().__init__(dim, vocab_size, "plain", torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the final hidden state y [..., D] (computed in y's model dtype)."""
        return ops.logits(y, self.weight)


def weight_formats(cfg) -> tuple[str, str]:
    """(format of the FP8-class linears, format of the routed experts) for a config."""
    dense = "fp8" if cfg.dtype == "fp8" else "plain"
    expert = {"fp4": "fp4", "fp8": "fp8", None: dense}[cfg.expert_dtype]
    return dense, expert
