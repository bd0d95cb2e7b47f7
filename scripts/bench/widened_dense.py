"""Micro-benchmark of `ops.widened_dense` (the upcast-activation fp32 products: compressors, router, mHC's mixes) on
one GPU: the twin (cuBLAS's fp32 GEMM of the widened activation, what every call ran before) against the bf16
tensor-core path, at Flash's shapes and the bench's row counts, each a CUDA-graph replay with a cold L2.

Floors per line: bytes (x in bf16, the weight as held, the fp32 output) / 3.35 TB/s (H100 copy bandwidth) and
FLOPs / 989 TFLOP/s (bf16 dense peak; the fp32 split path counts its three GEMMs). Each line also gives the fast
path's largest error against float64 over the largest output (fp32 class: ~1e-7; a bf16 rounding ~4e-3), and the
time per call of eager calls back to back (twin / fast: the host's cost where it exceeds the GPU's, what an
uncaptured step pays).
Usage: python3 scripts/bench/widened_dense.py [--rows 1 64 512 1024 8192] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dsv4 import ops
from dsv4.bench.timing import cold_graph_time
from dsv4.ops.registry import which

BANDWIDTH, PEAK = 3.35e12, 989e12
WEIGHTS = {  # name: (N, K, dtype as held)
    "compressor wkv (r=4)": (1024, 4096, torch.bfloat16),
    "indexer compressor wkv": (256, 4096, torch.bfloat16),
    "router gate": (256, 4096, torch.bfloat16),
    "mHC fn": (24, 16384, torch.float32),
}


def eager_time(fn, calls: int = 200) -> float:
    """Seconds per call of `calls` eager calls issued back to back (one sync at the end): the host's time per call
    where it exceeds the GPU's (an uncaptured step's cost; the captured time is `cold_graph_time`'s)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


def line(name: str, rows: int, n: int, k: int, dtype: torch.dtype, flush: torch.Tensor) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, k, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)
    impl = which("widened_dense", x, w)
    fast = cold_graph_time(lambda: ops.widened_dense(x, w), flush)
    with ops.reference_only():
        twin = cold_graph_time(lambda: ops.widened_dense(x, w), flush)
        twin_eager = eager_time(lambda: ops.widened_dense(x, w))
    fast_eager = eager_time(lambda: ops.widened_dense(x, w))
    exact = x.double() @ w.double().t()
    err = float((ops.widened_dense(x, w).double() - exact).abs().max() / exact.abs().max())
    parts = 3 if impl != "twin" and dtype == torch.float32 else 1
    floor = max((x.numel() * 2 + w.numel() * w.element_size() + rows * n * 4) / BANDWIDTH,
                2 * rows * n * k * parts / PEAK)
    out = {"weight": name, "rows": rows, "n": n, "k": k, "impl": impl, "twin_us": twin * 1e6, "fast_us": fast * 1e6,
           "floor_us": floor * 1e6, "max_rel_err": err, "twin_eager_us": twin_eager * 1e6,
           "fast_eager_us": fast_eager * 1e6}
    print(f"{name:24s} rows {rows:5d}: twin {twin * 1e6:8.1f} us, {impl:26s} {fast * 1e6:8.1f} us "
          f"(floor {floor * 1e6:6.1f}), max err / max |y| {err:.1e}; eager calls {twin_eager * 1e6:6.1f} / "
          f"{fast_eager * 1e6:6.1f} us")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 512, 1024, 8192])
    ap.add_argument("--json", help="write the lines here")
    args = ap.parse_args()
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    with torch.inference_mode():        # as the engine runs (with grad on, a fast op is called through its torch op)
        lines = [line(name, rows, *spec, flush) for name, spec in WEIGHTS.items() for rows in args.rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "lines": lines}, f, indent=1)


if __name__ == "__main__":
    main()
