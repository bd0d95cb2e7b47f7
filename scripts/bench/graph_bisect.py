"""Which fast op makes the fixed-shape decode step differ from the general step? (issue 16 item 7)

tests/test_graphs_gpu.py's emulation-on 1-token case on the H200: worst row cosine 0.964 (bound 0.99) between the
fixed-shape step (`DecodeBatch`, what CUDA graphs replay) and the general step (`StepBatch`), deterministic, and
the same on the v8 code; on CPU the two agree exactly. This runs the test's scenario (same seeds, prompts and
20 steps; eager, no graphs) once with every fast op on, once with all ops on their plain twins, and once per fast
op forced to its twin (`ops.reference_only(op)`) around both paths, and prints the worst and median row cosine of
each. The op whose twin lifts the worst cosine to the others' level is where the paths part.
NOTE: the twin also runs the prefill, so each case starts from another state and follows another trajectory; with
the QAT emulation amplifying single ulps, a case's worst cosine is partly luck (the 2026-12-03 run's "twin: linear"
1.0 was that: both steps give every FP8 linear the same rows). `graph_divergence.py` names the first op that
computes different bits from equal inputs.
Usage: PYTHONPATH=. python3 scripts/bench/graph_bisect.py [--emulation-off] [--tokens 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

PAGE, PAGES = 128, 4


def run(model, device: str, t: int, ctx) -> tuple[float, float]:
    """The test's scenario: 3 prompts prefilled, 20 decode steps of t tokens, fixed vs general step."""
    from test_graphs_gpu import _copy, _prefilled

    from dsv4.model.state import DecodeBatch, StepBatch

    with ctx():
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (5, 130, 200)]
        state, pages = _prefilled_on(model, prompts, device, _prefilled)
        fixed_state, general_state = _copy(state), _copy(state)
        tokens = torch.randint(2, 512, (3 * t,), generator=gen).tolist()
        cosines = []
        for step in range(20):
            rows = [(i, len(p) + step * t, pages[i]) for i, p in enumerate(prompts)]
            with torch.inference_mode():
                ids = torch.tensor([tokens], device=device)
                fixed = model.main_logits(model.step(ids, DecodeBatch.build(rows, PAGES, device, t), fixed_state))[0]
                general = model.main_logits(model.step(ids, StepBatch.build(
                    [(s, p, t, pg) for s, p, pg in rows], device), general_state))[0]
            cosines.append(torch.nn.functional.cosine_similarity(fixed.double(), general.double(), dim=-1))
            tokens = general.argmax(-1).tolist()
    cos = torch.cat(cosines)
    return cos.min().item(), cos.median().item()


def _prefilled_on(model, prompts, device, prefilled):
    if device == "cuda":
        return prefilled(model, prompts)
    # the test's helper is CUDA-only: the same on CPU
    from dsv4.model.state import ModelState, StepBatch

    state = ModelState(model.cfg, len(prompts) + 1, len(prompts) * PAGES + 1, PAGE, model.dtype, device)
    pages = [list(range(i * PAGES, (i + 1) * PAGES)) for i in range(len(prompts))]
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            model.step(torch.tensor([ids], device=device), StepBatch.build([(i, 0, len(ids), pages[i])], device),
                       state)
    return state, pages


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--emulation-off", action="store_true")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per sequence per step (the test: 1 and 3)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    import dsv4
    from dsv4 import ops
    from dsv4.checkpoint import synthesize
    from dsv4.config import tiny_config
    from dsv4.ops.registry import fast_op_names

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = synthesize(tiny_config(), Path(tmp), seed=1234, progress=False)       # the test's tiny_ckpt
        model = dsv4.load_model(ckpt, device=args.device, dtype=torch.bfloat16,
                                quant_emulation=not args.emulation_off, progress=False)
    cases = {"all fast": contextlib.nullcontext, "all twins": ops.reference_only}
    cases |= {f"twin: {op}": (lambda op=op: ops.reference_only(op)) for op in fast_op_names()}
    results = {}
    for name, ctx in cases.items():
        lo, med = run(model, args.device, args.tokens, ctx)
        results[name] = {"min": lo, "median": med}
        print(f"{name:<34} worst row cosine {lo:.6f}  median {med:.6f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
