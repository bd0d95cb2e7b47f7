"""Host microseconds per call of the FP8 prefill linear and of its parts (issue 16: `prefill_host.py` put 13 ms of
the 1k prefill's 37 ms of host time in 29 `fp8_stored_linear` calls, ~450 us each, on an H100).

Each part is called N times back to back without synchronising (the GPU work of one call, ~50 us for M = 1024 at
Flash's 4096 x 4096, is shorter than its host time, so the loop measures issuing), then the GPU is drained. Parts:
the dispatched `ops.linear`, the custom op alone, `scaled_mm_fp8`, `act_quant_fp8`, `e8m0_to_float` of the weight
scales, and `F.scaled_mm` on ready operands.
Usage (repository root, on the GPU machine): PYTHONPATH=. python3 scripts/bench/fp8_linear_host.py [--m 1024]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dsv4 import ops
from dsv4.ops.fp8_linear import _fp8_stored_linear, scaled_mm_fp8
from dsv4.ops.triton.quant import act_quant_fp8
from dsv4.quant.e8m0 import e8m0_to_float


def host_us(fn, n: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    spent = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * spent / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    dev = torch.device("cuda")
    x = torch.randn(args.m, args.k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(args.n, args.k, device=dev).to(torch.float8_e4m3fn)
    s = torch.randint(120, 130, (args.n // 128, args.k // 128), device=dev, dtype=torch.uint8)
    s = s.view(torch.float8_e8m0fnu)
    q, qs = act_quant_fp8(x)
    ws = e8m0_to_float(s)
    parts = {
        "ops.linear (dispatched)": lambda: ops.linear(x, w, s, "fp8", True),
        "custom op _fp8_stored_linear": lambda: _fp8_stored_linear(x, w, s, True),
        "scaled_mm_fp8": lambda: scaled_mm_fp8(x, w, s),
        "act_quant_fp8": lambda: act_quant_fp8(x),
        "e8m0_to_float(weight scales)": lambda: e8m0_to_float(s),
        "F.scaled_mm (ready operands)": lambda: F.scaled_mm(q, w.t(), qs, F.ScalingType.BlockWise1x128, ws.t(),
                                                            F.ScalingType.BlockWise128x128,
                                                            output_dtype=torch.bfloat16),
        "torch.empty (reference)": lambda: torch.empty(args.m, args.k, device=dev),
    }
    with torch.inference_mode():
        for name, fn in parts.items():
            print(f"{host_us(fn, args.calls):9.1f} us host  {name}", flush=True)


if __name__ == "__main__":
    main()
