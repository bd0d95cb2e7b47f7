"""The complete DeepSeek-V4-Flash sharded over torchrun's ranks (issue 7): TPOT, prefill, memory, longest context.

Every rank synthesises only its share of the official-format weights straight on its own GPU (replicated and split
tensors whole, sliced at load; only its own routed experts), then all ranks run the same deterministic benchmark
loop (same seeded prompts, greedy tokens from the same gathered logits), so the model's collectives pair up without
a driver. Rank 0 prints a table and writes the JSON. `--check` first compares TP=N with TP=1 at Flash width
(truncated layers): logits of one prompt and greedy tokens of teacher-forced decode steps.
NOTE: the cached-bf16 linear fast path keeps a bf16 copy of every FP8/FP4 weight (4x an FP4 expert), which the
full model cannot afford on 2 GPUs; `--reference-linear` turns it off (plain dequantise-per-call path) until an
in-kernel FP4/FP8 GEMM exists.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dsv4 import ops
from dsv4.bench.timing import Dsv4Decoder, dsv4_prefill, summary
from dsv4.checkpoint.synth import synthesize_tensors
from dsv4.config import ModelConfig, tiny_config
from dsv4.dist.context import ParallelContext, init_group, rank_device, torchrun_world
from dsv4.dist.sharding import owns
from dsv4.engine.config import bytes_per_page
from dsv4.loader import load_tensors

GIB = 2**30


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="flash", help="flash | pro | a config file | 'tiny' (CPU smoke runs)")
    p.add_argument("--layers", type=int, help="keep the first N blocks (default: all)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--context", type=int, default=512, help="prompt tokens before the timed decode steps")
    p.add_argument("--decode-batches", default="1,8,32")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--prefill", type=int, default=8192, help="prefill length (one chunk)")
    p.add_argument("--check", action="store_true", help="first compare TP=N with TP=1 at --check-layers")
    p.add_argument("--check-layers", type=int, default=4)
    p.add_argument("--check-steps", type=int, default=32)
    p.add_argument("--reference-linear", action="store_true", help="no cached bf16 weight copies (see NOTE)")
    p.add_argument("--memory-fraction", type=float, default=0.9, help="of the free memory, for the context bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON results (rank 0)")
    return p.parse_args(argv)


def config(spec: str, layers: int | None) -> ModelConfig:
    cfg = tiny_config(o_lora_rank=128) if spec == "tiny" else ModelConfig.resolve(spec)
    return cfg.truncated(layers) if layers else cfg


def build(cfg: ModelConfig, tp: ParallelContext, device: str, seed: int):
    """This rank's share of a synthesised model (bf16 on GPU, fp32 on CPU)."""
    keep = None if tp.world == 1 else (lambda n: owns(n, cfg.n_routed_experts, tp))
    tensors = synthesize_tensors(cfg, seed, device, keep=keep)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = load_tensors(cfg, tensors, device, dtype, quant_emulation=True, parallel=tp)
    del tensors
    _free(device)
    return model


def main(argv=None) -> dict:
    args = parse(argv)
    world = torchrun_world()
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    dev = rank_device(args.device, local)
    tp = init_group(rank, world, dev) if world > 1 else ParallelContext()
    res: dict = {"gpus": _gpus(dev, world), "torch": torch.__version__, "tp": world, "config": args.config}
    linear = ops.reference_only() if args.reference_linear else contextlib.nullcontext()
    with linear:
        if args.check:
            res["tp_check"] = check(config(args.config, args.check_layers), tp, dev, args)
            _say(tp, f"TP={world} vs TP=1: {res['tp_check']}")
        cfg = config(args.config, args.layers)
        res["layers"] = cfg.n_layers
        t0 = time.time()
        model = build(cfg, tp, dev, args.seed)
        res["load_s"], res["weights_gib"] = time.time() - t0, _max(tp, _allocated(dev) / GIB)
        _say(tp, f"{cfg.n_layers} layers built in {res['load_s']:.0f} s, {res['weights_gib']:.1f} GiB/rank")
        res.update(measure(model, cfg, tp, dev, args))
    res["fast_ops"] = ops.fast_ops_status()
    if rank == 0:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        print(table(res))
    if world > 1:
        dist.destroy_process_group()
    return res


def measure(model, cfg: ModelConfig, tp: ParallelContext, dev: str, args) -> dict:
    out: dict = {"decode": {}}
    for b in [int(x) for x in args.decode_batches.split(",")]:
        dec = Dsv4Decoder(model, b, args.context, args.decode_steps + 2, seed=args.seed)
        t = summary(_time(dec.step, args.decode_steps, dev, tp))
        out["decode"][b] = t
        out[f"full_flash_tpot_bs{b}_ms"] = t["median_s"] * 1e3
        _say(tp, f"decode bs{b}: {t['median_s'] * 1e3:.2f} ms/step")
        del dec
        _free(dev)
    base = _allocated(dev)
    t = summary(_time(dsv4_prefill(model, args.prefill, args.prefill, args.seed), 2, dev, tp))
    out["prefill"] = t
    size = f"{args.prefill // 1024}k" if args.prefill % 1024 == 0 else str(args.prefill)
    out[f"prefill_{size}_tok_s"] = args.prefill / t["median_s"]
    _say(tp, f"prefill {args.prefill}: {t['median_s'] * 1e3:.0f} ms ({args.prefill / t['median_s']:.0f} tok/s)")
    workspace = _peak(dev) - base
    out["mem_per_gpu_gib"] = _max(tp, _peak(dev) / GIB)
    out.update(max_context(cfg, tp, dev, workspace, args.memory_fraction))
    return out


def max_context(cfg: ModelConfig, tp: ParallelContext, dev: str, workspace: int, fraction: float) -> dict:
    """The longest single sequence the free memory holds: growing cache bytes per token (every rank keeps the
    whole KV, spec §5.4), after leaving one prefill chunk's measured workspace. Computed, not run."""
    dtype = torch.bfloat16 if torch.device(dev).type == "cuda" else torch.float32
    per_token = bytes_per_page(cfg, 256, dtype) / 256
    if torch.device(dev).type == "cuda":
        free = torch.cuda.mem_get_info(torch.device(dev))[0] + torch.cuda.memory_reserved(dev) - _allocated(dev)
    else:
        free = 8 * GIB
    free = -_max(tp, -(free * fraction - workspace))                  # the tightest rank decides
    tokens = int(max(free, 0) // per_token)
    return {"cache_bytes_per_token": per_token, "max_context_tokens": min(tokens, cfg.max_seq_len),
            "max_context_tokens_memory_bound": tokens, "max_context_method": "computed from free memory"}


def check(cfg: ModelConfig, tp: ParallelContext, dev: str, args) -> dict:
    """TP=N vs TP=1 (built on rank 0 alone) on the same synthesised weights: one prompt's logits, then greedy
    agreement over teacher-forced decode steps."""
    ids = torch.randint(2, cfg.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(args.seed))
    sharded = build(cfg, tp, dev, args.seed)
    got, got_steps = _forced(sharded, ids, args.check_steps, dev)
    del sharded
    _free(dev)
    res = {}
    if tp.rank == 0:
        single = build(cfg, ParallelContext(), dev, args.seed)
        want, want_steps = _forced(single, ids, args.check_steps, dev)
        del single
        _free(dev)
        scale = want.float().std().item()
        res = {"layers": cfg.n_layers, "logits_max_abs_diff_over_std": (got - want).abs().max().item() / scale,
               "greedy_agreement": (got_steps == want_steps).float().mean().item(), "steps": args.check_steps}
    if tp.world > 1:
        dist.barrier()
    return res


def _forced(model, ids: torch.Tensor, steps: int, dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-position logits of the prompt, and argmax at each of `steps` decode steps fed the prompt's own tokens
    (teacher forcing: both models see the same inputs whatever they predict)."""
    from dsv4.model.state import ModelState, StepBatch

    n = ids.shape[1] - steps
    pages = list(range(-(-ids.shape[1] // 256)))
    state = ModelState(model.cfg, 1, len(pages), 256, model.dtype, dev)
    picks = []
    with torch.inference_mode():
        h = model.step(ids[:, :n].to(dev), StepBatch.build([(0, 0, n, pages)], dev), state)
        first = model.main_logits(h[:, -1:])[0, 0].float().cpu()
        for i in range(n, ids.shape[1]):
            h = model.step(ids[:, i:i + 1].to(dev), StepBatch.build([(0, i, 1, pages)], dev), state)
            picks.append(model.main_logits(h)[0, 0].argmax().item())
    return first, torch.tensor(picks)


def _time(fn, repeats: int, dev: str, tp: ParallelContext) -> list[float]:
    """Seconds per call after one warm-up (CUDA events on GPU); every rank times the same collective-bound call."""
    if torch.device(dev).type == "cuda":
        from dsv4.bench.timing import cuda_time
        return cuda_time(fn, repeats)
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _max(tp: ParallelContext, value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    if tp.world > 1:
        dev = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        t = t.to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _allocated(dev: str) -> int:
    return torch.cuda.memory_allocated(dev) if torch.device(dev).type == "cuda" else 0


def _peak(dev: str) -> int:
    return torch.cuda.max_memory_reserved(dev) if torch.device(dev).type == "cuda" else 0


def _free(dev: str) -> None:
    gc.collect()
    if torch.device(dev).type == "cuda":
        torch.cuda.empty_cache()


def _gpus(dev: str, world: int) -> str:
    name = torch.cuda.get_device_name(dev) if torch.device(dev).type == "cuda" else "cpu"
    return f"{world}x {name}"


def _say(tp: ParallelContext, text: str) -> None:
    if tp.rank == 0:
        print(text, flush=True)


def table(res: dict) -> str:
    rows = [("metric", "value", "target")]
    for b, t in res["decode"].items():
        rows.append((f"TPOT bs{b} ms", f"{t['median_s'] * 1e3:.2f}", "<= 3.5" if b == 1 else ""))
    for key in [k for k in res if k.startswith("prefill_") and k.endswith("tok_s")]:
        rows.append((key, f"{res[key]:.0f}", ""))
    rows += [("mem_per_gpu_gib", f"{res['mem_per_gpu_gib']:.1f}", ""),
             ("max_context_tokens", f"{res['max_context_tokens']}", ">= 1M (2xH200, Flash)")]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
