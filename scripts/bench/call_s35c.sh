#!/usr/bin/env bash
# Thirty-fifth session, call C (~9 min, carry .whl): the record (PART=1: the bench and the GPU tests outside the
# compile-heavy files) then the wo_a micro-benchmark.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s35c.sh OUT_DIR
set -u
out=${1:?usage: call_s35c.sh OUT_DIR}
PART=1 SUITE_S=${SUITE_S:-280} bash scripts/bench/gpu_suite_bench.sh "$out" > "$out.log" 2>&1
echo "suite rc $?"; grep -E "^dsv4|ratio|resident|passed|failed|FAILED|ERROR" "$out.log" | head -40
export PYTHONPATH=$PWD:/tmp/site
timeout 60 python3 scripts/bench/block_diag_linear.py --out "$out/block_diag_linear.json" > "$out/block_diag_linear.log" 2>&1
echo "block_diag_linear rc $?"; tail -6 "$out/block_diag_linear.log"
