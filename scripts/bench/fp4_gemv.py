"""Micro-benchmark of the FP4 pair GEMV (`ops/triton/fp4_gemv.py`, the routed experts at decode) at the bench
model's decode shapes: batch 1 / 8 x top-6 = 6 / 48 (row, expert) pairs over 256 experts, w1/w3 (K 4096 -> N 2048)
and w2 (K 2048 -> N 4096). Each call is captured in a CUDA graph and replayed with the L2 flushed before every
replay (`cold_graph_time`); GB/s counts the distinct experts' FP4 bytes and scales once (the floor a decode step
must read) and "of copy" divides by the measured copy bandwidth. Sweeps block_n x block_g x warps and checks every
configuration against the twin (relative error <= 1e-5: exact products, fp32 sums in another order), and times the
same pairs sorted through the 16-row grouped GEMM (`ops/triton/fp4_grouped.py`, which the MoE takes from 64 pairs).
Decode modes (`--decode`): "default" (per-lane bit placement; always run), "packed"
(inline-PTX fp16x2 placement, `ops/triton/fp4_decode.py`). Each mode's best config is printed; the packed mode
must equal the default bit for bit.
Usage: PYTHONPATH=. python3 scripts/bench/fp4_gemv.py [--decode default packed]
       [--out bench/results/h200_fp4_gemv.json]
"""

import argparse
import json

import torch

from dsv4 import ops
from dsv4.bench.floor import copy_bandwidth
from dsv4.bench.timing import cold_graph_time
from dsv4.ops.triton.fp4_gemv import fp4_pair_gemv
from dsv4.ops.triton.fp4_grouped import fp4_grouped_gemm
from dsv4.quant import fake_quant_fp8

E, TOP_K = 256, 6
SHAPES = {"w1/w3": (2048, 4096), "w2": (4096, 2048)}
TILES = [(bn, bg, nw) for bn in (8, 16, 32) for bg in (16, 32) for nw in (4, 8)]
DECODES = {"default": [{}], "packed": [dict(packed=True)]}


def measure(name: str, N: int, K: int, batch: int, bw: float, flush: torch.Tensor, gen, decodes: list) -> dict:
    w = torch.randint(-128, 128, (E, N, K // 2), dtype=torch.int8, device="cuda", generator=gen)
    s = torch.randint(118, 125, (E, N, K // 32), dtype=torch.uint8, device="cuda", generator=gen)
    s = s.view(torch.float8_e8m0fnu)
    ids = torch.rand(batch, E, device="cuda", generator=gen).topk(TOP_K, dim=-1).indices.flatten()
    x = fake_quant_fp8(torch.randn(ids.numel(), K, device="cuda", generator=gen), 128).bfloat16()
    want = ops.pair_linear.twin(x, ids, w, s, "fp4")
    floor_bytes = ids.unique().numel() * N * (K // 2 + K // 32)
    rows = []
    base = fp4_pair_gemv(x, ids, w, s)
    for mode, bn, bg, nw, opts in [(m, *t, o) for m in decodes for t in TILES for o in DECODES[m]]:
        if (K // 32) % bg:
            continue
        fn = lambda bn=bn, bg=bg, nw=nw, opts=opts: fp4_pair_gemv(x, ids, w, s, block_n=bn,  # noqa: E731
                                                                  block_g=bg, num_warps=nw, **opts)
        try:
            got = fn()
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            t = cold_graph_time(fn, flush)
        except Exception as e:                 # a configuration that does not compile: report and go on
            print(f"  {name} bs{batch} {mode} bn={bn} bg={bg} warps={nw} {opts}: {type(e).__name__}: "
                  f"{str(e)[:160]}", flush=True)
            continue
        rows.append({"decode": mode, "block_n": bn, "block_g": bg, "num_warps": nw, **opts, "us": t * 1e6,
                     "rel_err_vs_twin": err, "equal_to_default": torch.equal(got, base),
                     "of_copy": floor_bytes / t / bw})
    eid, order = ids.sort(stable=True)                # the same pairs through the sorted 16-row grouped GEMM
    xs = x[order].contiguous()
    grouped_us = cold_graph_time(lambda: fp4_grouped_gemm(xs, eid, w, s), flush) * 1e6
    default = next(r for r in rows if (r["decode"], r["block_n"], r["block_g"], r["num_warps"])
                   == ("default", 16, 32, 4))
    bad = [r for r in rows if r["rel_err_vs_twin"] > 1e-5 or not r["equal_to_default"]]
    best = {m: min((r for r in rows if r["decode"] == m), key=lambda r: r["us"]) for m in decodes}
    print(f"{name:>6} bs{batch:<2} pairs {ids.numel():>3}: floor {floor_bytes / bw * 1e6:.1f} us | default config "
          f"{default['us']:.1f} us ({default['of_copy']:.2f} of copy) | sorted 16-row grouped GEMM {grouped_us:.1f}"
          f" us | {'MISMATCH in ' + str(len(bad)) if bad else 'all within 1e-5 of twin, packed == default'}",
          flush=True)
    for m, r in best.items():
        print(f"{'':>8} best {m:<15} {r['us']:7.1f} us ({r['of_copy']:.2f} of copy) bn={r['block_n']} "
              f"bg={r['block_g']} warps={r['num_warps']}", flush=True)
    return {"name": name, "N": N, "K": K, "batch": batch, "pairs": ids.numel(), "floor_bytes": floor_bytes,
            "default": default, "best": best, "grouped_16_row_us": grouped_us, "mismatch": bad, "sweep": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--decode", nargs="+", choices=list(DECODES), default=list(DECODES))
    p.add_argument("--out")
    args = p.parse_args()
    bw = copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    flush = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    decodes = ["default"] + [d for d in args.decode if d != "default"]     # the baseline always runs
    rows = [measure(name, N, K, b, bw, flush, gen, decodes) for b in args.batches for name, (N, K) in SHAPES.items()]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
