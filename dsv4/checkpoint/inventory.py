"""Every tensor of an official DeepSeek-V4 checkpoint, computed from the config alone (spec §5.1, §5.2).

Nothing is allocated: the answer is a dict name -> `TensorSpec` (shape + safetensors dtype string), in
forward order: `embed`, the blocks `layers.N.*`, the MTP blocks `mtp.N.*`, then `hc_head_*`, `norm`, `head`.
Quantised linears contribute two entries, `.weight` and its `.scale`; the storage format follows
`cfg.dtype` (dense linears) and `cfg.expert_dtype` (routed experts; None means "same as dtype").
NOTE: some linears are never quantised on disk whatever the config (compressor wkv/wgate, indexer
weights_proj, gate), and `attn.wo_a` is stored FP8 even though the reference runs it in bf16.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dsv4.config import ModelConfig

# safetensors dtype string -> torch dtype. Ordered like the safetensors `Dtype` enum: its serializer lays
# tensors out by descending enum rank, which `synth` mimics to keep every offset naturally aligned.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

FP8_BLOCK = 128  # FP8 weights: one e8m0 scale per 128x128 block
FP4_BLOCK = 32   # FP4 weights: one e8m0 scale per 32 consecutive inputs of a row


@dataclass(frozen=True)
class TensorSpec:
    """Shape and on-disk dtype of one checkpoint tensor."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self):
        if type(self.shape) is not tuple:
            object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"unknown safetensors dtype {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


Entries = Iterator[tuple[str, TensorSpec]]


def dense_format(cfg: ModelConfig) -> str:
    """Storage format of the quantisable non-expert linears: "fp8" or "bf16"."""
    return "fp8" if cfg.dtype == "fp8" else "bf16"


def expert_format(cfg: ModelConfig) -> str:
    """Storage format of the routed experts: "fp4", "fp8" or "bf16"."""
    return cfg.expert_dtype or dense_format(cfg)


def inventory(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """name -> TensorSpec for every tensor of the official checkpoint of `cfg`, in forward order."""
    out = dict(_bf16("embed.weight", cfg.vocab_size, cfg.dim))
    for i in range(cfg.n_layers):
        out.update(_block(cfg, i, f"layers.{i}."))
    for j in range(cfg.n_mtp_layers):
        out.update(_mtp(cfg, cfg.n_layers + j, f"mtp.{j}."))
    out.update(_hc_head(cfg, ""))
    out.update(_bf16("norm.weight", cfg.dim))
    out.update(_bf16("head.weight", cfg.vocab_size, cfg.dim))
    return out


# ---------------------------------------------------------------------------------------------- leaves
def _bf16(name: str, *shape: int) -> Entries:
    yield name, TensorSpec(shape, "BF16")


def _f32(name: str, *shape: int) -> Entries:
    yield name, TensorSpec(shape, "F32")


def _linear(name: str, out_features: int, in_features: int, fmt: str) -> Entries:
    """`name.weight` (+ `name.scale`) of an [out, in] linear stored as `fmt`."""
    if fmt == "fp8":
        yield f"{name}.weight", TensorSpec((out_features, in_features), "F8_E4M3")
        blocks = (math.ceil(out_features / FP8_BLOCK), math.ceil(in_features / FP8_BLOCK))
        yield f"{name}.scale", TensorSpec(blocks, "F8_E8M0")
    elif fmt == "fp4":
        # Two e2m1 codes per int8 along the input dim.
        yield f"{name}.weight", TensorSpec((out_features, in_features // 2), "I8")
        yield f"{name}.scale", TensorSpec((out_features, in_features // FP4_BLOCK), "F8_E8M0")
    else:
        yield from _bf16(f"{name}.weight", out_features, in_features)


def _hc(cfg: ModelConfig, prefix: str, n_mix: int, n_scales: int) -> Entries:
    """mHC parameters: fn [n_mix, hc*dim], base [n_mix], scale [n_scales] (spec §3.3)."""
    yield from _f32(f"{prefix}_fn", n_mix, cfg.hc_mult * cfg.dim)
    yield from _f32(f"{prefix}_base", n_mix)
    yield from _f32(f"{prefix}_scale", n_scales)


def _hc_head(cfg: ModelConfig, prefix: str) -> Entries:
    yield from _hc(cfg, f"{prefix}hc_head", cfg.hc_mult, 1)


# ---------------------------------------------------------------------------------------------- blocks
def _block(cfg: ModelConfig, layer_id: int, p: str) -> Entries:
    yield from _hc(cfg, f"{p}hc_attn", cfg.hc_mix, 3)
    yield from _bf16(f"{p}attn_norm.weight", cfg.dim)
    yield from _attention(cfg, layer_id, f"{p}attn.")
    yield from _hc(cfg, f"{p}hc_ffn", cfg.hc_mix, 3)
    yield from _bf16(f"{p}ffn_norm.weight", cfg.dim)
    yield from _moe(cfg, layer_id, f"{p}ffn.")


def _mtp(cfg: ModelConfig, layer_id: int, p: str) -> Entries:
    """An MTP block: its own input norms and projections around a full (sliding, non-hash) block."""
    yield from _bf16(f"{p}enorm.weight", cfg.dim)
    yield from _bf16(f"{p}hnorm.weight", cfg.dim)
    yield from _linear(f"{p}e_proj", cfg.dim, cfg.dim, dense_format(cfg))
    yield from _linear(f"{p}h_proj", cfg.dim, cfg.dim, dense_format(cfg))
    yield from _block(cfg, layer_id, p)
    yield from _hc_head(cfg, p)
    yield from _bf16(f"{p}norm.weight", cfg.dim)


def _attention(cfg: ModelConfig, layer_id: int, p: str) -> Entries:
    fmt = dense_format(cfg)
    yield from _linear(f"{p}wq_a", cfg.q_lora_rank, cfg.dim, fmt)
    yield from _bf16(f"{p}q_norm.weight", cfg.q_lora_rank)
    yield from _linear(f"{p}wq_b", cfg.n_heads * cfg.head_dim, cfg.q_lora_rank, fmt)
    yield from _linear(f"{p}wkv", cfg.head_dim, cfg.dim, fmt)
    yield from _bf16(f"{p}kv_norm.weight", cfg.head_dim)
    ratio = cfg.compress_ratios[layer_id]
    if ratio:
        yield from _compressor(cfg, ratio, cfg.head_dim, f"{p}compressor.")
    if ratio == 4:
        yield from _indexer(cfg, ratio, f"{p}indexer.")
    yield from _f32(f"{p}attn_sink", cfg.n_heads)
    # wo_a is grouped: each of o_groups groups maps its heads' outputs to o_lora_rank.
    yield from _linear(f"{p}wo_a", cfg.o_groups * cfg.o_lora_rank, cfg.n_heads * cfg.head_dim // cfg.o_groups, fmt)
    yield from _linear(f"{p}wo_b", cfg.dim, cfg.o_groups * cfg.o_lora_rank, fmt)


def _compressor(cfg: ModelConfig, ratio: int, width: int, p: str) -> Entries:
    # Ratio-4 compressors use overlapping windows and project to two halves (2 * width).
    coff = 2 if ratio == 4 else 1
    yield from _linear(f"{p}wkv", coff * width, cfg.dim, "bf16")
    yield from _linear(f"{p}wgate", coff * width, cfg.dim, "bf16")
    yield from _f32(f"{p}ape", ratio, coff * width)
    yield from _bf16(f"{p}norm.weight", width)


def _indexer(cfg: ModelConfig, ratio: int, p: str) -> Entries:
    yield from _linear(f"{p}wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank, dense_format(cfg))
    yield from _linear(f"{p}weights_proj", cfg.index_n_heads, cfg.dim, "bf16")
    yield from _compressor(cfg, ratio, cfg.index_head_dim, f"{p}compressor.")


def _moe(cfg: ModelConfig, layer_id: int, p: str) -> Entries:
    yield from _bf16(f"{p}gate.weight", cfg.n_routed_experts, cfg.dim)
    if cfg.is_hash_layer(layer_id):
        yield f"{p}gate.tid2eid", TensorSpec((cfg.vocab_size, cfg.n_activated_experts), "I64")
    else:
        yield from _f32(f"{p}gate.bias", cfg.n_routed_experts)
    # Every routed expert has the same specs: build them once (Pro has 23k experts) and reuse the objects.
    template = list(_expert(cfg, "", expert_format(cfg)))
    for e in range(cfg.n_routed_experts):
        yield from ((f"{p}experts.{e}.{name}", spec) for name, spec in template)
    yield from _expert(cfg, f"{p}shared_experts.", dense_format(cfg))


def _expert(cfg: ModelConfig, p: str, fmt: str) -> Entries:
    # w1 = gate proj, w2 = down proj, w3 = up proj (SwiGLU).
    yield from _linear(f"{p}w1", cfg.moe_inter_dim, cfg.dim, fmt)
    yield from _linear(f"{p}w2", cfg.dim, cfg.moe_inter_dim, fmt)
    yield from _linear(f"{p}w3", cfg.moe_inter_dim, cfg.dim, fmt)
