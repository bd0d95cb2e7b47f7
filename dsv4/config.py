"""Model configuration: one frozen dataclass built from either official config file.

Field names follow the reference's `ModelArgs` (`inference/config.json`); `from_hf` maps the Hugging Face
`config.json` keys onto them (spec §1.2). Every consistency rule the model relies on is checked in
`__post_init__`, so a bad config fails at construction with one message naming every offending field.

Reading a file is strict about what shapes the model and lenient about bookkeeping:
* a `REQUIRED` key missing from the file is an error. NOTE: the dataclass defaults are Flash's values, so
  without this a half-written config would silently build Flash-sized pieces;
* keys the model does not read (`architectures`, `torch_dtype`, the reference's `max_batch_size`, ...) are
  ignored, and HF keys with a single valid V4 value (`num_key_value_heads` 1, `attention_bias` false, ...) are
  checked;
* any other key is ignored with a `UserWarning` naming it: HF tooling adds metadata freely, but an unknown key
  may also be an architecture change this package does not implement (e.g. the V4.1 configs of spec §9).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

LayerKind = Literal["sliding", "csa", "hca"]

# HF config.json key -> ModelArgs field (spec §1.2). Fields absent here have the same name in both files,
# except the rope_scaling ones and the storage formats (from `quantization_config`).
HF_TO_ARGS = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hash_layers": "n_hash_layers",
    "num_experts_per_tok": "n_activated_experts",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "qk_rope_head_dim": "rope_head_dim",
    "sliding_window": "window_size",
    "rms_norm_eps": "norm_eps",
    "num_nextn_predict_layers": "n_mtp_layers",
}
ROPE_SCALING_TO_ARGS = {
    "original_max_position_embeddings": "original_seq_len",
    "factor": "rope_factor",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
}
# Set by both official files; the rest (eps values, MTP depth, token ids, formats, max_seq_len) default to the
# reference's values when absent.
REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "rope_head_dim", "q_lora_rank", "o_lora_rank",
            "o_groups", "window_size", "compress_ratios", "rope_theta", "compress_rope_theta", "rope_factor",
            "original_seq_len", "beta_fast", "beta_slow", "index_n_heads", "index_head_dim", "index_topk",
            "n_routed_experts", "n_shared_experts", "n_activated_experts", "moe_inter_dim", "score_func",
            "route_scale", "n_hash_layers", "swiglu_limit", "hc_mult", "hc_sinkhorn_iters")
# HF keys whose only valid V4 value is fixed: checked, not stored.
HF_FIXED = {"model_type": "deepseek_v4", "num_key_value_heads": 1, "attention_bias": False, "hidden_act": "silu",
            "tie_word_embeddings": False, "topk_method": "noaux_tc", "norm_topk_prob": True}
# Keys the model does not read. HF `dtype`/`torch_dtype` name the torch dtype of unquantised tensors, not the
# reference's `dtype` storage switch (that one comes from `quantization_config`).
HF_IGNORED = {"architectures", "attention_dropout", "initializer_range", "max_position_embeddings", "torch_dtype",
              "dtype", "transformers_version", "use_cache", "_name_or_path", "auto_map", "pad_token_id"}
ARGS_IGNORED = {"max_batch_size"}
# Integer fields that may be 0; every other integer field must be >= 1.
NON_NEGATIVE = {"n_hash_layers", "n_mtp_layers", "original_seq_len", "bos_token_id", "eos_token_id"}


class ConfigError(ValueError):
    """An inconsistent or unsupported model configuration."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    o_groups: int = 8
    window_size: int = 128
    compress_ratios: tuple[int, ...] = field(default=(0, 0) + (4, 128) * 20 + (4, 0))
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    n_hash_layers: int = 3
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    n_mtp_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    # Storage formats of the checkpoint: "fp8" = FP8 e4m3 128x128 blocks for the quantised linears
    # ("bf16" = plain); expert_dtype "fp4" = packed e2m1 per-32 scales, "fp8" = re-encoded 128x128 blocks.
    dtype: str = "fp8"
    expert_dtype: str | None = "fp4"
    scale_fmt: str = "ue8m0"
    # Longest sequence the RoPE tables are built for; the reference default is 4096 (spec §8.13).
    max_seq_len: int = 4096

    # ------------------------------------------------------------------ checks
    def __post_init__(self):
        # Later checks do arithmetic on the values, so each stage runs only if the previous one passed.
        problems = list(_type_problems(self))
        if not problems:
            object.__setattr__(self, "compress_ratios", tuple(self.compress_ratios))
            for f in dataclasses.fields(self):
                if f.type == "float":
                    object.__setattr__(self, f.name, float(getattr(self, f.name)))
            problems = list(self._range_problems())
        if not problems:
            problems = list(self._problems())
        if problems:
            raise ConfigError("invalid DeepSeek-V4 config: " + "; ".join(problems))

    def _range_problems(self):
        for f in dataclasses.fields(self):
            value, low = getattr(self, f.name), 0 if f.name in NON_NEGATIVE else 1
            if f.type == "int" and value < low:
                yield f"{f.name}={value} must be >= {low}"
        # RoPE bases enter log(base) in YaRN's correction range, so they must exceed 1.
        floats = {"rope_theta": 1.0, "compress_rope_theta": 1.0, "rope_factor": 0.0, "route_scale": 0.0,
                  "hc_eps": 0.0, "norm_eps": 0.0}
        for name, low in floats.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and value > low):
                yield f"{name}={value} must be a finite number > {low:g}"
        if not (math.isfinite(self.swiglu_limit) and self.swiglu_limit >= 0):
            yield f"swiglu_limit={self.swiglu_limit} must be >= 0 (0 turns the clamp off)"

    def _problems(self):
        want = self.n_layers + self.n_mtp_layers
        if len(self.compress_ratios) != want:
            yield (f"compress_ratios has {len(self.compress_ratios)} entries, "
                   f"expected n_layers + n_mtp_layers = {want}")
        bad = sorted({r for r in self.compress_ratios if r not in (0, 4, 128)})
        if bad:
            yield f"compress_ratios may only contain 0, 4 and 128, got {bad}"
        if self.n_mtp_layers and self.compress_ratios[self.n_layers:] != (0,) * self.n_mtp_layers:
            yield "compress_ratios: the MTP entries (after the first n_layers) must be 0 (sliding window only)"
        if self.n_heads % self.o_groups:
            yield f"n_heads={self.n_heads} is not divisible by o_groups={self.o_groups}"
        if not self.rope_head_dim < self.head_dim or self.rope_head_dim % 2:
            yield f"rope_head_dim={self.rope_head_dim} must be even and smaller than head_dim={self.head_dim}"
        if (self.head_dim - self.rope_head_dim) % 64:
            yield "head_dim - rope_head_dim must be a multiple of 64 (FP8 KV fake-quant block)"
        if self.index_head_dim & (self.index_head_dim - 1) or self.index_head_dim % 32:
            yield f"index_head_dim={self.index_head_dim} must be a power of two >= 32 (Hadamard, FP4 block 32)"
        if self.index_head_dim <= self.rope_head_dim:
            yield f"index_head_dim={self.index_head_dim} must exceed rope_head_dim={self.rope_head_dim}"
        if self.n_activated_experts > self.n_routed_experts:
            yield (f"n_activated_experts={self.n_activated_experts} exceeds "
                   f"n_routed_experts={self.n_routed_experts}")
        if self.n_shared_experts != 1:
            yield f"n_shared_experts must be 1 (got {self.n_shared_experts})"
        if self.n_hash_layers > self.n_layers:
            yield f"n_hash_layers={self.n_hash_layers} exceeds n_layers={self.n_layers}"
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                yield f"{name}={getattr(self, name)} is outside the vocabulary (vocab_size={self.vocab_size})"
        yield from self._format_problems()
        yield from self._block_problems()

    def _format_problems(self):
        if self.score_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            yield f"unknown score_func {self.score_func!r}"
        if self.dtype not in ("fp8", "bf16"):
            yield f"dtype must be 'fp8' or 'bf16', got {self.dtype!r}"
        if self.expert_dtype not in ("fp4", "fp8", None):
            yield f"expert_dtype must be 'fp4', 'fp8' or None, got {self.expert_dtype!r}"
        if self.scale_fmt != "ue8m0":
            yield f"only ue8m0 scales are supported, got scale_fmt={self.scale_fmt!r}"

    def _block_problems(self):
        # Every input dim of an FP8/FP4 GEMM is quantised per 128 activations (spec §2.2).
        dims = {"dim": self.dim, "q_lora_rank": self.q_lora_rank, "moe_inter_dim": self.moe_inter_dim,
                "o_groups*o_lora_rank": self.o_groups * self.o_lora_rank}
        for name, value in dims.items():
            if value % 128:
                yield f"{name}={value} must be a multiple of 128 (activation quantisation block)"

    # ------------------------------------------------------------------ derived
    def layer_kind(self, layer_id: int) -> LayerKind:
        """Attention type of block `layer_id` (ids >= n_layers are MTP blocks)."""
        if not 0 <= layer_id < len(self.compress_ratios):
            raise IndexError(f"layer_id {layer_id} is not in 0..{len(self.compress_ratios) - 1}")
        ratio = self.compress_ratios[layer_id]
        return "sliding" if ratio == 0 else ("csa" if ratio == 4 else "hca")

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        return tuple(self.layer_kind(i) for i in range(self.n_layers))

    def is_hash_layer(self, layer_id: int) -> bool:
        # MTP blocks (layer_id >= n_layers) are never hash-routed.
        return 0 <= layer_id < min(self.n_hash_layers, self.n_layers)

    @property
    def q_heads_per_group(self) -> int:
        return self.n_heads // self.o_groups

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def hc_mix(self) -> int:
        return (2 + self.hc_mult) * self.hc_mult

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Accepts either an HF `config.json` dict or a reference `inference/config.json` dict."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        if "hidden_size" in d or "num_hidden_layers" in d or "model_type" in d:
            return cls.from_hf(d)
        return cls._from_args(d)

    @classmethod
    def _from_args(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if d.get("scale_dtype", "fp8") != "fp8":
            raise ConfigError(f"scale_dtype {d['scale_dtype']!r} is not supported (only e8m0 scales)")
        _warn_unknown([k for k in d if k not in names | ARGS_IGNORED | {"scale_dtype"}], "inference/config.json")
        _require(d, {name: name for name in REQUIRED})
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        for key, want in HF_FIXED.items():
            if key in d and d[key] != want:
                raise ConfigError(f"{key}={d[key]!r} is not supported (DeepSeek-V4 has {key}={want!r})")
        same = {f.name for f in dataclasses.fields(cls)} - set(HF_TO_ARGS.values()) - set(
            ROPE_SCALING_TO_ARGS.values()) - {"dtype", "scale_fmt", "max_seq_len"}
        handled = HF_FIXED.keys() | HF_IGNORED | {"rope_scaling", "quantization_config"}
        args = {HF_TO_ARGS.get(k, k): v for k, v in d.items() if k in HF_TO_ARGS or k in same}
        unknown = [k for k in d if k not in HF_TO_ARGS and k not in same and k not in handled]
        args.update(_rope_args(d.get("rope_scaling"), unknown))
        args.update(_quant_args(d.get("quantization_config")))
        _warn_unknown(unknown, "config.json")
        hf_name = {v: k for k, v in HF_TO_ARGS.items()} | {v: f"rope_scaling.{k}" for k, v in
                                                            ROPE_SCALING_TO_ARGS.items()}
        _require(args, {name: hf_name.get(name, name) for name in REQUIRED})
        return cls(**args)

    def to_hf(self) -> dict:
        """The HF `config.json` of this config (what `dsv4 synth` writes)."""
        inv = {v: k for k, v in HF_TO_ARGS.items()}
        out = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
               "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
               "num_key_value_heads": 1, "head_dim": self.head_dim, "tie_word_embeddings": False,
               "topk_method": "noaux_tc", "norm_topk_prob": True, "torch_dtype": "bfloat16",
               "max_position_embeddings": 1048576, "initializer_range": 0.02, "use_cache": True}
        skip = set(ROPE_SCALING_TO_ARGS.values()) | {"dtype", "scale_fmt", "max_seq_len"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                value = getattr(self, f.name)
                out[inv.get(f.name, f.name)] = list(value) if isinstance(value, tuple) else value
        out["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor, "beta_fast": self.beta_fast,
                               "beta_slow": self.beta_slow, "original_max_position_embeddings": self.original_seq_len}
        if self.dtype == "fp8":
            out["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "scale_fmt": self.scale_fmt, "weight_block_size": [128, 128]}
        return out

    def to_inference(self) -> dict:
        """The reference's `inference/config.json` of this config."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["compress_ratios"] = list(self.compress_ratios)
        for k in ("bos_token_id", "eos_token_id"):
            out.pop(k)
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ModelConfig:
        """A config file, or a checkpoint directory holding `config.json` / `inference_config.json`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            for name in ("config.json", "inference_config.json", os.path.join("inference", "config.json")):
                if os.path.exists(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config file at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not a JSON config file: {e}") from e
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    @classmethod
    def preset(cls, name: str, **changes) -> ModelConfig:
        """`flash` or `pro`: the official configuration (`dsv4/configs/*.json`)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        text = resources.files("dsv4.configs").joinpath(f"{name}.json").read_text()
        return cls.from_hf(json.loads(text)).replace(**changes)

    @classmethod
    def resolve(cls, spec: str) -> ModelConfig:
        """A preset name, a config file, or a checkpoint directory."""
        if spec in PRESETS:
            return cls.preset(spec)
        if not os.path.exists(spec):
            raise FileNotFoundError(f"no config file at {spec} (and it is not a preset: {', '.join(PRESETS)})")
        return cls.from_file(spec)

    def truncated(self, n_layers: int) -> ModelConfig:
        """The first `n_layers` blocks of this architecture (MTP kept), e.g. for benchmarks and tests."""
        if not 1 <= n_layers <= self.n_layers:
            raise ConfigError(f"n_layers={n_layers}: truncated() keeps 1..{self.n_layers} blocks")
        ratios = self.compress_ratios[:n_layers] + self.compress_ratios[self.n_layers:]
        return self.replace(n_layers=n_layers, compress_ratios=ratios,
                            n_hash_layers=min(self.n_hash_layers, n_layers))


PRESETS = ("flash", "pro")


# ---------------------------------------------------------------------------------------------- file helpers
def _type_problems(cfg: ModelConfig):
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), f.type
        if kind == "float":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind == "str | None":
            ok = value is None or isinstance(value, str)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:  # compress_ratios
            ok = isinstance(value, list | tuple) and all(type(r) is int for r in value)
        if not ok:
            yield f"{f.name}={value!r} has the wrong type (expected {kind})"


def _rope_args(rope, unknown: list[str]) -> dict:
    if rope is None:
        return {}
    if not isinstance(rope, dict) or rope.get("type", rope.get("rope_type")) != "yarn":
        raise ConfigError(f"rope_scaling must be a YaRN object ({{'type': 'yarn', ...}}), got {rope!r}")
    unknown += [f"rope_scaling.{k}" for k in rope if k not in ROPE_SCALING_TO_ARGS and k not in ("type", "rope_type")]
    return {ROPE_SCALING_TO_ARGS[k]: v for k, v in rope.items() if k in ROPE_SCALING_TO_ARGS}


def _quant_args(q) -> dict:
    if q is None:
        return {"dtype": "bf16"}
    if (not isinstance(q, dict) or q.get("quant_method", "fp8") != "fp8" or q.get("fmt") != "e4m3"
            or list(q.get("weight_block_size", [])) != [128, 128]):
        raise ConfigError(f"unsupported quantization_config {q!r} (need fp8 e4m3 with 128x128 blocks)")
    return {"dtype": "fp8", "scale_fmt": q.get("scale_fmt") or "ue8m0"}


def _require(args: dict, file_names: dict[str, str]) -> None:
    """Raise naming (as the file spells them) the required fields absent from `args`."""
    missing = [file_names[name] for name in REQUIRED if name not in args]
    if missing:
        raise ConfigError(f"config is missing required keys: {', '.join(missing)}")


def _warn_unknown(keys: list[str], form: str) -> None:
    if keys:
        warnings.warn(f"ignoring config keys unknown to DeepSeek-V4's {form}: {', '.join(sorted(keys))}",
                      UserWarning, stacklevel=4)


def tiny_config(**changes) -> ModelConfig:
    """A small consistent config with every layer type, for tests and the built-in default model.

    Layers: sliding, CSA, HCA, CSA (+ a sliding MTP block); 2 hash-routed MoE layers; 16 indexer heads
    (fewer give many exact-zero indexer scores whose tie order is implementation-defined).
    """
    base = dict(vocab_size=512, dim=256, n_layers=4, n_heads=4, head_dim=128, rope_head_dim=64,
                q_lora_rank=128, o_lora_rank=64, o_groups=2, window_size=16,
                compress_ratios=(0, 4, 128, 4, 0), index_n_heads=16, index_head_dim=128, index_topk=4,
                n_routed_experts=8, n_activated_experts=2, moe_inter_dim=128, n_hash_layers=2,
                route_scale=1.5, max_seq_len=1024)
    base.update(changes)
    return ModelConfig(**base)
