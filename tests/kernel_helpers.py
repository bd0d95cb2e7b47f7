"""Running Triton kernels' CPU checks through the interpreter (the kernel tests' shared plumbing)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])


def run_in_interpreter(script: str, where: Path, timeout: int = 600) -> str:
    """Run `script` in a fresh Python with TRITON_INTERPRET=1 (read when triton is imported, hence a subprocess),
    importing this checkout's dsv4 first (and this folder's modules: `from kernel_helpers import ...`); asserts a
    zero exit and returns its stdout."""
    path = where / "check.py"
    path.write_text(script)
    imports = os.pathsep.join([ROOT, str(Path(ROOT) / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": imports}
    out = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def interpreted_json(script: str, where: Path) -> dict:
    """`run_in_interpreter`, for a script whose last line of output is one JSON document of its results."""
    return json.loads(run_in_interpreter(script, where).strip().splitlines()[-1])


@contextlib.contextmanager
def in_interpreter_at_once(scripts: dict[str, str], where: Path, timeout: int = 600):
    """`run_in_interpreter` for several scripts at once, one process each: Triton's interpreter is single-threaded
    Python, so CI's 2 cores run two in little more than the time of one. Yields {name: Future of its stdout}."""
    with ThreadPoolExecutor(len(scripts)) as pool:
        futures: dict[str, Future] = {}
        for name, script in scripts.items():
            (where / name).mkdir()
            futures[name] = pool.submit(run_in_interpreter, script, where / name, timeout)
        yield futures


def interpreted_json_at_once(scripts: dict[str, str], where: Path, timeout: int = 600) -> dict:
    """`in_interpreter_at_once` for scripts that each end by printing one JSON object of named results (a file's
    checks split over two cores): all their results in one dict. A name reported twice is an error, so no result
    can hide another."""
    with in_interpreter_at_once(scripts, where, timeout) as futures:
        parts = [json.loads(f.result().strip().splitlines()[-1]) for f in futures.values()]
    merged = {name: result for part in parts for name, result in part.items()}
    assert len(merged) == sum(len(part) for part in parts), "two scripts reported the same name"
    return merged


def exact_grouped(x, eid, w, s):
    """The FP4 grouped GEMMs' reference: float64 x @ dequant_fp4(W[eid])^T and sum |x| |W|^T (the magnitude the
    order-of-summation bounds scale with), per expert, on x's device."""
    import torch

    from dsv4.quant import dequant_fp4

    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)
    mag = torch.zeros_like(out)
    for e in eid.unique().tolist():
        rows = (eid == e).nonzero().flatten()
        wd = dequant_fp4(w[e], s[e], torch.float64)
        out[rows], mag[rows] = x[rows].double() @ wd.T, x[rows].double().abs() @ wd.abs().T
    return out, mag


def kernel_spies(monkeypatch, **kernels) -> list:
    """Replace each `name=(module, attribute)` kernel entry point by a spy that records (name, keyword arguments)
    and returns zeros of the grouped GEMM's output shape [x rows, weight N]: dispatch tests on the CPU. Returns the
    record."""
    import torch

    seen = []
    for name, (module, attr) in kernels.items():
        monkeypatch.setattr(module, attr, lambda *args, _name=name, **kw: seen.append((_name, kw))
                            or torch.zeros(args[0].shape[0], args[2].shape[1]))
    return seen
