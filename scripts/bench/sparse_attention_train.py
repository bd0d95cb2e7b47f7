"""Micro-benchmark of training's sparse attention, forward + backward, at the built-in model's training shape: the
twin under activation checkpointing (`ops/attention.py` `_recompute(ref.sparse_attention)`: what training ran
before the fused op) against the fused training op (`ops/triton/sparse_attention_train.py`), and a block-size sweep
of the op. Rows packs of 256 tokens, 8 heads of 128, one shared KV head; lists of a CSA layer: a 64-token window
plus 16 compressed picks, padded to 128 with -1.
Prints per config the median ms of forward + backward and the output's / gradients' distance to float64 (first
rows only: float64 on the whole pack is slow), as JSON lines; the last line is a summary.
Usage: python3 scripts/bench/sparse_attention_train.py [--rows 128] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_sparse_attention_train import _grads, _rel, _train_inputs  # the GPU test's own inputs

from dsv4.bench.timing import cuda_time, summary
from dsv4.ops import ref
from dsv4.ops.attention import _recompute, sparse_attention_train
from dsv4.ops.triton import sparse_attention_train as sat

CONFIGS = [(32, 4), (64, 4), (32, 8), (16, 4)]     # (block_k, num_warps) of forward and backward; first: the default


def step(fn, q, kv, sink, idx, do):
    leaves = [t.detach().requires_grad_() for t in (q, kv, sink)]

    def run():
        o = fn(*leaves, idx, q.shape[-1] ** -0.5)
        o.backward(do)
    return run


class _Swept(torch.autograd.Function):
    """The op's forward and backward launchers at another (block_k, num_warps), with autograd."""

    @staticmethod
    def forward(ctx, q, kv, sink, idx, scale, block_k, warps):
        o, lse = sat.forward(q, kv, sink, idx, scale, block_k=block_k, num_warps=warps)
        ctx.save_for_backward(q, kv, sink, idx, o, lse)
        ctx.args = (scale, block_k, warps)
        return o

    @staticmethod
    def backward(ctx, do):
        q, kv, sink, idx, o, lse = ctx.saved_tensors
        scale, block_k, warps = ctx.args
        return (*sat.backward(do, q, kv, sink, idx, o, lse, scale, block_k=block_k, num_warps=warps),
                None, None, None, None)


def fused(block_k: int, warps: int):
    return lambda q, kv, sink, idx, scale: _Swept.apply(q, kv, sink, idx, scale, block_k, warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=128, help="rows of 256 tokens (128: a 32k-token training pack)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    q, kv, sink, idx, do = _train_inputs("cuda", torch.bfloat16, rows=args.rows)
    few = (q[:2], kv[:2], sink, idx[:2], do[:2])
    exact = _grads(ref.sparse_attention, *few, torch.float64)
    results = {}
    variants = {"twin_recompute": lambda *a: _recompute(ref.sparse_attention, *a),
                "op_default": sparse_attention_train,
                **{f"fused_k{k}_w{w}": fused(k, w) for k, w in CONFIGS}}
    for name, fn in variants.items():
        torch.cuda.reset_peak_memory_stats()
        t = summary(cuda_time(step(fn, q, kv, sink, idx, do), args.repeats))
        errs = [_rel(a, b) for a, b in zip(_grads(fn, *few, torch.bfloat16), exact, strict=True)]
        results[name] = {"ms": round(t["median_s"] * 1e3, 3), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                         "rel_err_out_dq_dkv_dsink": [f"{e:.2e}" for e in errs]}
        print(json.dumps({name: results[name]}), flush=True)
    tokens = args.rows * 256
    print(json.dumps({"tokens": tokens, "twin_ms": results["twin_recompute"]["ms"],
                      "op_ms": results["op_default"]["ms"],
                      "speedup": results["twin_recompute"]["ms"] / results["op_default"]["ms"]}))


if __name__ == "__main__":
    main()
