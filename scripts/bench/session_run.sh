#!/usr/bin/env bash
# One H200 call for a session that may get only one (~9.5 min): the issue-16 bench (4 layers, timings and floors),
# the FP8 linear's GPU tests, then the built-in model's GPU training (issue 17) on a short budget.
# Carry .builtin_data. Files back: results.tar (bench JSON/logs, training metrics, loss.png, perf.json, eval.json,
# logs) and model.tar.* (the trained model, < 16 MiB parts).
# Usage (repository root, on the GPU machine): bash scripts/bench/session_run.sh OUT_DIR [TRAIN_MINUTES]
set -u
out=${1:?usage: session_run.sh OUT_DIR [TRAIN_MINUTES]}
minutes=${2:-3.0}
work=/tmp/session_run
mkdir -p "$out" "$work/train"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 200 python3 -m dsv4 bench --timing-only --no-transformers --decode-steps 12 --prefill 1024,8192 \
    --out "$work/h200_v8.json" > "$work/h200_v8.log" 2>&1
tail -22 "$work/h200_v8.log"
timeout 50 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_linear.py > "$work/h200_v8_gpu_tests.log" 2>&1
grep -E "passed|failed|^FAILED|^E  " "$work/h200_v8_gpu_tests.log" | head -12
timeout 250 python3 scripts/train_builtin_gpu.py .builtin_data "$work/builtin_v2" --minutes "$minutes" \
    --bundle "$work/train" > "$work/train.log" 2>&1
tail -15 "$work/train.log"
mv "$work"/train/model.tar.* "$out"/ 2>/dev/null
tar cf "$out/results.tar" -C "$work" --exclude=builtin_v2 --exclude='model.tar.*' .
ls -la "$out"
