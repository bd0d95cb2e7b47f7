"""Writing trained weights back: the official checkpoint format (re-quantised), bf16, and LoRA adapters.

Every tensor is produced for the inventory of the output config, strictly (a model value without a checkpoint
tensor, or the reverse, is an error). Frozen linears still holding their stored FP8/FP4 bytes are copied as they
are; trained ones are re-quantised with the same quantisers as `synth` (FP8 128x128 / FP4 per 32, e8m0 scales).
`attn.wo_a` is one of them (held FP8 as stored; trained, dequantised, then re-quantised). FSDP-sharded parameters
are gathered first (every rank must call `export_state`; only the caller's choice of rank writes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dsv4 import ops
from dsv4.checkpoint.inventory import inventory
from dsv4.checkpoint.reader import INDEX_NAME
from dsv4.checkpoint.synth import plan_shards, write_safetensors
from dsv4.config import ModelConfig
from dsv4.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8
from dsv4.train.params import LoRALinear, TrainLinear

ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded parameter (on the CPU); FP8 / e8m0 bytes travel as uint8 (gloo has
    no 8-bit float types)."""
    if hasattr(t, "full_tensor") and t.dtype.itemsize == 1:
        from torch.distributed.tensor import DTensor

        raw = DTensor.from_local(t.to_local().view(torch.uint8), t.device_mesh, t.placements, shape=t.shape,
                                 stride=t.stride())
        return raw.full_tensor().view(t.dtype).detach().cpu()
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().cpu()


def model_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint name -> value: raw stored tensors of frozen quantised linears, float values of the rest;
    LoRA adapters are merged into their base weight."""
    values, merged = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            delta = (_full(m.lora_B).float() @ _full(m.lora_A).float()) * m.scaling     # = m.delta_weight()
            values[f"{name}.weight"] = _base_value(m.base) + delta
            merged.add(name)
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 2)[0] if ".base." in name else None
        if owner in merged or ".lora_" in name:
            continue
        values[name] = _full(p)
    return values


def _base_value(lin: nn.Module) -> torch.Tensor:
    """A LoRA base linear's fp32 value, decoded from gathered tensors (FSDP shards do not split on FP8 blocks)."""
    if isinstance(lin, TrainLinear):
        return _full(lin.dequantized()).float()
    return ops.dequant_weight(_full(lin.weight), None if lin.scale is None else _full(lin.scale), lin.fmt)


def export_state(model: nn.Module, cfg: ModelConfig, values: dict[str, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `cfg` (its formats decide FP8 / FP4 / bf16) from the model's values (or the
    given `model_values`, e.g. completed with other ranks' experts)."""
    values = dict(model_values(model) if values is None else values)
    specs = inventory(cfg)
    out = {}
    for name, spec in specs.items():
        if name in out:
            continue
        if name not in values:
            raise ValueError(f"checkpoint tensor {name} has no value in the model")
        v = values.pop(name)
        if spec.dtype in ("F8_E4M3", "I8"):
            scale = name[: -len("weight")] + "scale"
            raw = v.dtype == spec.torch_dtype and scale in values
            w, s = (v, values.pop(scale)) if raw else (quant_fp8 if spec.dtype == "F8_E4M3" else quant_fp4)(v.float())
            values.pop(scale, None)
            out[name], out[scale] = w, s
        else:
            out[name] = _dequantized(v, values.pop(name[: -len("weight")] + "scale", None)).to(spec.torch_dtype)
    leftover = sorted(n for n in values if not n.endswith(".scale"))
    if leftover:
        raise ValueError(f"{len(leftover)} model values have no checkpoint tensor: {leftover[:20]}")
    for name, spec in specs.items():
        if tuple(out[name].shape) != spec.shape or out[name].dtype != spec.torch_dtype:
            raise ValueError(f"{name}: produced {out[name].dtype} {list(out[name].shape)}, expected {spec}")
    return out


def _dequantized(v: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A frozen linear's stored FP8 / FP4 bytes as fp32 values (bf16 export); anything else unchanged."""
    if scale is None or v.dtype not in (torch.float8_e4m3fn, torch.int8):
        return v
    return dequant_fp8(v, scale) if v.dtype == torch.float8_e4m3fn else dequant_fp4(v, scale)


def bf16_config(cfg: ModelConfig) -> ModelConfig:
    return cfg.replace(dtype="bf16", expert_dtype=None)


def write_checkpoint(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike,
                     tokenizer_from: str | os.PathLike | None = None, shard_bytes: int = 5 * 2**30) -> Path:
    """Shards + index + config.json + inference/config.json, laid out like `synth` writes them."""
    out = Path(out_dir)
    (out / "inference").mkdir(parents=True, exist_ok=True)
    specs = inventory(cfg)
    shards = plan_shards(specs, shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, groups in zip(files, shards, strict=True):
        names = [n for g in groups for n in g]
        write_safetensors(out / file, {n: specs[n] for n in names}, ((n, 0, state[n]) for n in names))
        weight_map.update({n: file for n in names})
    total = sum(s.nbytes for s in specs.values())
    _json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _json(out / "config.json", cfg.to_hf())
    _json(out / "inference" / "config.json", cfg.to_inference())
    if tokenizer_from and (Path(tokenizer_from) / "tokenizer.json").exists():
        shutil.copy(Path(tokenizer_from) / "tokenizer.json", out / "tokenizer.json")
    return out


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{linear}.lora_A` / `.lora_B`, gathered, fp32 (every FSDP rank must call this)."""
    return {n: _full(p).float().contiguous() for n, p in model.named_parameters() if ".lora_" in n}


def save_adapters(model: nn.Module, out_dir: str | os.PathLike, meta: dict,
                  tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """LoRA adapters alone: `adapter.safetensors` (`{linear}.lora_A` [r, in], `.lora_B` [out, r], fp32) and
    `adapter_config.json` (rank, alpha, targets, base model). `tensors`: `adapter_tensors`, when gathered."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model) if tensors is None else tensors
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    save_file(tensors, str(out / ADAPTER_FILE))
    _json(out / ADAPTER_CONFIG, meta)
    return out


def load_adapters(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Strictly load saved adapters into a model already wrapped by `prepare_lora` with the same targets."""
    file = Path(adapter_dir) / ADAPTER_FILE
    try:
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as e:      # missing or damaged (e.g. truncated): name the file
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from e
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"the adapters in {adapter_dir} do not fit the base model (another base model?): "
                         f"missing {missing[:10]}, unexpected {unexpected[:10]}")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != tensors[n].shape:
                raise ValueError(f"{n}: adapter has shape {list(tensors[n].shape)}, model {list(p.shape)}")
            p.copy_(tensors[n])


ADAPTER_KEYS = ("rank", "alpha", "targets", "base_model")


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """`adapter_config.json` as `save_adapters` writes it; anything else is a ValueError naming the file (or, for a
    `dsv4 finetune` output directory given instead of its `adapter/`, saying so)."""
    adapter_dir = Path(adapter_dir)
    file = adapter_dir / ADAPTER_CONFIG
    if not file.is_file():
        hint = (f"; did you mean {adapter_dir / 'adapter'}?" if (adapter_dir / "adapter" / ADAPTER_CONFIG).is_file()
                else " (`dsv4 finetune --lora` writes it in OUT/adapter)")
        raise ValueError(f"{adapter_dir} is not an adapter directory: no {ADAPTER_CONFIG}{hint}")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{file} is not a readable JSON file: {e}") from e
    missing = [k for k in ADAPTER_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)} (not written by `dsv4 finetune --lora`?)")
    return meta


def _json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
