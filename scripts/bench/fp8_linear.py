"""Micro-benchmark of the FP8 linear on the stored bytes (`ops/fp8_linear.py`) at Flash's dense shapes.

Decode sizes (M = 1, 8, 64): the Triton kernel (`ops/triton/fp8_linear.py`, swapped-operand FP8 MMA, act quant
fused; a small sweep of block_n and split-K) against what v1-v7 ran (a bf16 copy of the weight + cuBLAS, with the
act quant in its own kernel) and cuBLAS's blockwise FP8 GEMM (`scaled_mm`). Prefill sizes (M = 1024, 8192):
scaled_mm against the bf16 copy. Every call is captured in a CUDA graph and replayed with the L2 flushed (decode
reads ~2 GB per step, so cold numbers are the relevant ones); medians. "of copy" = the bytes the path must move
(FP8 weight + scales + x + y) over the time, divided by the measured copy bandwidth. Errors: relative Frobenius
against the twin (`ops.linear.twin`) and max error against float64 per sum|x_k w_k|.
`--prequant`: decode sizes only, the kernel quantising x itself (`prequant=False`, the default below 33 rows) against
`prequant=True` (x quantised once per call by `act_quant_fp8`, not in every program; bit for bit the same result;
the default from 33 rows), with the quantisation's launch counted; each with its error against float64.
Usage: PYTHONPATH=. python3 scripts/bench/fp8_linear.py [--quick | --prequant] [--out PATH]
"""

import argparse
import json
import math
from functools import partial

import torch
import torch.nn.functional as F

from dsv4 import ops, quant
from dsv4.bench.floor import copy_bandwidth
from dsv4.bench.timing import cold_graph_time
from dsv4.checkpoint.inventory import inventory
from dsv4.config import ModelConfig
from dsv4.ops.fp8_linear import scaled_mm_fp8
from dsv4.ops.triton.fp8_linear import fp8_linear_small_m

DECODE, PREFILL = (1, 8, 64), (1024, 8192)


def flash_shapes() -> list[tuple[str, int, int]]:
    """(name, N, K) of the dense FP8 linears of layer 2 (a CSA layer: it has the indexer's wq_b too)."""
    specs = inventory(ModelConfig.preset("flash").truncated(4))
    return [(n.removeprefix("layers.2.").removesuffix(".weight"), *spec.shape) for n, spec in specs.items()
            if n.startswith("layers.2.") and spec.dtype == "F8_E4M3" and ".experts." not in n and "wo_a" not in n]


def configs(quick: bool) -> list[dict]:
    if quick:
        return [{}, {"block_m": 64}]                            # block_m 64: v10's tile at 33-64 rows (not invariant)
    return [{"block_n": bn, "programs_per_sm": p} for bn in (64, 128) for p in (2, 4, 8)] + [{"split_k": 1},
                                                                                               {"block_m": 64}]


def errors(y: torch.Tensor, x, w, s) -> dict:
    xq, wd = quant.fake_quant_fp8(x, 128).double(), ops.dequant_weight(w, s, "fp8").double()
    twin = ops.linear.twin(x, w, s, "fp8", True).double()
    return {"rel_vs_twin": ((y.double() - twin).norm() / twin.norm()).item(),
            "max_vs_float64": ((y.double() - xq @ wd.T).abs() / (xq.abs() @ wd.abs().T)).max().item()}


def inputs(N: int, K: int, m: int):
    """(x, w, s) of a shape: an FP8 weight of unit-variance products and bf16 rows, seeded by the shape."""
    gen = torch.Generator("cuda").manual_seed(N * 7 + K + m)
    w, s = quant.quant_fp8(torch.randn(N, K, device="cuda", generator=gen) / math.sqrt(K))
    return torch.randn(m, K, device="cuda", generator=gen).bfloat16(), w, s


def measure(name, N, K, m, bw, flush, quick) -> dict:
    x, w, s = inputs(N, K, m)
    copy = ops.dequant_weight(w, s, "fp8").bfloat16()
    need = N * K + s.numel() + m * K * 2 + m * N * 2
    row = {"name": name, "N": N, "K": K, "M": m, "floor_us": need / bw * 1e6}
    row["bf16_copy_us"] = cold_graph_time(lambda: F.linear(ops.fake_quant_fp8(x, 128), copy), flush) * 1e6
    if m >= 16 or m == 8:
        try:
            row["scaled_mm_us"] = cold_graph_time(lambda: scaled_mm_fp8(x, w, s), flush) * 1e6
            row["scaled_mm_err"] = errors(scaled_mm_fp8(x, w, s), x, w, s)
        except Exception as e:
            row["scaled_mm_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if m in DECODE:
        sweep = []
        for cfg in configs(quick):
            try:
                sweep.append({**cfg, "us": cold_graph_time(lambda cfg=cfg: fp8_linear_small_m(x, w, s, True, **cfg),
                                                           flush) * 1e6})
            except Exception as e:
                print(f"  {name} M={m} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        best = min(sweep, key=lambda r: r["us"])
        cfg = {k: v for k, v in best.items() if k != "us"}
        row.update(kernel_us=best["us"], kernel_best=cfg, kernel_frac_of_copy=row["floor_us"] / best["us"],
                   kernel_default_us=next((r["us"] for r in sweep if not ({"block_n", "programs_per_sm"} - r.keys())
                                           and r["block_n"] == 64 and r["programs_per_sm"] == 4), None),
                   kernel_err=errors(fp8_linear_small_m(x, w, s, True, **cfg), x, w, s), sweep=sweep)
    return row


def line(r: dict) -> str:
    out = (f"{r['name']:>22} {r['N']:>5}x{r['K']:<5} M={r['M']:<5} floor {r['floor_us']:7.2f} us | bf16 copy "
           f"{r['bf16_copy_us']:7.2f}")
    if "scaled_mm_us" in r:
        out += f" | scaled_mm {r['scaled_mm_us']:7.2f} (err {r['scaled_mm_err']['rel_vs_twin']:.1e})"
    if "kernel_us" in r:
        out += (f" | triton {r['kernel_us']:7.2f} ({r['kernel_frac_of_copy']:.2f} of copy; default "
                f"{r['kernel_default_us'] or float('nan'):.2f}; err {r['kernel_err']['rel_vs_twin']:.1e}, "
                f"{r['kernel_err']['max_vs_float64']:.1e} vs f64) {r['kernel_best']}")
    return out


VARIANTS = {"in_kernel": {"prequant": False}, "prequant": {"prequant": True}}


def prequant_rows(bw, flush) -> list[dict]:
    """--prequant: per shape and decode M, us of the kernel quantising x itself and with x quantised once per call
    (its act_quant launch included), whether they give the same bits, and each one's worst error against float64 of
    the same operands over sum|x_k w_k| (the FP8 MMA: ~1e-4..1e-3)."""
    rows = []
    for name, N, K in flash_shapes():
        for m in DECODE:
            x, w, s = inputs(N, K, m)
            same = torch.equal(fp8_linear_small_m(x, w, s, True, prequant=False),
                               fp8_linear_small_m(x, w, s, True, prequant=True))
            r = {"name": name, "N": N, "K": K, "M": m, "floor_us": (N * K + m * K * 2 + m * N * 2) / bw * 1e6,
                 "same_bits": same}
            for key, kw in VARIANTS.items():
                call = partial(fp8_linear_small_m, x, w, s, True, **kw)
                r[f"{key}_us"] = cold_graph_time(call, flush) * 1e6
                # the fp32 accumulator: a bf16 output's rounding would hide their difference
                r[f"{key}_err"] = errors(call(out_dtype=torch.float32), x, w, s)["max_vs_float64"]
            print(f"{name:>22} {N:>5}x{K:<5} M={m:<3} floor {r['floor_us']:6.2f} | " + " | ".join(
                f"{key} {r[f'{key}_us']:7.2f} ({r[f'{key}_err']:.1e})" for key in VARIANTS) + f" | same bits {same}",
                flush=True)
            rows.append(r)
    for m in DECODE:
        mine = [r for r in rows if r["M"] == m]
        print(f"M={m}: {len(mine)} linears: floor {sum(r['floor_us'] for r in mine):.1f}, " + ", ".join(
            f"{key} {sum(r[f'{key}_us'] for r in mine):.1f}" for key in VARIANTS) + " us")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only the default kernel configuration")
    p.add_argument("--prequant", action="store_true",
                   help="decode sizes: x quantised in the kernel against once per call (prequant)")
    p.add_argument("--out", help="write every measurement as JSON here")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    flush = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    if args.prequant:
        rows = prequant_rows(bw, flush)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"gpu": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=1)
        return
    rows = []
    for name, N, K in flash_shapes():
        for m in DECODE + PREFILL:
            rows.append(measure(name, N, K, m, bw, flush, args.quick))
            print(line(rows[-1]), flush=True)
    for m in DECODE + PREFILL:
        mine = [r for r in rows if r["M"] == m]
        tot = {k: sum(r.get(k, 0.0) for r in mine) for k in ("floor_us", "bf16_copy_us", "scaled_mm_us", "kernel_us")}
        print(f"M={m}: a block's {len(mine)} FP8 linears: " + ", ".join(f"{k} {v:.1f}" for k, v in tot.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
