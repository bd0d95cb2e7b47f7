#!/usr/bin/env bash
# One H200 call (~8 min): the whole `-m gpu` suite (issue 16 item 7; serve tests need packages the GPU machine
# lacks, so their collection errors are reported, not fatal), then the bench with every opt-in fast path on
# (packed FP4 decode, in-kernel FP8 split sum, fused mHC pre/head) to compare with bench/results/h200_v8*.json.
# Usage (repository root, on the GPU machine): bash scripts/bench/suite_and_optins.sh OUT_DIR
set -u
out=${1:?usage: suite_and_optins.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 250 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors --durations=15 tests \
    > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc $?"; grep -E "^FAILED|^ERROR|passed|failed" "$out/gpu_tests.log" | tail -25
DSV4_FP4_PACKED=1 DSV4_FP8_FUSED_SUM=1 DSV4_HC_MIX=1 timeout 230 python3 -u -m dsv4 bench --timing-only \
    --no-transformers --decode-steps 12 --prefill 1024,8192 --out "$out/bench_optins.json" > "$out/bench_optins.log" 2>&1
echo "bench rc $?"; tail -8 "$out/bench_optins.log" | cut -c1-250
