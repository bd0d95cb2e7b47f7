"""Micro-benchmark of the fused sparse attention kernel (`ops/triton/sparse_attention.py`) against its twin
`ops.ref.sparse_attention` (gathers a [b, s, k, d] tensor, then two einsums) at Flash dims: 64 heads of 512, one
shared KV head, 640 rows per query (128 window + 512 compressed), a quarter of them masked, bf16.

Shapes: decode (s = 1, batch 1 / 8 / 64, each sequence with its own cache of 128 ring slots + 2048 compressed
entries) and prefill (b = 1, an 8192-token chunk over its raw rows + 8192 / 4 compressed entries).
Sweeps block sizes, warps, stages, split-k (auto: ~2 programs per SM) and the loop form (`while`, as in the
interpreter, vs the pipelined `for`). Prints median ms and effective GB/s (the bytes a fused kernel must move at
least: q, the output, the index list and every visible row gathered once per query; repeated reads across head
blocks hit L2 and are not counted) per config, and each output's distance to float64 (`golden.distance`; on the
first 256 queries of a prefill chunk) next to golden's tiled variant's, which docs/parity.md puts at rel. err
~2e-3. The kernel is called directly: it is not in the default dispatch until this shows it wins.
Usage: python3 scripts/bench/sparse_attention.py [--batches 1 8 64] [--prefill 8192] [--repeats 20] [--json PATH]
"""

import argparse
import json
from functools import partial

import torch

from dsv4.bench.timing import cuda_time, summary
from dsv4.ops import golden, ref
from dsv4.ops.triton.sparse_attention import sparse_attention

H, D, WINDOW, PICKED, MASKED = 64, 512, 128, 512, 0.25
CONFIGS = [  # block_h, block_k, num_warps, num_stages, splits (None: default_splits), pipelined; first: the default
    (16, 64, 4, 2, None, True), (16, 64, 4, 2, 1, True), (16, 64, 4, 2, None, False), (16, 32, 4, 3, None, True),
    (16, 64, 8, 2, None, True), (32, 32, 8, 2, None, True), (64, 32, 8, 2, None, True), (64, 32, 8, 1, None, True),
]
CHECK_QUERIES = 256


def inputs(b: int, s: int, n: int, gen: torch.Generator):
    """Unit-RMS q / kv, WINDOW + PICKED random rows of n per query (repeats possible), a quarter masked, sinks ~ 0.
    Row 0 of every list is never masked (the model's window always holds the query itself)."""
    q = torch.randn(b, s, H, D, device="cuda", generator=gen).bfloat16()
    kv = torch.randn(b, n, D, device="cuda", generator=gen).bfloat16()
    idx = torch.randint(0, n, (b, s, WINDOW + PICKED), device="cuda", generator=gen, dtype=torch.int32)
    masked = torch.rand(idx.shape, device="cuda", generator=gen) < MASKED
    masked[..., 0] = False
    sink = torch.randn(H, device="cuda", generator=gen)
    return q, kv, sink, torch.where(masked, -1, idx), D ** -0.5


def min_bytes(q: torch.Tensor, idx: torch.Tensor) -> int:
    visible = int((idx >= 0).sum())
    return 2 * q.numel() * q.element_size() + idx.numel() * idx.element_size() + visible * D * 2


def reference(args) -> tuple[torch.Tensor, float]:
    """float64 over the first CHECK_QUERIES queries, and golden tiled/64's distance to it (the class, for scale)."""
    q, kv, sink, idx, scale = args
    q, idx = q[:, :CHECK_QUERIES], idx[:, :CHECK_QUERIES]
    want = golden.attention_fp32(q.double(), kv.double(), sink.double(), idx, scale, acc=torch.float64)
    tiled = golden.attention_tiled(q.cpu(), kv.cpu(), sink.cpu(), idx.cpu(), scale, 64)
    return want, golden.distance(tiled, want.cpu())["rel_err"]


def timed(name: str, fn, args, want: torch.Tensor, repeats: int) -> dict:
    try:
        out = fn(*args)
        t = summary(cuda_time(lambda: fn(*args), repeats))["median_s"]
    except Exception as e:                       # a config that does not compile / fit (the twin may OOM): go on
        print(f"  {name:<48} {type(e).__name__}: {str(e)[:160]}", flush=True)
        torch.cuda.empty_cache()
        return {"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    gbs = min_bytes(args[0], args[3]) / t / 1e9
    err = golden.distance(out[:, :CHECK_QUERIES], want)["rel_err"]
    print(f"  {name:<48} {t * 1e3:9.3f} ms {gbs:8.1f} GB/s   rel err vs f64 {err:.2e}", flush=True)
    return {"name": name, "ms": t * 1e3, "gb_s": gbs, "rel_err_vs_f64": err}


def shape_results(label: str, b: int, s: int, n: int, gen, repeats: int) -> dict:
    args = inputs(b, s, n, gen)
    want, tiled_err = reference(args)
    print(f"{label}: b={b} s={s} n={n} h={H} d={D} k={WINDOW + PICKED}; golden tiled/64 rel err vs f64 "
          f"{tiled_err:.2e} (the kernel's class)", flush=True)
    rows = [timed("twin (ops.ref.sparse_attention)", ref.sparse_attention, args, want, repeats)]
    for bh, bk, nw, ns, sp, pipe in CONFIGS:
        fn = partial(sparse_attention, block_h=bh, block_k=bk, num_warps=nw, num_stages=ns, splits=sp,
                     pipelined=pipe, check=False)
        rows.append(timed(f"kernel bh={bh} bk={bk} w={nw} st={ns} split={sp or 'auto'}{'' if pipe else ' while'}",
                          fn, args, want, repeats))
    return {"label": label, "b": b, "s": s, "n": n, "tiled64_rel_err_vs_f64": tiled_err, "kernels": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--prefill", type=int, nargs="*", default=[8192], help="prefill chunk sizes (none: skip)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", help="write the results here (e.g. bench/results/sparse_attention_h200.json)")
    args = p.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    shapes = [shape_results(f"decode bs{b}", b, 1, WINDOW + 2048, gen, args.repeats) for b in args.batches]
    shapes += [shape_results(f"prefill {s}", 1, s, s + s // 4, gen, max(3, args.repeats // 4)) for s in args.prefill]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "shapes": shapes}, f, indent=1)


if __name__ == "__main__":
    main()
