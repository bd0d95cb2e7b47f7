"""Micro-benchmark of the indexer-scores kernel (`ops/triton/indexer_scores.py`) against its twin
`ops.ref.indexer_scores` (the [n, h, t] per-head dots materialised, then relu, the product with w and the sum over
heads as separate passes) on one GPU, bf16, with the causal visibility of `Indexer.select` (queries at positions
0.., entry j visible iff j < (p + 1) // 4).

Shapes: builtin training (32768 queries x 8192 keys, 16 heads of 128: one CSA layer of a 32k-token step), Flash
prefill 8k (8192 x 2048, 64 heads), and Flash decode (64 sequences x 1 query over 2048 keys each, 64 heads).
Each line: median ms, and the floor = max(FLOPs / 790 TFLOP/s (bf16 dense peak), bytes / 4.8 TB/s) where FLOPs =
2 n t h d over the key blocks the kernel runs (the visible ones, by 128-tiles; the twin runs all of them) and bytes
= q + keys + w + the [n, t] output once (the twin moves its [n, h, t] intermediate ~6 times on top). Kernel configs
are swept (block_s, block_t, warps, stages); each kernel's output is compared with the twin's: the fraction of
scores bit-equal and of top-k picks equal (k = 4 builtin, 512 Flash).
Usage: python3 scripts/bench/indexer_scores.py [--shapes builtin flash_prefill flash_decode] [--repeats 10]
       [--out bench/results/indexer_scores_h200.json]
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from dsv4.bench.timing import cuda_time, summary
from dsv4.ops import ref
from dsv4.ops.triton.indexer_scores import indexer_scores

PEAK_FLOPS, PEAK_BYTES = 790e12, 4.8e12
SHAPES = {  # name: (sequences, queries each, keys each, heads, head dim, top-k, first query position)
    "builtin": (1, 32768, 8192, 16, 128, 4, 0),
    "flash_prefill": (1, 8192, 2048, 64, 128, 512, 0),
    "flash_decode": (64, 1, 2048, 64, 128, 512, 8191),
}
CONFIGS = [(None, None, 8, 2), (128, 128, 4, 2), (128, 64, 4, 2), (64, 128, 4, 2), (128, 128, 8, 3),
           (64, 64, 4, 2)]                 # block_s, block_t (None: the launcher's default), warps, stages


def inputs(b, n, t, h, d, start, gen):
    """w at the model's scale, unit q / keys in bf16, visibility [b, n] of queries at positions start.."""
    w = (torch.randn(b, n, h, device="cuda", generator=gen) * (h * d) ** -0.5).bfloat16()
    q = torch.randn(b, n, h, d, device="cuda", generator=gen).bfloat16()
    keys = torch.randn(b, t, d, device="cuda", generator=gen).bfloat16()
    visible = (torch.arange(start + 1, start + n + 1, device="cuda") // 4).expand(b, n).contiguous()
    return w, q, keys, visible


def floor_s(b, n, t, h, d, visible: torch.Tensor, block: int = 128) -> tuple[float, float, float]:
    """(floor seconds, FLOPs over the visible key blocks, bytes): each query runs the key blocks up to the last
    one that any query of its 128-block sees."""
    vis = torch.nn.functional.pad(visible, (0, -n % block)).view(b, -1, block).amax(-1)     # [b, query blocks]
    cols = ((vis + block - 1) // block * block).clamp(max=t).repeat_interleave(block, dim=1)[:, :n]
    flops = 2.0 * cols.sum().item() * h * d
    nbytes = 2.0 * (b * n * h * d + b * t * d + b * n * h + b * n * t) + visible.numel() * 8
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES), flops, nbytes


def agreement(got: torch.Tensor, twin: torch.Tensor, k: int) -> dict:
    k = min(k, twin.shape[-1])
    picks = ref.stable_topk(got, k).sort(-1).values == ref.stable_topk(twin, k).sort(-1).values
    return {"equal_scores": (got == twin).float().mean().item(), "equal_picks": picks.float().mean().item()}


def timed(name, fn, args, repeats, floor, twin=None, k=0) -> dict:
    try:
        out = fn(*args)
        t = summary(cuda_time(lambda: fn(*args), repeats))["median_s"]
    except Exception as e:                 # a config that does not compile or fit (the twin may OOM): go on
        print(f"  {name:<44} {type(e).__name__}: {str(e)[:160]}", flush=True)
        torch.cuda.empty_cache()
        return {"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}, None
    row = {"name": name, "ms": t * 1e3, "x_floor": t / floor}
    if twin is not None:
        row |= agreement(out, twin, k)
    extra = "" if twin is None else f"  equal scores {row['equal_scores']:.4f} picks {row['equal_picks']:.4f}"
    print(f"  {name:<44} {t * 1e3:9.3f} ms  {t / floor:6.1f}x floor{extra}", flush=True)
    return row, out


def shape_results(label, gen, repeats) -> dict:
    b, n, t, h, d, k, start = SHAPES[label]
    args = inputs(b, n, t, h, d, start, gen)
    floor, flops, nbytes = floor_s(b, n, t, h, d, args[3])
    print(f"{label}: b={b} n={n} t={t} h={h} d={d}; floor {floor * 1e3:.3f} ms ({flops / 1e12:.3f} TFLOP over "
          f"visible key blocks, {nbytes / 1e9:.3f} GB)", flush=True)
    row, twin = timed("twin (ops.ref.indexer_scores)", ref.indexer_scores, args, repeats, floor)
    rows = [row]
    for bs, bt, nw, ns in CONFIGS:
        fn = partial(indexer_scores, block_s=bs, block_t=bt, num_warps=nw, num_stages=ns)
        rows.append(timed(f"kernel bs={bs or 'auto'} bt={bt or 'auto'} w={nw} st={ns}", fn, args, repeats,
                          floor, twin, k)[0])
    del twin
    torch.cuda.empty_cache()
    return {"label": label, "shape": SHAPES[label], "floor_ms": floor * 1e3, "flops": flops, "bytes": nbytes,
            "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", help="write the results here as JSON (e.g. bench/results/indexer_scores_h200.json)")
    args = p.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    results = [shape_results(label, gen, args.repeats) for label in args.shapes]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "shapes": results}, f, indent=1)


if __name__ == "__main__":
    main()
