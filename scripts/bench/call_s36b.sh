#!/usr/bin/env bash
# Thirty-sixth session, call B (carry .whl): the decode bench WITHOUT the split-K FP8-MMA FP4 decode kernel
# (DSV4_FP4_DECODE_MMA=0: the default up to the thirty-fifth session; now chosen by the step's tokens) as an A/B
# against call A's record on the same card, then PART=2 of the GPU suite (the compile-heavy files and those from
# test_prefill_graphs.py on) with the rest of the call: in the thirty-fifth session 250 s ran only 6 of its tests.
# Usage (repository root, on the GPU machine): [SUITE_S=N] bash scripts/bench/call_s36b.sh OUT_DIR
set -u
out=${1:?usage: call_s36b.sh OUT_DIR}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
DSV4_FP4_DECODE_MMA=0 PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 timeout 110 python3 -m dsv4 bench --timing-only \
    --no-transformers --decode-steps 12 --prefill 128 --no-prefill-graphs --no-compile-prefill \
    --out "$out/decode_no_mma.json" > "$out/decode_no_mma.log" 2>&1
echo "decode_no_mma rc $?"; grep -E "ms/step \(|floor_ratio" "$out/decode_no_mma.log" | cut -c1-170
PART=2 SUITE_S=${SUITE_S:-420} bash scripts/bench/gpu_suite_bench.sh "$out/part2" > "$out/part2.log" 2>&1
echo "part2 rc $?"; grep -E "passed|failed|FAILED|ERROR" "$out/part2.log" | head -30
