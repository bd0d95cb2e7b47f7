"""Where the time of a decode step and a prefill goes: per-kernel CUDA time of the bench model (`dsv4 bench`'s model:
Flash width, 4 blocks, synthesised official-format weights).

Decode: the fixed-shape step, compiled as the bench compiles it, run without graph capture so each kernel shows in
torch.profiler; the captured step's time is measured beside it. Comparing the sum of kernel times per step with the
captured step's time separates kernel time from launch gaps. Prefill: one 1k-token prefill (the dispatched path);
with --compiled-segments the prefill runs the engine's compiled segments (`PrefillGraphs(compile="inductor")`, as
`dsv4 bench` times it by default) at the step's own length and uncaptured, so their fused kernels show.
Prints, per run, the kernels grouped by name (count per step, microseconds per step, share), the number of kernels
and their total time per step; for prefill also the GPU time per module class (forward hooks with CUDA events).
Usage: PYTHONPATH=. python3 scripts/bench/profile_step.py [--batches 1 64] [--prefill 1024] [--out PATH]
"""

import argparse
import json
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from dsv4.bench.timing import Dsv4Decoder, bench_model, cuda_time, dsv4_prefill, summary


def kernels(fn, calls: int, stacks: bool = False) -> dict:
    """Profile `calls` calls of fn; per kernel name: count and CUDA microseconds per call. `stacks`: also the
    CPU ops with their Python call sites (5 frames), by CUDA time: which model code launched the time."""
    fn()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA, *([ProfilerActivity.CPU] if stacks else [])]
    # with_stack alone records no Python frames in this torch (2.11-2.13): the verbose experimental config does
    # (the fifteenth session's --stacks table came back without its source column)
    extra = {"experimental_config": torch._C._profiler._ExperimentalConfig(verbose=True)} if stacks else {}
    with profile(activities=activities, with_stack=stacks, **extra) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    count, us = defaultdict(int), defaultdict(float)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:          # a kernel / memcpy / memset on the GPU
            count[e.name] += 1
            us[e.name] += e.time_range.elapsed_us()
    if not us:                                        # this torch reports kernels only in the averages table
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=100))
    rows = sorted(({"name": n, "count": count[n] / calls, "us": us[n] / calls} for n in us), key=lambda r: -r["us"])
    out = {"kernels_per_call": sum(count.values()) / calls, "kernel_us_per_call": sum(us.values()) / calls,
           "rows": rows}
    if stacks:
        out["by_call_site"] = prof.key_averages(group_by_stack_n=5).table(sort_by="cuda_time_total", row_limit=40,
                                                                          max_name_column_width=50)
    return out


def module_times(model, fn) -> dict:
    """GPU milliseconds of one call of fn per module class (inclusive of children), from CUDA events recorded by
    forward hooks around every module call; the same stream runs everything, so an event pair spans exactly the
    work launched inside the module. Block-level work outside attention and MoE (mHC, norms) is `Block` minus the
    two. Eager code only (a captured or compiled step has no module calls)."""
    spans, handles = [], []
    for module in model.modules():
        def pre(mod, args, kwargs):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            mod._dsv4_starts = [*getattr(mod, "_dsv4_starts", []), start]

        def post(mod, args, kwargs, out):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            spans.append((type(mod).__name__, mod._dsv4_starts.pop(), end))
        handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                    module.register_forward_hook(post, with_kwargs=True)]
    try:
        fn()
        torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    total = defaultdict(float)
    for name, start, end in spans:
        total[name] += start.elapsed_time(end)
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def show(title: str, res: dict, wall_ms: float | None) -> None:
    total = max(res["kernel_us_per_call"], 1e-9)
    wall = f", captured step {wall_ms:.3f} ms" if wall_ms else ""
    print(f"=== {title}: {res['kernels_per_call']:.0f} kernels, {total / 1e3:.3f} ms of kernel time per call{wall}")
    for r in res["rows"][:60]:
        print(f"{r['us']:9.1f} us {100 * r['us'] / total:5.1f}%  x{r['count']:<6.1f} {r['name'][:120]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[1])
    p.add_argument("--prefill", type=int, nargs="*", default=[1024])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--stacks", action="store_true", help="prefill: also CUDA time by Python call site")
    p.add_argument("--compiled-segments", action="store_true",
                   help="prefill through the compiled segments (uncaptured) instead of the eager step")
    p.add_argument("--out")
    args = p.parse_args()
    model = bench_model(4)
    out = {"gpu": torch.cuda.get_device_name(), "compile": not args.no_compile}
    for b in args.batches:
        captured = Dsv4Decoder(model, b, 512, 24, seed=0, graphs=True, compile=not args.no_compile)
        wall = summary(cuda_time(captured.step, 12))["median_s"] * 1e3
        del captured
        eager = Dsv4Decoder(model, b, 512, 24, seed=0, graphs=True, capture=False, compile=not args.no_compile)
        res = kernels(eager.step, 4)
        res["captured_step_ms"] = wall
        show(f"decode bs{b}", res, wall)
        out[f"decode_bs{b}"] = res
        del eager
        torch.cuda.empty_cache()
    segments = None
    if args.compiled_segments:
        from dsv4.engine.prefill_graphs import PrefillGraphs

        segments = PrefillGraphs(model, sizes=(), compile="inductor").step     # no bucket: the dynamic sides
        dsv4_prefill(model, 256, 8192, 0, segments)()                          # compiled once, before profiling
    out["compiled_segments"] = args.compiled_segments
    for n in args.prefill:
        res = kernels(dsv4_prefill(model, n, 8192, 0, segments), 1, stacks=args.stacks)
        show(f"prefill {n}", res, None)
        if args.stacks:
            print(res["by_call_site"])
        res["ms_by_module_class"] = module_times(model, dsv4_prefill(model, n, 8192, 0))
        print(f"=== prefill {n}: GPU ms per module class (inclusive of children; Block - Attention - MoE = mHC "
              f"and norms)")
        for name, ms in res["ms_by_module_class"].items():
            print(f"{ms:9.2f} ms  {name}")
        out[f"prefill_{n}"] = res
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
