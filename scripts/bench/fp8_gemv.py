"""Micro-benchmark of the FP8 block-scaled GEMV (`ops/triton/fp8_gemv.py`) against today's fast FP8 linear
(`ops.cached_linear.cached_linear`: a cached bf16 copy of the weight, cuBLAS) at decode sizes M = 1, 8, 16, for
every dense FP8 linear of a Flash CSA block (shapes from the checkpoint inventory; wo_a left out: the reference
runs it in bf16). Weights are random, quantised to the official format; x is bf16 with the act quant on.

Each call is captured in a CUDA graph (decode runs as graphs, so no launch overhead) and replayed with the L2
flushed before every replay (a decode step reads ~2 GB, so cold-cache numbers are the relevant ones); times are
medians. GB/s counts the bytes each path must move (kernel: FP8 weight + scales + x + y; cached: the bf16 copy +
x + y) and "of copy" divides by the measured device copy bandwidth (`dsv4.bench.floor.copy_bandwidth`, read +
write). The kernel's configurations (broadcast at M = 1, tl.dot above; block_n; no split-K or splits for 2 / 8
programs per SM; act quant fused or in its own kernel first) are swept, 15-16 per shape and M (estimated
3-5 min, mostly compiling; --shapes picks a few); the best is compared and checked against the twin
(`ops.linear.twin`: max difference in bf16 ulps) and float64.
Usage: PYTHONPATH=. python3 scripts/bench/fp8_gemv.py [--quick] [--shapes a,b] [--out bench/results/h200_fp8_gemv.json]
"""

import argparse
import json
import math

import torch

from dsv4 import ops, quant
from dsv4.bench.floor import copy_bandwidth
from dsv4.bench.timing import cold_graph_time
from dsv4.checkpoint.inventory import inventory
from dsv4.config import ModelConfig
from dsv4.ops.cached_linear import cached_linear
from dsv4.ops.triton.fp8_gemv import fp8_gemv

SIZES = (1, 8, 16)


def flash_shapes() -> list[tuple[str, int, int]]:
    """(name, N, K) of the dense FP8 linears of layer 2 (a CSA layer: it has the indexer's wq_b too)."""
    specs = inventory(ModelConfig.preset("flash").truncated(4))
    return [(n.removeprefix("layers.2.").removesuffix(".weight"), *spec.shape) for n, spec in specs.items()
            if n.startswith("layers.2.") and spec.dtype == "F8_E4M3" and ".experts." not in n and "wo_a" not in n]


def configs(m: int, quick: bool) -> list[dict]:
    """Kernel options; "prequant" quantises x first in its own kernel (`ops.fake_quant_fp8`) instead of in every
    program of the GEMV (one more launch, no repeated act-quant work)."""
    if quick:
        return [{}]
    splits = ({"split_k": 1}, {"programs_per_sm": 2}, {"programs_per_sm": 8})
    fused = [{"dot": m > 1, "block_n": bn, **sk} for bn in (32, 64, 128) for sk in splits]
    # The broadcast path at M > 1 costs ~40 instructions per weight element at M = 8 (SASS): one control only.
    control = [{"dot": False, "block_n": 32, "programs_per_sm": 8}] if m > 1 else []
    return fused + [{**c, "prequant": True} for c in fused if c.get("programs_per_sm") != 2] + control


def kernel_call(x, w, s, cfg: dict):
    cfg = dict(cfg)
    if cfg.pop("prequant", False):
        return lambda: fp8_gemv(ops.fake_quant_fp8(x, 128), w, s, False, **cfg)
    return lambda: fp8_gemv(x, w, s, True, **cfg)


def ulps(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| in units of ref's bf16 ulp."""
    r = ref.double()
    ulp = torch.ldexp(torch.ones_like(r), torch.frexp(r.abs()).exponent - 8)
    return ((y.double() - r).abs() / ulp).max().item()


def measure(name: str, N: int, K: int, m: int, bw: float, flush: torch.Tensor, quick: bool) -> dict:
    gen = torch.Generator("cuda").manual_seed(N * 7 + K + m)
    w, s = quant.quant_fp8(torch.randn(N, K, device="cuda", generator=gen) / math.sqrt(K))
    x = torch.randn(m, K, device="cuda", generator=gen).bfloat16()
    io = m * K * 2 + m * N * 2
    kernel_bytes, cached_bytes = N * K + s.numel() + io, 2 * N * K + io
    cached_s = cold_graph_time(lambda: cached_linear(x, w, s, "fp8", True), flush)
    sweep = []
    for cfg in configs(m, quick):
        try:
            sweep.append({**cfg, "s": cold_graph_time(kernel_call(x, w, s, cfg), flush)})
        except Exception as e:       # a configuration that does not compile or capture: report and go on
            print(f"  {name} M={m} {cfg}: {type(e).__name__}: {str(e)[:160]}", flush=True)
    best = min(sweep, key=lambda r: r["s"])
    cfg = {k: v for k, v in best.items() if k != "s"}
    y = kernel_call(x, w, s, cfg)()
    y32 = kernel_call(x, w, s, {**cfg, "out_dtype": torch.float32})()
    xq, wd = quant.fake_quant_fp8(x, 128).double(), ops.dequant_weight(w, s, "fp8").double()
    rel = ((y32.double() - xq @ wd.T).abs() / (xq.abs() @ wd.abs().T)).max().item()
    return {"name": name, "N": N, "K": K, "M": m, "best": cfg, "kernel_us": best["s"] * 1e6,
            "kernel_frac_of_copy": kernel_bytes / best["s"] / bw, "cached_us": cached_s * 1e6,
            "cached_frac_of_copy": cached_bytes / cached_s / bw, "speedup": cached_s / best["s"],
            "max_ulps_vs_twin": ulps(y, ops.linear.twin(x, w, s, "fp8", True)), "fp32_rel_vs_float64": rel,
            "sweep_us": [{**{k: v for k, v in r.items() if k != "s"}, "us": r["s"] * 1e6} for r in sweep]}


def line(r: dict, bw: float) -> str:
    gbs = r["kernel_frac_of_copy"] * bw / 1e9
    return (f"{r['name']:>20} {r['N']:>5}x{r['K']:<5} M={r['M']:<2} fp8_gemv {r['kernel_us']:7.2f} us "
            f"{gbs:6.0f} GB/s ({r['kernel_frac_of_copy']:.2f} of copy) | cached bf16 {r['cached_us']:7.2f} us "
            f"({r['cached_frac_of_copy']:.2f}) | x{r['speedup']:.2f} | {r['max_ulps_vs_twin']:.0f} ulp vs twin, "
            f"fp32 {r['fp32_rel_vs_float64']:.1e} | {r['best']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only the default configuration (no sweep)")
    p.add_argument("--shapes", help="comma-separated names to run (default: all), e.g. attn.wq_a,attn.wq_b")
    p.add_argument("--out", help="write every measurement (and the sweep) as JSON here")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False                 # the twin's fp32 GEMM stays fp32
    bw = copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    flush = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    rows = []
    for name, N, K in flash_shapes():
        if args.shapes and name not in args.shapes.split(","):
            continue
        for m in SIZES:
            rows.append(measure(name, N, K, m, bw, flush, args.quick))
            print(line(rows[-1], bw), flush=True)
    for m in SIZES:                                               # one block's dense FP8 linears at batch m
        mine = [r for r in rows if r["M"] == m]
        k, c = sum(r["kernel_us"] for r in mine), sum(r["cached_us"] for r in mine)
        print(f"M={m}: all {len(mine)} linears of a block: fp8_gemv {k:.1f} us, cached bf16 {c:.1f} us (x{c / k:.2f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
