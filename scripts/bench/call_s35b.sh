#!/usr/bin/env bash
# Thirty-fifth session, call B (~8 min, carry .whl): the GPU tests of the async engine, the engine's CUDA defaults and
# wo_a held FP8; the engine's step serial vs async (engine_decode.py); the wo_a micro-benchmark.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s35b.sh OUT_DIR
set -u
out=${1:?usage: call_s35b.sh OUT_DIR}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
git log --oneline -1 | cut -c1-80
t0=$(date +%s); at() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
at tests
timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_block_diag_linear.py tests/test_engine.py \
    tests/test_async_decode.py -rfE > "$out/tests.log" 2>&1; echo "tests rc $?"; tail -5 "$out/tests.log"
at engine_decode
timeout 200 python3 scripts/bench/engine_decode.py --batches 1 8 --async-decode both --out "$out/engine_decode.json" \
    > "$out/engine_decode.log" 2>&1; echo "engine_decode rc $?"; tail -12 "$out/engine_decode.log"
at block_diag_linear
timeout 60 python3 scripts/bench/block_diag_linear.py --out "$out/block_diag_linear.json" > "$out/block_diag_linear.log" 2>&1
echo "block_diag_linear rc $?"; tail -12 "$out/block_diag_linear.log"
at done
