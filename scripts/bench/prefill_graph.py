"""Can a prefill chunk be captured in a CUDA graph, and what would it save? (issue 16: the 1k prefill is host-bound)

The 4-layer Flash-width bench model's 1k prefill runs ~1.8k kernels; earlier profiles put the GPU busy ~42-45 ms of
a 60-69 ms call (bench/NOTES.md, ninth session): the rest is host time between launches. If the prefill step of a
fixed token count has no host synchronisation, one CUDA graph per chunk size removes that host time. This builds
the bench's model (same seed), runs a fresh sequence's prefill of each size eagerly and as a graph replay, and
prints per size: eager ms, replay ms, and whether the replay's hidden states equal the eager ones bit for bit
(same kernels, same shapes: they should). A capture that fails prints the error (e.g. the op that synchronises).
Measured (H100, twentieth session): 1k 48.6 -> 29.7 ms, 2k 59.9 -> 55.1, bit-equal. Then the product's way,
`engine.prefill_graphs.PrefillGraphs` (per-token segments captured for a token bucket, the stateful attention
cores eager): `segments_ms`, and its hidden states against the eager step (equal at a bucket's exact size;
`--bucket` larger than the tokens runs it padded: cosine); `--compile` also the segments compiled by inductor
before their capture (`compiled_ms`; inductor's fusions round differently: cosine). `*_reserved_mb`: the memory
a `PrefillGraphs` of one bucket keeps (its arena and its graphs' private pool).
Usage (repository root, on the GPU machine): PYTHONPATH=. python3 scripts/bench/prefill_graph.py [--tokens 1024 2048]
[--bucket N] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv4.bench.timing import bench_model, cuda_time, fresh_sequence, write_results
from dsv4.engine.prefill_graphs import PrefillGraphs
from dsv4.model.state import StepBatch


def _case(model, n: int, repeats: int, bucket: int | None = None, compiled: bool = False) -> dict:
    dev = next(model.parameters()).device
    state, pages, ids = fresh_sequence(model, n)
    batch = StepBatch.build([(0, 0, n, pages)], dev)

    def eager():
        state.reset_slot(0)
        with torch.inference_mode():
            return model.step(ids, batch, state)

    want = eager().clone()
    out = {"tokens": n, "eager_ms": 1e3 * statistics.median(cuda_time(eager, repeats))}
    graph = torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager()                                          # warm-up on a side stream, as capture requires
        torch.cuda.current_stream().wait_stream(side)
        state.reset_slot(0)
        with torch.inference_mode(), torch.cuda.graph(graph):
            got = model.step(ids, batch, state)
    except Exception as e:                                   # report what stops the capture
        out["capture_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        return out

    def replay():
        state.reset_slot(0)
        graph.replay()
        return got

    replay()
    out["replay_equal"] = bool(torch.equal(got, want))
    out["replay_ms"] = 1e3 * statistics.median(cuda_time(replay, repeats))
    out.update(_segments(model, ids, batch, state, want, bucket or n, repeats))
    if compiled:
        out.update(_segments(model, ids, batch, state, want, bucket or n, repeats, "inductor", "compiled"))
    return out


def _segments(model, ids, batch, state, want, bucket: int, repeats: int, compile=None, key: str = "segments") -> dict:
    """The product's way: `PrefillGraphs` (per-token segments captured for a bucket, attention cores eager);
    `compile`: the segments' torch.compile backend (EngineConfig.compile_prefill), figures under `key`."""
    torch.cuda.empty_cache()
    reserved, t0 = torch.cuda.memory_reserved(), time.perf_counter()
    segs = PrefillGraphs(model, sizes=(bucket,), compile=compile)
    setup_s = time.perf_counter() - t0
    torch.cuda.empty_cache()                  # what stays reserved: the arena and the graphs' private pool
    reserved_mb = (torch.cuda.memory_reserved() - reserved) / 2**20

    def run():
        state.reset_slot(0)
        with torch.inference_mode():
            return segs.step(ids, batch, state)

    got = run()
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(1), want.double().flatten(1), dim=-1)
    return {"bucket": bucket, f"{key}_equal": bool(torch.equal(got, want)), f"{key}_min_cos": cos.min().item(),
            f"{key}_ms": 1e3 * statistics.median(cuda_time(run, repeats)), f"{key}_setup_s": setup_s,
            f"{key}_reserved_mb": reserved_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket", type=int, help="the segments' token bucket (default: each --tokens itself; larger: "
                                               "the step runs padded)")
    ap.add_argument("--compile", action="store_true",
                    help="also the segments compiled by inductor before their capture (EngineConfig.compile_prefill): "
                         "compiled_ms, compiled_equal / compiled_min_cos against the eager step, compiled_setup_s")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    model = bench_model(args.layers)
    results = [_case(model, n, args.repeats, args.bucket, args.compile) for n in args.tokens]
    write_results(results, args.json)


if __name__ == "__main__":
    main()
