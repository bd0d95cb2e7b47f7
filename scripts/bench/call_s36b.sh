#!/usr/bin/env bash
# Thirty-sixth session, call B (carry .whl): where the bs1 / bs64 decode step's time goes on today's tree
# (profile_step.py, no prefill; the last profile is the thirty-second session's), then PART=2 of the GPU suite
# (the compile-heavy files and those from test_prefill_graphs.py on) with the rest of the call: in the thirty-fifth
# session 250 s ran only 6 of its tests.
# Usage (repository root, on the GPU machine): [SUITE_S=N] bash scripts/bench/call_s36b.sh OUT_DIR
set -u
out=${1:?usage: call_s36b.sh OUT_DIR}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 timeout 100 python3 scripts/bench/profile_step.py --batches 1 64 \
    --prefill --out "$out/profile.json" > "$out/profile.log" 2>&1
echo "profile rc $?"; grep -A14 "=== decode" "$out/profile.log" | cut -c1-110
PART=2 SUITE_S=${SUITE_S:-420} bash scripts/bench/gpu_suite_bench.sh "$out/part2" > "$out/part2.log" 2>&1
echo "part2 rc $?"; grep -E "passed|failed|FAILED|ERROR" "$out/part2.log" | head -30
