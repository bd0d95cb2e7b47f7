"""Time the split finite-logits check (`dsv4.ops.rowwise.all_finite`) against torch's single reduction on the GPU.

Per batch size (rows of Flash's 129,280 fp32 logits): isfinite().all() vs all_finite, each with its device read
as the engine's check does, and torch.argmax for scale (a split argmax measured slower and was dropped: see
dsv4/ops/rowwise.py). Median of CUDA-event timings (us), eager as the engine calls them.
Usage: PYTHONPATH=. python3 scripts/bench/rowwise.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from dsv4.bench.timing import cuda_time
from dsv4.ops.rowwise import all_finite

V = 129280


def time_us(fn, reps: int = 200) -> float:
    for _ in range(9):                              # warm-up (cuda_time adds one more)
        fn()
    return statistics.median(cuda_time(fn, reps)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    rows = {}
    for batch in (1, 8, 64):
        x = torch.randn(batch, V, device="cuda")
        rows[batch] = {"argmax_torch_us": time_us(lambda x=x: x.argmax(-1)),
                       "finite_torch_us": time_us(lambda x=x: bool(torch.isfinite(x).all())),
                       "finite_rows_us": time_us(lambda x=x: all_finite(x))}
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in rows[batch].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "vocab": V, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
