"""Where does compiled prefill (PrefillGraphs(compile="inductor"), EngineConfig.compile_prefill) part from
`model.step`? The GPU test's cases (tests/test_prefill_graphs.py: one 128-token bucket, exact, padded and
1-token steps, then steps longer than the bucket), each run three ways on the same tiny model and inputs:
the compiled segments, the same padded segments eagerly (capture=False, compile=None) and `model.step`. Prints,
per case, the largest 1 - cosine per token (final hc streams) of each pair and the tokens below 1 - 1e-5, so a
difference is placed: compiled vs eager segments = the compiler; eager segments vs step = padding / row counts
(the fast ops' tiles and discrete choices: routing, the indexer's top-k, FP8 rounding); at fp64 rounding cannot
flip a discrete choice, so what is left there is semantic.
Usage (CUDA): PYTHONPATH=. python3 scripts/bench/compiled_prefill_cases.py [--dtypes float32 float64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_prefill_graphs import _pages, _state

import dsv4
from dsv4.checkpoint import synthesize
from dsv4.config import tiny_config
from dsv4.engine.prefill_graphs import PrefillGraphs
from dsv4.model.state import StepBatch

CASES = [(0, 128), (128, 100), (228, 50), (278, 1), (279, 150), (429, 40)]


def _gap(a, b) -> tuple[float, list[int]]:
    cos = torch.nn.functional.cosine_similarity(a.double().flatten(2), b.double().flatten(2), dim=-1)[0]
    return 1 - cos.min().item(), (cos < 1 - 1e-5).nonzero().flatten().tolist()


@torch.no_grad()                # as the engine runs steps (with autograd on the MoE takes its training path)
def run(ckpt, dtype, emulation: bool, device: str) -> None:
    torch._dynamo.reset()
    model = dsv4.load_model(ckpt, device=device, dtype=dtype, quant_emulation=emulation, progress=False)
    t0 = time.time()
    compiled = PrefillGraphs(model, sizes=(128,), compile="inductor" if device == "cuda" else "aot_eager",
                             capture=device == "cuda")
    segments = PrefillGraphs(model, sizes=(128,), capture=False)
    print(f"== {dtype} emulation {'on' if emulation else 'off'}: setup {time.time() - t0:.0f} s", flush=True)
    states = [_state(model) for _ in range(3)]
    gen = torch.Generator().manual_seed(7)
    for start, n in CASES:
        ids = torch.randint(2, model.cfg.vocab_size, (1, n), generator=gen).to(device)
        batch = StepBatch.build([(0, start, n, _pages(0))], device)
        got, seg, want = (compiled.step(ids, batch, states[0]), segments.step(ids, batch, states[1]),
                          model.step(ids, batch, states[2]))
        parts = []
        for name, a, b in (("compiled-step", got, want), ("segments-step", seg, want), ("compiled-segments", got, seg)):
            gap, bad = _gap(a, b)
            parts.append(f"{name} {gap:.2e} {bad[:8]}{'...' if len(bad) > 8 else ''}")
        print(f"  ({start}, {n}): " + " | ".join(parts), f"[{time.time() - t0:.0f} s]", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    ckpt = synthesize(tiny_config(), tempfile.mkdtemp(), seed=1234, progress=False)   # the tests' tiny_ckpt
    for name in args.dtypes:
        for emulation in (False, True):
            run(ckpt, getattr(torch, name), emulation, args.device)


if __name__ == "__main__":
    main()
