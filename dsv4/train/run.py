"""`finetune()`: checkpoint + JSONL in, trained checkpoint (or LoRA adapters) + records out.

Output directory: `metrics.jsonl`, `loss.png`, `run.json` (the settings), `train_state/` (resume: run the same
command again), and `model/` (official format, re-quantised FP8/FP4) + `model-bf16/` for full fine-tuning, or
`adapter/` (+ `model/`, the merged checkpoint, with `merge=True`) for LoRA.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from dsv4.checkpoint.hub import resolve_model
from dsv4.checkpoint.reader import checkpoint_tokenizer
from dsv4.config import ModelConfig
from dsv4.loader import load_model
from dsv4.train import ep
from dsv4.train.data import PackStream, pack, read_documents
from dsv4.train.dist import DistContext, init_from_env
from dsv4.train.loop import TrainConfig, Trainer, check_state_world
from dsv4.train.params import LORA_TARGETS, prepare_full, prepare_lora
from dsv4.train.save import (
    adapter_tensors,
    bf16_config,
    export_state,
    load_adapters,
    model_values,
    read_adapter_config,
    save_adapters,
    write_checkpoint,
)


def finetune(data: str | os.PathLike, out: str | os.PathLike, model: str | None = None, lora_rank: int | None = None,
             lora_alpha: float | None = None, lora_targets: tuple[str, ...] = ("attn", "shared"), qat: bool = False,
             train: TrainConfig | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
             quant_emulation: bool = True, thinking_mode: str = "chat", merge: bool = False,
             progress: bool = True) -> Path:
    """Full fine-tuning (`lora_rank=None`) or LoRA. Under torchrun (WORLD_SIZE > 1) it runs with FSDP2."""
    train = train or TrainConfig()
    ctx = init_from_env(torch.device(device))
    if train.expert_parallel and ctx.world == 1:
        warnings.warn("--expert-parallel splits the routed experts over torchrun's processes; with one process it "
                      "changes nothing (start it with torchrun --nproc-per-node N)", stacklevel=2)
    if ctx.enabled and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    model_dir = resolve_model(model)
    cfg = ModelConfig.from_file(model_dir)          # bad data fails before the weights are read
    docs = read_documents(data, checkpoint_tokenizer(model_dir), cfg.vocab_size, cfg.bos_token_id, thinking_mode)
    out = Path(out)
    # absolute paths: the same files from another working directory are the same run
    settings = {"model": os.path.abspath(model_dir), "data": os.path.abspath(data), "lora_rank": lora_rank,
                "lora_alpha": lora_alpha, "lora_targets": list(lora_targets), "qat": qat, "dtype": str(dtype),
                "device": device, "world_size": ctx.world, "documents": len(docs), "train": asdict(train)}
    check_resume(out, settings)                      # before the weights are read too
    # The load's bar: on a large checkpoint it takes minutes, and nothing else is printed meanwhile (rank 0 only).
    net = load_model(model_dir, device=device, dtype=dtype, quant_emulation=quant_emulation,
                     progress=progress and ctx.main)
    torch.manual_seed(train.seed)                    # LoRA init identical on every rank
    net = prepare_full(net, qat) if lora_rank is None else prepare_lora(net, lora_rank, lora_alpha, lora_targets)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(settings, indent=2) + "\n")
    ctx.barrier()
    Trainer(net, PackStream(pack(docs, train.seq_len), train.packs_per_step, train.seed), train, out, ctx,
            progress, log_every_s=LOG_EVERY_S).run()
    _save(net, model_dir, out, ctx, lora_rank, lora_alpha, lora_targets, merge)
    return out


LOG_EVERY_S = 30.0       # without a progress bar (no terminal): a progress line on stderr this often

# What a resumed run may change: a longer run (its schedule then follows the new total), the save interval, the device.
RESUME_MAY_CHANGE = {"device", "train.max_steps", "train.save_every"}


def check_resume(out: Path, settings: dict) -> None:
    """Resuming from `out/train_state/` with other settings (data, learning rate, LoRA rank, process count, ...)
    would continue the saved weights and optimiser under them, or start afresh over the saved run, and mix two runs
    in metrics.jsonl: refused, naming what differs. `run.json` holds the settings of the run that saved the state."""
    state_dir = out / "train_state"
    if not any(state_dir.glob("rank*-of-*.pt")):
        return
    check_state_world(state_dir, settings["world_size"])
    try:
        saved = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return                                      # nothing to compare with; load_state still checks the tensors
    for key in ("model", "data"):                   # run.json of older versions: the paths as given
        if isinstance(saved.get(key), str):
            saved[key] = os.path.abspath(saved[key])
    before, now = _flat(saved), _flat(json.loads(json.dumps(settings)))     # as run.json holds them (lists)
    diff = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in now.items()
            if k not in RESUME_MAY_CHANGE and before.get(k) != v]
    if diff:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(diff)}): resume it with the same "
                         "settings, or use another --out")


def _flat(settings: dict) -> dict:
    """{"train": {"lr": ..}} -> {"train.lr": ..}"""
    return {f"{k}.{k2}" if isinstance(v, dict) else k: v2 for k, v in settings.items()
            for k2, v2 in (v.items() if isinstance(v, dict) else [(None, v)])}


def _save(net, model_dir, out: Path, ctx: DistContext, lora_rank, lora_alpha, lora_targets, merge) -> None:
    """Every rank gathers its FSDP shards and sends its expert-parallel experts to rank 0, which writes."""
    cfg = net.cfg
    if lora_rank is not None:
        adapters = ep.gather_experts(adapter_tensors(net), net, ctx)
        if ctx.main:
            save_adapters(net, out / "adapter", {"rank": lora_rank, "alpha": lora_alpha or 2.0 * lora_rank,
                                                 "targets": list(lora_targets), "base_model": str(model_dir)},
                          adapters)
        if not merge:
            ctx.barrier()
            return
    values = ep.gather_experts(model_values(net), net, ctx)
    formats = [(cfg, out / "model")] + ([] if lora_rank is not None else [(bf16_config(cfg), out / "model-bf16")])
    for fmt_cfg, path in formats:
        if ctx.main:
            write_checkpoint(export_state(net, fmt_cfg, values), fmt_cfg, path, tokenizer_from=model_dir)
    ctx.barrier()


def merge_lora(adapter_dir: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
               bf16: bool = False, progress: bool = False) -> Path:
    """Base checkpoint + saved adapters -> one checkpoint (official format, or bf16), loadable by the engine.
    `progress`: a bar while the base model loads."""
    meta = read_adapter_config(adapter_dir)
    model_dir = resolve_model(model or meta["base_model"])
    net = load_model(model_dir, dtype=torch.float32, progress=progress)
    net = prepare_lora(net, meta["rank"], meta["alpha"], tuple(meta["targets"]))
    load_adapters(net, adapter_dir)
    cfg = bf16_config(net.cfg) if bf16 else net.cfg
    return write_checkpoint(export_state(net, cfg), cfg, out, tokenizer_from=model_dir)


__all__ = ["LORA_TARGETS", "TrainConfig", "finetune", "merge_lora"]
