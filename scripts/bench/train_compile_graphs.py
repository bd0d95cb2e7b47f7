"""The graphs a compiled training step hands to inductor (issue 17), counted on CPU.

Runs one training step of the built-in v2 (random weights, QAT on, MTP 0.3, one pack padded to --tokens) with every
block compiled through AOTAutograd (the graphs inductor would get, run eagerly) and counts, per forward and backward
graph times its calls (blocks of one kind share a graph), the ATen ops by kind: "extern" ops that inductor leaves as
library calls or fixed kernels (GEMMs, sorts, index scatters with accumulation, ...), "complex" ops (the RoPE
rotation: inductor has no complex codegen and runs them eagerly), reductions, and the pointwise / view ops it fuses.
Kernels after inductor are estimated as extern + complex + reductions (each reduction starts a fused kernel; the
pointwise ops around it join it): an estimate, not a measurement. Eager ops per step: scripts/bench/train_step_ops.py.
Usage: PYTHONPATH=. python3 scripts/bench/train_compile_graphs.py [--tokens 256]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile

import torch
from torch._dynamo.backends.common import aot_autograd

EXTERN = ("mm", "bmm", "addmm", "baddbmm", "_scaled_mm", "sort", "topk", "index_put", "index_add", "scatter_add",
          "embedding_dense_backward", "bincount", "cumsum", "nonzero", "_local_scalar_dense", "index_select", "gather",
          "scatter")
REDUCTIONS = ("sum", "mean", "amax", "amin", "max", "min", "any", "all", "_softmax", "_log_softmax", "argmax")
VIEWS = ("view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "slice",
         "select", "alias", "unflatten", "flatten", "as_strided", "split", "unbind", "detach", "clone")


def kind(node) -> str:
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    val = node.meta.get("val")
    if name in EXTERN:
        return "extern"
    if isinstance(val, torch.Tensor) and val.is_complex():     # inductor has no complex codegen: eager fallbacks
        return "complex"
    if name in REDUCTIONS:
        return "reduction"
    if name in VIEWS:
        return "view"
    return "pointwise"


class Counter:
    def __init__(self):
        self.graphs = []

    def compiler(self, part):
        def compile_graph(gm, example_inputs):
            ops = [n for n in gm.graph.nodes if n.op == "call_function"]
            record = [part, collections.Counter(kind(n) for n in ops),
                      collections.Counter(str(n.target) for n in ops if kind(n) in ("extern", "complex")), 0]
            self.graphs.append(record)

            def run(*args):               # blocks of one kind share a graph: count its calls
                record[3] += 1
                return gm.forward(*args)
            return run
        return compile_graph

    def backend(self):
        return aot_autograd(fw_compiler=self.compiler("forward"), bw_compiler=self.compiler("backward"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    import dsv4
    from dsv4.builtin import builtin_config
    from dsv4.checkpoint import synthesize
    from dsv4.train.compiled import compile_blocks, pad_batch
    from dsv4.train.data import Document
    from dsv4.train.forward import TrainStep, packed_batch
    from dsv4.train.params import prepare_full, refresh_qat

    path = synthesize(builtin_config(2), tempfile.mkdtemp(), seed=0, progress=False)
    model = prepare_full(dsv4.load_model(path, dtype=torch.float32, progress=False), qat=True)
    counter = Counter()
    compile_blocks(model, counter.backend())
    rng = random.Random(0)
    n = args.tokens - 10
    pb = pad_batch(packed_batch([Document([rng.randrange(6144) for _ in range(n)], [True] * n)], "cpu"), args.tokens)
    refresh_qat(model)
    ce, mtp, _, _ = TrainStep(model, False, 0.3)(pb)
    (ce + mtp).backward()
    total = collections.Counter()
    externs = collections.Counter()
    for part, kinds, ext, calls in counter.graphs:
        total.update({f"{part}.{k}": v * calls for k, v in kinds.items()})
        externs.update({k: v * calls for k, v in ext.items()})
    fused = sum(v for k, v in total.items() if k.split(".")[1] in ("extern", "complex", "reduction"))
    print(json.dumps({"graphs": len(counter.graphs), "graph_calls": sum(g[3] for g in counter.graphs),
                      "ops_by_kind_per_step": dict(sorted(total.items())),
                      "estimated_kernels_per_step": fused, "extern_ops_per_step": dict(externs.most_common())},
                     indent=1))


if __name__ == "__main__":
    main()
