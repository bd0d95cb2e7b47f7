#!/usr/bin/env bash
# Install dsv4 (editable, with test extras) into the current Python.
# Without a CUDA-capable torch already present, torch==2.13.0 is pinned: on the CPU machines this project runs
# on it resolves to a local CPU wheel, and never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if python3 -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 11) else 1)' 2>/dev/null; then
    python3 -m pip install -q -e ".[test]"
else
    python3 -m pip install -q torch==2.13.0 -e ".[test]"
fi
command -v pyenv >/dev/null && pyenv rehash || true   # make the new `dsv4` console script visible to pyenv shims
