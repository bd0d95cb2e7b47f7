#!/usr/bin/env bash
# Thirty-fifth session, call D (carry .whl): the engine's step serial vs async (engine_decode.py, fixed clock), then
# PART=2 of the GPU suite (the compile-heavy files and those from test_prefill_graphs.py on) in what is left.
# Usage (repository root, on the GPU machine): [SUITE_S=N] bash scripts/bench/call_s35d.sh OUT_DIR
set -u
out=${1:?usage: call_s35d.sh OUT_DIR}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
timeout 170 python3 scripts/bench/engine_decode.py --batches 1 8 --async-decode both --profile 6 --out "$out/engine_decode.json" \
    > "$out/engine_decode.log" 2>&1; echo "engine_decode rc $?"; grep -A16 "engine decode" "$out/engine_decode.log" | grep -v compiling
PART=2 SUITE_S=${SUITE_S:-330} bash scripts/bench/gpu_suite_bench.sh "$out/part2" > "$out/part2.log" 2>&1
echo "part2 rc $?"; grep -E "passed|failed|FAILED|ERROR" "$out/part2.log" | head -20
