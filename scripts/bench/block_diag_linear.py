"""Micro-benchmark of attention's wo_a held FP8 (`ops.block_diag_linear`) at Flash's dims (G=8, R=1024, K=4096).

Per M: the einsum that ran before (a bf16 copy of the weight, `bsgd,grd->bsgr`, cuBLAS), the dispatched op (the
small-M FP8 kernel with groups up to 64 rows, the per-call bf16 decode + einsum above), and the kernel's fp32
partials summed in the graph (`small_m_traced`, what the compiled decode step runs). Every call is captured in a
CUDA graph and replayed with the L2 flushed; medians. "floor" = the bytes the FP8 path must move (weight + scales +
x + y) over the measured copy bandwidth. Errors: relative Frobenius against the twin, max against float64 per
sum|x_k w_k|; and whether a row computed alone has the bits it has in the batch (M <= 64).
Usage: PYTHONPATH=. python3 scripts/bench/block_diag_linear.py [--out PATH]
"""

import argparse
import json

import torch

from dsv4 import ops, quant
from dsv4.bench.floor import copy_bandwidth
from dsv4.bench.timing import cold_graph_time
from dsv4.ops.fp8_linear import small_m_traced

G, R, K = 8, 1024, 4096
ROWS = (1, 8, 64, 256, 1024)


def measure(m: int, bw: float, flush: torch.Tensor) -> dict:
    gen = torch.Generator("cuda").manual_seed(m)
    w, s = quant.quant_fp8(torch.randn(G * R, K, device="cuda", generator=gen) / K ** 0.5)
    x = torch.randn(1, m, G, K, device="cuda", generator=gen).bfloat16()
    copy = ops.dequant_weight(w, s, "fp8").bfloat16().view(G, R, K)
    row = {"M": m, "floor_us": (w.numel() + s.numel() + 2 * m * G * (K + R)) / bw * 1e6}
    with torch.inference_mode():
        row["bf16_einsum_us"] = cold_graph_time(lambda: torch.einsum("bsgd,grd->bsgr", x, copy), flush) * 1e6
        row["op_us"] = cold_graph_time(lambda: ops.block_diag_linear(x, w, s, "fp8"), flush) * 1e6
        if m <= 64:
            row["traced_sum_us"] = cold_graph_time(lambda: small_m_traced(x.flatten(-2), w, s, False, G), flush) * 1e6
        y = ops.block_diag_linear(x, w, s, "fp8")
        twin = ops.block_diag_linear.twin(x, w, s, "fp8").double()
        wd = copy.double()
        exact = torch.einsum("bsgd,grd->bsgr", x.double(), wd)
        abs_sum = torch.einsum("bsgd,grd->bsgr", x.double().abs(), wd.abs())
        row["rel_vs_twin"] = ((y.double() - twin).norm() / twin.norm()).item()
        row["max_vs_float64"] = ((y.double() - exact).abs() / abs_sum).max().item()
        if m <= 64:
            row["row_alone_same_bits"] = torch.equal(ops.block_diag_linear(x[:, -1:], w, s, "fp8"), y[:, -1:])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the measurements as JSON here")
    args = p.parse_args()
    bw = copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    flush = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    rows = []
    for m in ROWS:
        rows.append(measure(m, bw, flush))
        r = rows[-1]
        print(f"M={m:<5} floor {r['floor_us']:7.2f} us | bf16 einsum {r['bf16_einsum_us']:7.2f} | op {r['op_us']:7.2f}"
              + (f" | traced sum {r['traced_sum_us']:7.2f}" if "traced_sum_us" in r else "")
              + f" | err {r['rel_vs_twin']:.1e} vs twin, {r['max_vs_float64']:.1e} vs f64"
              + (f" | row alone same bits {r['row_alone_same_bits']}" if "row_alone_same_bits" in r else ""),
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
