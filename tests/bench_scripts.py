"""Load a script of scripts/bench/ as a module, for the tests of its helpers (the scripts are not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench"


def load(name: str, module_name: str | None = None):
    """scripts/bench/{name}.py, executed once per call as module `module_name` (default: name). The directory goes
    on sys.path first, for scripts that import their neighbours."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(module_name or name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
