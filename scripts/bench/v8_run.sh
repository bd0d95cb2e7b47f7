#!/usr/bin/env bash
# The issue-16 GPU call (one H200, ~9 min): the 4-layer bench (no transformers: the targets are against each
# step's own floor), the GPU tests of the kernels it runs, and the FP8 linear micro-benchmark.
# Usage (repository root, on the GPU machine): bash scripts/bench/v8_run.sh OUT_DIR
set -u
out=${1:?usage: v8_run.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 330 python3 -m dsv4 bench --no-transformers --decode-steps 12 --prefill 1024,8192,32768 \
    --out "$out/h200_v8.json" > "$out/h200_v8.log" 2>&1
tail -30 "$out/h200_v8.log"
timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_linear.py tests/test_fast_ops.py \
    tests/test_grouped_linear.py tests/test_fp4_packed_kernels.py tests/test_fp4_decode.py tests/test_compiled_decode.py \
    > "$out/h200_v8_gpu_tests.log" 2>&1
grep -E "passed|failed|^FAILED|^E  " "$out/h200_v8_gpu_tests.log" | head -30
timeout 90 python3 scripts/bench/fp8_linear.py --quick --out "$out/h200_fp8_linear.json" > "$out/h200_fp8_linear.log" 2>&1
cut -c1-300 "$out/h200_fp8_linear.log"
