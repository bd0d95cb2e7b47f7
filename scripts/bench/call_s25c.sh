#!/usr/bin/env bash
# Twenty-fifth session, call C (issue 16 item 7): the compile-heavy half of the GPU suite (gpu_suite_bench.sh
# PART=2, on the machine that ran PART=1), then in what is left of the call's ~575 s the compiled-prefill
# diagnosis: every prefill side and module call, eager vs traced (Dynamo alone) on the same inputs.
# Usage (repository root, on the GPU machine; carry .whl): bash scripts/bench/call_s25c.sh OUT
set -u
out=${1:?}
t0=$(date +%s)
PART=2 SUITE_S=${SUITE_S:-330} bash scripts/bench/gpu_suite_bench.sh "$out"
left=$(( 575 - ($(date +%s) - t0) ))
echo "== compiled_side_diff.py --backend eager ($left s left)"
[ "$left" -gt 30 ] && PYTHONPATH=$PWD timeout "$left" python3 scripts/bench/compiled_side_diff.py --backend eager \
    2>&1 | grep -v Warning | tee "$out/compiled_side_diff.txt" | tail -40
