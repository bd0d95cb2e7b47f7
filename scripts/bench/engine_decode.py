"""Decode as a user gets it: `Engine.step()` per token (scheduler, fixed-shape step, sampler, stop rules and
detokenisation), beside the captured step replayed alone, on `dsv4 bench`'s model (Flash width, synthesised
official-format weights), with async decode on and off.

Why: `dsv4 bench` times the step through `DecodeGraphs.run` + argmax, not the engine; the engine does more host
work per token. Serially (`--async-decode off`) each step reads the device once (the sampled ids with the NaN
check's flag) before the host appends the tokens and schedules the next step, so host time between steps is
exposed (bench/NOTES.md, thirty-third session); async (`on`), step n + 1 is launched before step n's tokens are read
and appended, so that host work overlaps the GPU (thirty-fourth session). Per batch size and mode this prints and
writes:
* `step_ms`: the wall time of `steps` calls of `Engine.step()` in steady decode (every sequence generating),
  synced before and after the loop only, per step;
* its parts by wall time: `run_ms` (`DecodeGraphs.run`: inputs built and copied, the replay launched),
  `sample_ms` (`ModelRunner._queue_sample`: sampling tensors, the sampler's launches, the copies of its results
  queued), `wait_ms` (`ModelRunner.read`: the wait for a step's ids, serially this step's, async the step
  before's) and `other_ms` (scheduler, appending tokens, detokenising, stop rules);
* `replay_ms`: the captured step replayed back to back (GPU time alone; CUDA only);
* `host_exposed_ms` = step_ms - replay_ms: what a step costs beyond the GPU's work.
Both modes run on one engine (one compilation): the switch drains the step in flight, and two untimed steps
precede each mode's clock. Only the batch's own bucket is captured (one compilation per batch size, not one per
power of two), and prefill runs uncaptured: prefill is not what is timed here.
Usage: PYTHONPATH=. python3 scripts/bench/engine_decode.py [--batches 1 8 64] [--context 512] [--steps 24]
       [--async-decode on|off|both] [--profile STEPS] [--no-compile] [--out PATH]; --tiny runs the tiny config
       on the CPU (checks the script, times nothing real).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dsv4.bench.timing import bench_model, replay_median
from dsv4.engine import graphs as graphs_mod
from dsv4.engine.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams
from dsv4.tokenizer import load_tokenizer


class _Timed:
    """Wraps obj.name so each call's wall time is appended to `times` (the call's own syncs included)."""

    def __init__(self, obj, name: str):
        self.times: list[float] = []
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.times.append(time.perf_counter() - t0)

        setattr(obj, name, timed)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


MODES = {"on": [True], "off": [False], "both": [False, True]}


def measure(model, tokenizer, batch: int, context: int, steps: int, compile: bool, modes: list[bool],
            seed: int = 0, profile_steps: int = 0) -> list[dict]:
    """One engine, prefilled once, timed in each of `modes` (async decode off / on) in turn."""
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    new_tokens = (steps + 2) * len(modes) + 4
    max_len = context + new_tokens + 8
    pages = batch * -(-max_len // 256) + 1
    econf = EngineConfig(device=str(dev), max_num_seqs=batch, max_model_len=max_len, num_pages=pages,
                         max_num_batched_tokens=max(context, 256), compile_decode=compile and cuda,
                         prefill_graphs=False, enable_prefix_caching=False, decode_batch=not cuda,
                         async_decode=any(modes))
    all_buckets = graphs_mod.buckets_up_to
    graphs_mod.buckets_up_to = lambda max_batch: [max_batch]          # this batch's bucket alone
    try:
        engine = Engine(model, tokenizer, econf)
    finally:
        graphs_mod.buckets_up_to = all_buckets
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for b in range(batch):
        prompt = torch.randint(2, model.cfg.vocab_size, (context,), generator=gen).tolist()
        engine.add_request(f"r{b}", prompt, params)
    while any(len(r.seqs[0].output_ids) == 0 for r in engine.requests.values()):    # prefill until all decode
        engine.step()
    timers = {name: _Timed(obj, name) for obj, name in ((engine.runner.graphs, "run"),
                                                         (engine.runner, "_queue_sample"), (engine.runner, "read"))}
    ahead = _Timed(engine.runner, "decode_ahead")
    runs = [_timed_steps(engine, timers, ahead, batch, steps, on) for on in modes]
    graph = engine.runner.graphs.graphs[batch].graph
    if graph is not None:                                              # the GPU's time alone: once, for every mode
        replay_ms = replay_median(graph, steps) * 1e3
        for r in runs:
            r.update(replay_ms=replay_ms, host_exposed_ms=r["step_ms"] - replay_ms)
    if profile_steps:                                                  # the last mode's steps, profiled
        runs[-1]["profile"] = _profiled(engine, profile_steps)
    engine.generate_all()                                              # finish the requests (frees the slots)
    return runs


def _profiled(engine, steps: int) -> dict:
    """`steps` more `Engine.step()` calls under torch.profiler: per step, the wall time, the GPU's busy time (the
    union of its kernels' and copies' intervals) and the rest, where the GPU waited (idle), with the kernels that
    took the most time. What separates a step from the captured step replayed alone, kernel by kernel."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    dev = engine.runner.device
    cuda = dev.type == "cuda"
    _sync(dev)
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(dev)
        wall = time.perf_counter() - start
    spans, per_name = [], {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            spans.append((e.time_range.start, e.time_range.end))
            n, us = per_name.get(e.name, (0, 0.0))
            per_name[e.name] = (n + 1, us + e.time_range.elapsed_us())
    busy, window, end = 0.0, 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            busy, end = busy + (b - a), b
        elif b > end:
            busy, end = busy + (b - end), b
    if spans:
        window = max(b for _, b in spans) - min(a for a, _ in spans)
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:15]
    return {"steps": steps, "wall_ms": wall / steps * 1e3, "gpu_busy_ms": busy / steps / 1e3,
            "gpu_idle_ms": (window - busy) / steps / 1e3,
            "top": [{"name": k[:120], "per_step": n / steps, "us_per_step": us / steps} for k, (n, us) in top]}


def _timed_steps(engine, timers: dict[str, _Timed], ahead: _Timed, batch: int, steps: int, on: bool) -> dict:
    dev = engine.runner.device
    engine.async_decode = on
    for _ in range(2):              # the switch: a drain (off) or a launch with nothing to read (on), then steady
        engine.step()
    for t in [*timers.values(), ahead]:
        t.times.clear()
    # One sync before the loop and one after: a sync before each step would wait out the step in flight, hiding
    # exactly the GPU time async decode overlaps (the thirty-fifth session's first run reported 0.75 ms async
    # steps against a 1.46 ms replay that way). `step_ms` is the loop's wall time per step; the per-call times
    # (`step_ms_median`, `step_ms_min`) show how it is spread, not the rate.
    step_times = []
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - t0)
    _sync(dev)
    wall = time.perf_counter() - start
    if any(len(t.times) != steps for t in timers.values()) or len(ahead.times) != (steps if on else 0):
        raise RuntimeError(f"{steps} steps timed but not all were plain decode steps through the decode graphs "
                           f"({'async' if on else 'serial'}): {[len(t.times) for t in timers.values()]}")
    parts = {"run_ms": timers["run"].times, "sample_ms": timers["_queue_sample"].times,
             "wait_ms": timers["read"].times}
    med = {k: statistics.median(v) * 1e3 for k, v in parts.items()}
    other = [s - sum(p) for s, *p in zip(step_times, *parts.values(), strict=True)]
    out = {"batch": batch, "async_decode": on, "step_ms": wall / steps * 1e3, **med,
           "other_ms": statistics.median(other) * 1e3, "step_ms_median": statistics.median(step_times) * 1e3,
           "step_ms_min": min(step_times) * 1e3, "tokens_per_s": batch * steps / wall}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=512, help="prompt tokens per sequence (the bench's context)")
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps per batch size")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--async-decode", choices=sorted(MODES), default="both",
                    help="time Engine.step() with async decode off, on, or both on one engine (default both)")
    ap.add_argument("--no-compile", action="store_true", help="capture the eager step (no torch.compile)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="then profile STEPS more steps of the last mode: per step the GPU's busy and idle time and "
                         "the kernels that took the most (`profile` in the run's JSON)")
    ap.add_argument("--tiny", action="store_true", help="the tiny config on the CPU: checks the script only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("engine_decode.py times the engine on a CUDA device (--tiny checks the script on the CPU)")
    model = bench_model(args.layers, "cpu" if args.tiny else "cuda", tiny=args.tiny)
    tokenizer = load_tokenizer()
    res = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu",
           "layers": args.layers, "context": args.context, "compile": not (args.no_compile or args.tiny), "runs": []}
    for b in args.batches:
        for r in measure(model, tokenizer, b, args.context, args.steps, not args.no_compile, MODES[args.async_decode],
                         profile_steps=args.profile):
            res["runs"].append(r)
            extra = (f"; replay alone {r['replay_ms']:.2f}, host exposed {r['host_exposed_ms']:.2f}"
                     if "replay_ms" in r else "")
            print(f"engine decode bs{b} async {'on' if r['async_decode'] else 'off'}: step {r['step_ms']:.2f} ms "
                  f"(run {r['run_ms']:.2f}, sample {r['sample_ms']:.2f}, wait {r['wait_ms']:.2f}, "
                  f"other {r['other_ms']:.2f}){extra}", flush=True)
            if "profile" in r:
                pr = r["profile"]
                print(f"  profiled {pr['steps']} steps: wall {pr['wall_ms']:.3f} ms a step, GPU busy "
                      f"{pr['gpu_busy_ms']:.3f}, idle {pr['gpu_idle_ms']:.3f}")
                for k in pr["top"]:
                    print(f"  {k['us_per_step']:9.1f} us  x{k['per_step']:.1f}  {k['name'][:90]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
