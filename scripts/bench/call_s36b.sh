#!/usr/bin/env bash
# Thirty-sixth session, call B (carry .whl): PART=2 of the GPU suite (the compile-heavy files and those from
# test_prefill_graphs.py on) with the whole call: in the thirty-fifth session 250 s ran only 6 of its tests.
# Usage (repository root, on the GPU machine): [SUITE_S=N] bash scripts/bench/call_s36b.sh OUT_DIR
set -u
out=${1:?usage: call_s36b.sh OUT_DIR}
PART=2 SUITE_S=${SUITE_S:-520} bash scripts/bench/gpu_suite_bench.sh "$out" > "$out.log" 2>&1
echo "part2 rc $?"; grep -E "passed|failed|FAILED|ERROR" "$out.log" | head -30
