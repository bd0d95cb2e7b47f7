"""Where the HOST time of a prefill goes (issue 16: the 1k prefill is host-bound).

The 4-layer Flash-width bench model's 1k prefill: 48.6 ms eager against 29.7 ms as a CUDA-graph replay of the same
kernels on an H100 (bench/results/h100_s20/s20b/prefill_graph.json): ~19 ms of it is the host issuing ~1.8k
launches. A CUDA profile names kernels, not the Python that issues them; this measures the issuing side. Per module
class, exclusive of child modules: host milliseconds between the module's entry and exit (perf_counter, no
synchronisation: the launches are asynchronous, so this is time spent issuing work) and the number of dispatcher
ops it called (aten and dsv4 custom ops, a proxy for launches; the counting is a dispatch mode, under which a
fast op goes through its custom op, so it counts once). Also the step's issue time (`model.step` alone: the
logits after it check for NaN, a synchronisation, so a whole prefill call's host time is its wall time) and its
GPU time. The counting mode adds its own per-op cost, so host times are taken in a separate pass without it.
Compare runs on one machine only: host speed differs between the lent machines (torch.empty 2.2 vs 4.3 us on two
H100 machines of the twentieth session).
Usage (repository root): PYTHONPATH=. python3 scripts/bench/prefill_host.py [--tokens 1024] [--json OUT]
(on a CPU, `--device cpu --layers 2 --tiny` runs it on a small model, for testing the script: CPU ops are
synchronous, so there the times are compute)
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4.bench.timing import bench_model, fresh_sequence, write_results
from dsv4.model.state import StepBatch


class _Stack:
    """Forward hooks keeping the stack of module classes being run, and each class's exclusive host time."""

    def __init__(self, model):
        self.names: list[str] = []
        self.entered: list[float] = []
        self.child: list[float] = []
        self.host = defaultdict(float)
        self.handles = []
        for module in model.modules():
            self.handles += [module.register_forward_pre_hook(self._pre),
                             module.register_forward_hook(self._post)]

    def _pre(self, mod, args):
        self.names.append(type(mod).__name__)
        self.entered.append(time.perf_counter())
        self.child.append(0.0)

    def _post(self, mod, args, out):
        spent = time.perf_counter() - self.entered.pop()
        self.host[self.names.pop()] += spent - self.child.pop()
        if self.child:
            self.child[-1] += spent

    def current(self) -> str:
        return self.names[-1] if self.names else "(outside modules)"

    def remove(self):
        for h in self.handles:
            h.remove()


class _Count(TorchDispatchMode):
    """Dispatcher ops per innermost module class, and per op name."""

    def __init__(self, stack: _Stack):
        super().__init__()
        self.stack, self.by_module, self.by_op = stack, Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_module[self.stack.current()] += 1
        self.by_op[f"{self.stack.current()}: {func.name()}"] += 1
        return func(*args, **(kwargs or {}))


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(model, n: int, repeats: int = 3) -> dict:
    dev = next(model.parameters()).device
    state, pages, ids = fresh_sequence(model, n)
    batch = StepBatch.build([(0, 0, n, pages)], dev)

    def run():
        state.reset_slot(0)
        _sync(dev)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.step(ids, batch, state)
            return time.perf_counter() - t0

    run()
    _sync(dev)
    issue, gpus = [], []
    for _ in range(repeats):                        # issue time of the step (no hooks), and its GPU time
        start = torch.cuda.Event(enable_timing=True) if dev.type == "cuda" else None
        if start is not None:
            start.record()
        issue.append(run())
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            gpus.append(start.elapsed_time(end) / 1e3)
    stack = _Stack(model)
    try:
        for _ in range(repeats):                     # exclusive host time per module class
            run()
            _sync(dev)
        host = {k: v / repeats for k, v in stack.host.items()}
        counter = _Count(stack)
        with counter:
            run()
        _sync(dev)
    finally:
        stack.remove()
    ops = sum(counter.by_module.values())
    return {"tokens": n, "issue_ms": 1e3 * min(issue), "gpu_ms": 1e3 * min(gpus) if gpus else None,
            "ops": ops, "by_module": {k: {"host_ms": 1e3 * host.get(k, 0.0), "ops": counter.by_module.get(k, 0)}
                                      for k in sorted(set(host) | set(counter.by_module),
                                                      key=lambda k: -host.get(k, 0.0))},
            "top_ops": counter.by_op.most_common(40)}


def show(r: dict) -> None:
    gpu = f", GPU {r['gpu_ms']:.1f} ms" if r["gpu_ms"] is not None else ""
    print(f"=== prefill {r['tokens']}: step issued in {r['issue_ms']:.1f} ms{gpu}, {r['ops']} dispatcher ops "
          f"(module hooks add their own cost to the per-class times)")
    for name, v in r["by_module"].items():
        per = f"{1e3 * v['host_ms'] / v['ops']:.0f} us/op" if v["ops"] else ""
        print(f"  {v['host_ms']:8.2f} ms  {v['ops']:6d} ops  {per:>10}  {name}")
    print("  most frequent ops (innermost module: op, count per call):")
    for name, c in r["top_ops"]:
        print(f"    {c:5d}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model of the same structure (testing on a CPU)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    model = bench_model(args.layers, args.device, args.tiny)
    results = []
    for n in args.tokens:
        results.append(measure(model, n))
        show(results[-1])
    write_results(results, args.json, echo=False)


if __name__ == "__main__":
    main()
