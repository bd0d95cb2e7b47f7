"""Micro-benchmark of every FP4 routed-expert kernel at the decode batches (and the 1k prefill), K 4096 -> N 2048,
256 experts (the bench model's w1 / w3), so that one GPU call shows which kernel each regime should run.

Per batch of tokens (top-6 of 256, uniform random scores, FP8-quantised bf16 rows sorted by expert, as the MoE's
sorted path feeds them; the pair GEMV takes the same rows, it does not care about the order):
* the path the MoE dispatches today (`ops.grouped_linear` from one row per expert, the pair GEMV below);
* the pair GEMV (`fp4_gemv.fp4_pair_gemv`), the swapped-operand kernel (`fp4_grouped_swapped`), the FP8-MMA kernel
  (`fp4_prefill_fp8mma`, the reference's FP8 x FP8 arithmetic: per-32 and folded, a few tiles and pipeline depths).
Each row: us per call and TB/s of the weight bytes the call must read (the FP4 bytes and scales of the experts with
rows, once), and its relative error against the dispatched result. Timing: `calls` back-to-back calls captured in
one CUDA graph, each after an L2 flush (a zeroed 256 MB buffer), minus a graph of the flushes alone, divided by
`calls`: a call's cold-cache time as a captured decode step runs it, without the graph launch's own latency (a
single-kernel replay adds ~4-5 us, which is half of a batch-1 call's byte time).
The FP8-MMA kernel's accumulation is below fp32 within a 32-K sub-block (the reference's own; flagged above 4e-3).
`--only layout`: the kernels the MoE may dispatch over the stored and the tile-major layout (`dsv4.ops.fp4_layout`);
`--only unroll`: UNROLL 128-K blocks per loop step; `--only sweep`: the decode kernel over the tile-major layout
under 64 / 128 weight rows per program (128: two 64-row tiles, one per warpgroup with 8 warps), 4 / 8 warps and
2-4 stages, and at prefill sizes the direct kernel against the FP8-MMA prefill kernel over the tile-major layout.
`--only gemv`: the pair GEMV (the default at batch 1 while the decode kernel is opt-in) over both layouts at 16 /
32 / 64 rows per program (64: a program streams its rows' whole tile-major run), 16 / 32 scale groups a step,
4 / 8 warps.
(The thirtieth session's `--only tiled | sweep` modes, the decode kernel over 64- and 128-row tile layouts, are in
git history: bench/results/h100_s30 calls B and C.)
Usage: PYTHONPATH=. python3 scripts/bench/fp4_decode_kernels.py [--tokens 1 8 64 1024]
       [--only all|layout|unroll|sweep|gemv] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from dsv4 import ops
from dsv4.bench.timing import capture_graph, replay_median
from dsv4.ops.fp4_layout import to_tiled
from dsv4.ops.grouped_linear import direct_tiles
from dsv4.ops.triton.fp4_decode_fp8mma import fp4_decode_fp8mma
from dsv4.ops.triton.fp4_gemv import fp4_pair_gemv
from dsv4.ops.triton.fp4_grouped_direct import fp4_grouped_gemm_direct
from dsv4.ops.triton.fp4_grouped_prefill import expert_offsets, fp4_grouped_gemm_prefill
from dsv4.ops.triton.fp4_grouped_swapped import fp4_grouped_gemm_swapped
from dsv4.quant import fake_quant_fp8

E, N, K, TOP_K = 256, 2048, 4096, 6
DEVICE = "cuda"
FP4_TOL, FP8MMA_TOL = 1e-5, 4e-3
# FP8-MMA: (block_m tokens, block_n weight rows, warps, stages, fold)
FP8MMA_CONFIGS = [(16, 128, 4, 3, False), (16, 64, 4, 3, False), (16, 64, 4, 4, False), (16, 128, 4, 4, False),
                  (16, 128, 8, 3, False), (16, 64, 4, 3, True), (16, 128, 4, 3, True), (32, 128, 4, 3, False)]
SWAPPED_CONFIGS = [(16, 64, 4), (16, 128, 4), (32, 64, 4)]
# The split-K decode kernel (`fp4_decode_fp8mma`): (mapping, split, block_m, block_n, warps, stages); its partials
# summed in the call. Offline (sm_90, Triton 3.9) K loop instructions per weight: 16 x 128 / 4 warps 2.9, 8 x 128 /
# 4 2.4 (1 stage: 2.2, no weight tile through shared memory), 8 x 256 / 4 2.0 (the wgmma's N 8: half the FFMAs).
DECODE_CONFIGS = [("pairs", 1, 16, 128, 4, 3), ("pairs", 4, 16, 128, 4, 3), ("pairs", 8, 16, 128, 4, 3),
                  ("pairs", 4, 8, 128, 4, 3), ("pairs", 8, 8, 128, 4, 3), ("pairs", 8, 8, 128, 4, 1),
                  ("pairs", 8, 8, 128, 4, 2), ("pairs", 4, 8, 256, 4, 3), ("pairs", 8, 8, 256, 4, 1),
                  ("sorted", 1, 16, 128, 4, 3), ("sorted", 2, 16, 128, 4, 3), ("sorted", 1, 8, 128, 4, 3),
                  ("sorted", 2, 8, 128, 4, 3), ("sorted", 2, 8, 128, 4, 1), ("sorted", 4, 8, 128, 4, 1),
                  ("sorted", 2, 8, 256, 4, 3), ("sorted", 1, 16, 256, 8, 3)]


def graph_time(fn, flush: torch.Tensor, calls: int = 20, reps: int = 15) -> float:
    """Seconds per call: `calls` x (flush, fn) in one graph minus `calls` flushes, medians over `reps` replays."""
    def both():
        for _ in range(calls):
            flush.zero_()
            fn()

    def flushes():
        for _ in range(calls):
            flush.zero_()

    both_s = replay_median(capture_graph(both), reps)
    return max(both_s - replay_median(capture_graph(flushes), reps), 0.0) / calls


def rows_for(tokens: int, gen):
    eid = torch.rand(tokens, E, device=DEVICE, generator=gen).topk(TOP_K, dim=-1).indices.flatten().sort().values
    x = fake_quant_fp8(torch.randn(tokens * TOP_K, K, device=DEVICE, generator=gen), 128).bfloat16()
    return eid, x


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --only layout: each kernel the MoE may dispatch over the stored layout and over the tile-major one
# (`dsv4.ops.fp4_layout`, which every FP4 kernel reads; the MoE holds it with DSV4_FP4_TILED=1), same configs
def _layout(x, eid, offs, w, s, cands) -> list:
    wt = tiled_weight(w)
    m = eid.numel()
    for name, weight in (("stored", w), ("TILED", wt)):
        if m < E:
            cands.append((f"pair GEMV {name}", partial(fp4_pair_gemv, x, eid, weight, s)))
            cands.append((f"decode {name} pairs split4 16x64/4", partial(
                decode_sum, x, eid, weight, s, split=4, block_m=16, block_n=64)))
        else:
            cands.append((f"dispatched {name}", partial(ops.grouped_linear, x, eid, weight, s, "fp4", fp8_grid=True)))
        tiles = direct_tiles(m, E)
        if tiles is not None:
            for u in (1, 2):
                cands.append((f"direct {name} {tiles[0]}x{tiles[1]}/{tiles[2]} unroll{u}", partial(
                    fp4_grouped_gemm_direct, x, eid, weight, s, block_m=tiles[0], block_n=tiles[1],
                    num_warps=tiles[2], num_stages=tiles[3], xperm=tiles[4], unroll=u)))
            continue
        for u in (1, 2):
            cands.append((f"swapped {name} korder 16x64/4 unroll{u}", partial(
                fp4_grouped_gemm_swapped, x, eid, weight, s, block_m=16, block_n=64, num_warps=4, korder=True,
                unroll=u)))
        for sp in (1, 2):
            cands.append((f"decode {name} sorted split{sp} 16x64/4", partial(
                decode_sum, x, eid, weight, s, offs=offs, split=sp, block_m=16, block_n=64)))
    return cands


def _unroll(x, eid, offs, w, s, tokens, cands) -> list:
    """--only unroll: UNROLL 128-K blocks per loop step (each row's next 64 * UNROLL bytes requested together) in the
    swapped kernel (dispatched at bs64 and nowhere else) and the decode kernel over the stored layout, against the
    tile-major layout (call B's best)."""
    bm = 16 if tokens <= 64 else 32
    tiles = direct_tiles(eid.numel(), E)
    if tiles is not None:           # prefill: the direct kernel (dispatched from 16 rows per expert)
        for u in (1, 2, 4):
            cands.append((f"direct {tiles[0]}x{tiles[1]}/{tiles[2]} unroll{u}", partial(
                fp4_grouped_gemm_direct, x, eid, w, s, block_m=tiles[0], block_n=tiles[1], num_warps=tiles[2],
                num_stages=tiles[3], xperm=tiles[4], unroll=u)))
        return cands
    for u in (1, 2, 4):
        cands.append((f"swapped korder {bm}x64/4 unroll{u}", partial(
            fp4_grouped_gemm_swapped, x, eid, w, s, block_m=bm, block_n=64, num_warps=4, korder=True, unroll=u)))
    for u in (1, 2, 4):
        cands.append((f"decode stored sorted split1 16x64/4 unroll{u}", partial(
            decode_sum, x, eid, w, s, offs=offs, block_m=16, block_n=64, unroll=u)))
    cands.append(("decode TILED sorted split1 16x64/4", partial(
        decode_sum, x, eid, tiled_weight(w), s, offs=offs, block_m=16, block_n=64)))
    return cands


def _sweep(x, eid, offs, w, s, cands) -> list:
    """--only sweep: the configurations the thirty-first session left untried over the tile-major layout."""
    wt = tiled_weight(w)
    m = eid.numel()
    tiles = direct_tiles(m, E)
    if tiles is not None:           # prefill sizes: the dispatched direct kernel against the FP8-MMA prefill kernel
        cands.append(("direct TILED (dispatched)", partial(ops.grouped_linear, x, eid, wt, s, "fp4", fp8_grid=True)))
        for bm, bn, nw, st, fold in [(32, 128, 4, 3, False), (64, 128, 8, 3, False), (64, 64, 4, 3, True),
                                     (64, 128, 8, 3, True), (128, 128, 8, 3, True)]:
            cands.append((f"fp8mma{' fold' if fold else ''} TILED {bm}x{bn}/{nw} st{st}", partial(
                fp4_grouped_gemm_prefill, x, eid, wt, s, block_m=bm, block_n=bn, num_warps=nw, num_stages=st,
                fp8mma="fold" if fold else True)))
        return cands
    pairs = m < 16                  # a few rows: one program per row, as `pair_linear` maps them
    for sp in (4, 8) if pairs else (1, 2):
        for bn, nw in ((64, 4), (64, 8), (128, 4), (128, 8)):
            for st in (2, 3, 4):
                cands.append((f"decode TILED {'pairs' if pairs else 'sorted'} split{sp} 16x{bn}/{nw} st{st}",
                              partial(decode_sum, x, eid, wt, s, offs=None if pairs else offs, split=sp, block_m=16,
                                      block_n=bn, num_warps=nw, num_stages=st)))
    return cands


def _gemv(x, eid, w, s, cands) -> list:
    """--only gemv: the pair GEMV's tile over the stored and the tile-major layout."""
    for name, weight in (("stored", w), ("TILED", tiled_weight(w))):
        for bn in (16, 32, 64):
            for bg in (16, 32):
                for nw in (4, 8):
                    cands.append((f"pair GEMV {name} {bn} rows {bg} groups /{nw}", partial(
                        fp4_pair_gemv, x, eid, weight, s, block_n=bn, block_g=bg, num_warps=nw)))
    return cands


def shape(tokens: int, w, s, gen, flush, only: str = "all") -> dict:
    eid, x = rows_for(tokens, gen)
    m, used = eid.numel(), eid.unique().numel()
    weight_bytes = used * N * (K // 2 + K // 32)
    print(f"{tokens} tokens: {m} pairs over {used} experts ({weight_bytes / 1e6:.1f} MB of weights; "
          f"floor {weight_bytes / 3.35e12 * 1e6:.1f} us at 3.35 TB/s)", flush=True)

    def dispatched():
        if m < E:                                   # the MoE's pair path (`routed_pairs`) below one row per expert
            return fp4_pair_gemv(x, eid, w, s)
        return ops.grouped_linear(x, eid, w, s, "fp4", fp8_grid=True)
    ref = dispatched()
    cands = [("dispatched", dispatched), ("pair GEMV", partial(fp4_pair_gemv, x, eid, w, s))]
    offs = expert_offsets(eid, E)
    if only == "unroll":
        return _timed_rows(tokens, m, used, weight_bytes, _unroll(x, eid, offs, w, s, tokens, cands[:1]), ref, flush)
    if only == "gemv":
        return _timed_rows(tokens, m, used, weight_bytes, _gemv(x, eid, w, s, cands[:1]), ref, flush)
    if only == "sweep":
        return _timed_rows(tokens, m, used, weight_bytes, _sweep(x, eid, offs, w, s, cands[:1]), ref, flush)
    if only == "layout":
        return _timed_rows(tokens, m, used, weight_bytes, _layout(x, eid, offs, w, s, cands[:1]), ref, flush)
    cands += [(f"swapped korder {bm}x{bn}/{nw}", partial(fp4_grouped_gemm_swapped, x, eid, w, s, block_m=bm,
                                                         block_n=bn, num_warps=nw, korder=True))
              for bm, bn, nw in SWAPPED_CONFIGS]
    cands += [(f"fp8mma{' fold' if fold else ''} {bm}x{bn}/{nw} st{st}",
               partial(fp4_grouped_gemm_prefill, x, eid, w, s, block_m=bm, block_n=bn, num_warps=nw, num_stages=st,
                       fp8mma="fold" if fold else True)) for bm, bn, nw, st, fold in FP8MMA_CONFIGS]

    cands += [(f"decode_fp8mma {mp} split{sp} {bm}x{bn}/{nw} st{st}",
               partial(decode_sum, x, eid, w, s, offs=offs if mp == "sorted" else None, split=sp, block_m=bm,
                       block_n=bn, num_warps=nw, num_stages=st))
              for mp, sp, bm, bn, nw, st in DECODE_CONFIGS if mp == "sorted" or m <= 8 * E]
    return _timed_rows(tokens, m, used, weight_bytes, cands, ref, flush)


def decode_sum(*args, **kwargs) -> torch.Tensor:
    """`fp4_decode_fp8mma` with its split partials summed, as its callers in `dsv4.ops` do."""
    return fp4_decode_fp8mma(*args, **kwargs).sum(0)


_TILED: list[torch.Tensor] = []


def tiled_weight(w: torch.Tensor) -> torch.Tensor:
    """`fp4_layout.to_tiled(w)`, made once (a copy as large as the stack: 1 GB here)."""
    if not _TILED:
        _TILED.append(to_tiled(w))
    return _TILED[0]


def _timed_rows(tokens, m, used, weight_bytes, cands, ref, flush) -> dict:
    rows = []
    for name, fn in cands:
        try:
            out = fn()
            t = graph_time(fn, flush)
        except Exception as e:                      # a config that does not compile / fit: say so, go on
            print(f"  {name:<34} {type(e).__name__}: {str(e)[:150]}", flush=True)
            rows.append({"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        err = rel(out, ref)
        tol = FP8MMA_TOL if "fp8mma" in name or "decode" in name else FP4_TOL
        flag = "" if err <= tol else "  MISMATCH"
        print(f"  {name:<34} {t * 1e6:8.1f} us {weight_bytes / t / 1e12 if t else 0:6.2f} TB/s  rel err "
              f"{err:.1e}{flag}", flush=True)
        rows.append({"name": name, "us": t * 1e6, "weight_tbps": weight_bytes / t / 1e12 if t else None,
                     "rel_err": err, "mismatch": bool(flag)})
    return {"tokens": tokens, "pairs": m, "experts_used": used, "weight_bytes": weight_bytes, "kernels": rows}


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 1024])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--only", choices=["all", "layout", "unroll", "sweep", "gemv"], default="all")
    args = p.parse_args()
    gen = torch.Generator(DEVICE).manual_seed(0)
    w = torch.randint(-128, 128, (E, N, K // 2), dtype=torch.int8, device=DEVICE, generator=gen)
    s = torch.randint(118, 125, (E, N, K // 32), dtype=torch.uint8, device=DEVICE, generator=gen)
    s = s.view(torch.float8_e8m0fnu)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)
    shapes = [shape(t, w, s, gen, flush, args.only) for t in args.tokens]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "E": E, "N": N, "K": K, "shapes": shapes}, f, indent=1)


if __name__ == "__main__":
    main()
