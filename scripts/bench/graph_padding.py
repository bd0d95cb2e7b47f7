"""Does a captured decode step differ from the eager one because of its padding? (issue 16 item 7)

tests/test_graphs_gpu.py compares a CUDA-graph replay with the eager fixed-shape step and expects the same bits,
but the replay runs its batch-size bucket: 3 sequences become 4 rows, the last one a scratch row. Equal bits then
need every op of the step to be batch-invariant. In the eighteenth session's GPU suite the 1-token case without
the emulation differed at step 13, row 1 only, by rounding-sized amounts: the signature of a near-tie flipped in
a selection (the indexer's top-k) by a batch-dependent rounding upstream, which changes nothing else.
This runs the test's scenario three ways in lock step: eager with 3 rows (A), eager padded to the bucket (B, the
same rows + the scratch row, `DecodeGraphs(capture=False)`), and the captured replay (C). Per step it prints
whether A = B and B = C. At the first step where A != B it records every module output and fast-op call of both
(`graph_divergence.Recorder`), compares each with the padded rows cut off (the padding rows come last along the
token dimension) and prints the differing ones in call order, ORIGIN where the first input is the same bits in
both; then it reruns that step from the saved states with each fast op forced to its twin
(`ops.reference_only(op)`) and names the ops whose twin makes A = B.
Usage: PYTHONPATH=. python3 scripts/bench/graph_padding.py [--emulation-off] [--tokens 1] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def _cut(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b cut to a's shape) when they differ in one dimension only (b's padding rows), else None."""
    if a.dim() != b.dim():
        return None
    dims = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
    if not dims:
        return a, b
    if len(dims) > 1 or b.shape[dims[0]] < a.shape[dims[0]]:
        return None
    return a, b.narrow(dims[0], 0, a.shape[dims[0]])


def _same(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool | None:
    if len(xs) != len(ys):
        return None
    for x, y in zip(xs, ys, strict=True):
        cut = _cut(x, y)
        if cut is None:
            return None
        if not torch.equal(*cut):
            return False
    return True


def padded_differences(unpadded, padded) -> list[str]:
    """Records (module outputs, op calls) whose unpadded rows differ, in the unpadded step's call order."""
    out = []
    for key, calls in unpadded.calls.items():
        other = padded.calls.get(key)
        if other is None or len(other) != len(calls):
            continue
        for i, ((a_in, a_out), (b_in, b_out)) in enumerate(zip(calls, other, strict=True)):
            same_out = _same(a_out, b_out)
            if same_out is None:
                out.append(f"  shapes differ {key}[{i}]")
            elif not same_out:
                origin = "ORIGIN " if _same(a_in, b_in) else "carried"
                out.append(f"  {origin} {key}[{i}]")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--emulation-off", action="store_true")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cpu: A and B only (no capture), a smoke run")
    args = ap.parse_args(argv)
    from graph_divergence import Recorder, scenario
    from test_graphs_gpu import PAGES, _copy

    from dsv4 import ops
    from dsv4.engine.graphs import DecodeGraphs
    from dsv4.model.state import DecodeBatch
    from dsv4.ops.registry import fast_op_names

    t, dev = args.tokens, args.device
    model, prompts, graph_state, pages, gen = scenario(dev, not args.emulation_off)
    plain, padded = _copy(graph_state), _copy(graph_state)
    graphs = DecodeGraphs(model, graph_state, 4, PAGES, tokens_per_seq=t)
    tokens = torch.randint(2, 512, (3 * t,), generator=gen).tolist()

    def padded_step(state, rows):
        """The eager step padded to the bucket (capture off): what the replay runs, without the graph."""
        with torch.inference_mode():
            return DecodeGraphs(model, state, 4, PAGES, capture=False, tokens_per_seq=t).run(tokens, rows).clone()

    def plain_step(state, rows):
        with torch.inference_mode():
            ids = torch.tensor([tokens], device=dev)
            return model.main_logits(model.step(ids, DecodeBatch.build(rows, PAGES, dev, t), state))[0]

    for step in range(args.steps):
        rows = [(i, len(p) + step * t, pages[i]) for i, p in enumerate(prompts)]
        saved = (_copy(plain), _copy(padded))
        a = plain_step(plain, rows)
        with torch.inference_mode():
            c = graphs.run(tokens, rows).clone()
        b = padded_step(padded, rows)
        print(f"step {step}: eager 3 rows == eager padded {torch.equal(a, b)}; eager padded == replay "
              f"{torch.equal(b, c)}", flush=True)
        if not torch.equal(a, b):
            rows_differ = (a != b).any(-1).nonzero().flatten().tolist()
            print(f"  rows that differ: {rows_differ}")
            with Recorder(model).hooks() as ra:
                plain_step(_copy(saved[0]), rows)
            with Recorder(model).hooks() as rb:
                padded_step(_copy(saved[1]), rows)
            print("\n".join(padded_differences(ra, rb)[:60]) or "  (no recorded call differs)")
            for op in fast_op_names():
                with ops.reference_only(op):
                    a2, b2 = plain_step(_copy(saved[0]), rows), padded_step(_copy(saved[1]), rows)
                print(f"  twin of {op:<28} -> 3 rows == padded: {torch.equal(a2, b2)}", flush=True)
            return step
        tokens = a.argmax(-1).tolist()
    print("padding changed no bits in any step")
    return -1


if __name__ == "__main__":
    main()
