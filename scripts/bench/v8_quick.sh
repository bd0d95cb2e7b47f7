#!/usr/bin/env bash
# The shortest issue-16 GPU call (~5.5 min on an H200): the 4-layer bench's timings and floors, the FP8 linear's
# GPU tests and its micro-benchmark (default configuration). Usage: bash scripts/bench/v8_quick.sh OUT_DIR
set -u
out=${1:?usage: v8_quick.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 200 python3 -m dsv4 bench --timing-only --no-transformers --decode-steps 12 --prefill 1024,8192 \
    --out "$out/h200_v8.json" > "$out/h200_v8.log" 2>&1
tail -22 "$out/h200_v8.log"
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_linear.py tests/test_fast_ops.py \
    > "$out/h200_v8_gpu_tests.log" 2>&1
grep -E "passed|failed|^FAILED|^E  " "$out/h200_v8_gpu_tests.log" | head -16
timeout 60 python3 scripts/bench/fp8_linear.py --quick --out "$out/h200_fp8_linear.json" > "$out/h200_fp8_linear.log" 2>&1
cut -c1-300 "$out/h200_fp8_linear.log"
