"""Micro-benchmark of the FP8 act quant and fake quant kernels (`ops/triton/quant.py`) at an 8k Flash-width
prefill's shapes, each a CUDA-graph replay with a cold L2, against its bytes' time at 3.35 TB/s (H100 copy
bandwidth): act quant reads 2 bytes (bf16) and writes 1 (+ a scale per 128); fake quant reads and writes 2.
Before the tiled kernels (bench/results/h100_s28/call_c/profile.log): 29 act quants 4.4 ms and 14 fake quants
2.7 ms in the 8k prefill, ~150 / ~190 us a call.
Usage: python3 scripts/bench/quant_kernels.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv4.bench.timing import cold_graph_time
from dsv4.ops.triton.quant import act_quant_fp8, fake_quant_fp8

BANDWIDTH = 3.35e12
SHAPES = [(8192, 4096), (8192, 8192), (8192, 2048), (1024, 4096), (64, 4096)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the lines here")
    args = ap.parse_args()
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    lines = []
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda").bfloat16()
        for name, fn, block, nbytes in (("act_quant 128", act_quant_fp8, 128, x.numel() * (3 + 4 / 128)),
                                        ("fake_quant 128", fake_quant_fp8, 128, x.numel() * 4),
                                        ("fake_quant 64", fake_quant_fp8, 64, x.numel() * 4)):
            t = cold_graph_time(lambda fn=fn, x=x, block=block: fn(x, block), flush)
            floor = nbytes / BANDWIDTH
            lines.append({"kernel": name, "rows": m, "cols": k, "us": t * 1e6, "floor_us": floor * 1e6})
            print(f"{name:15s} {m:5d} x {k:5d}: {t * 1e6:7.1f} us (bytes' time {floor * 1e6:6.1f} us, "
                  f"{floor / t:.0%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "lines": lines}, f, indent=1)


if __name__ == "__main__":
    main()
