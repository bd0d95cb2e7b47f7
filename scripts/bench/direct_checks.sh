#!/usr/bin/env bash
# One GPU call (issue 16, ~6-7 min on an H100): an FP4 prefill change checked, timed alone, and A/B'd in the bench:
# the GPU tests of TESTS; `grouped_prefill.py --only direct` (the dispatched path, the direct kernel's tiles, cuBLAS
# over bf16 copies, the MoE's layouts) at TOKENS; then the bench's 1k / 8k prefill eagerly (--no-compile: the
# change's effect without the compile time) with SWITCH=0 and =1.
# Defaults: the twenty-seventh session's call (SWITCH=DSV4_FP4_DIRECT, the direct kernel's tests, tokens 64 1024
# 8192); the twenty-eighth's: SWITCH=DSV4_MOE_KORDER TESTS="tests/test_fp4_grouped_direct.py tests/test_korder.py"
# TOKENS="1024 8192".
# Usage (repository root, on the GPU machine): [SWITCH=..] [TESTS=..] [TOKENS=..] bash scripts/bench/direct_checks.sh OUT
set -u
out=${1:?usage: direct_checks.sh OUT_DIR}
switch=${SWITCH:-DSV4_FP4_DIRECT}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
t0=$(date +%s)
at() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
bench() {   # NAME: 1k and 8k prefill, one decode bucket (the decode figures are not the point)
    timeout 150 python3 -m dsv4 bench --timing-only --no-transformers --decode-batches 1 --decode-steps 8 --no-compile \
        --prefill 1024,8192 --out "$out/bench_$1.json" > "$out/bench_$1.log" 2>&1
    grep -E "prefill [0-9]+|Error" "$out/bench_$1.log" | cut -c1-160
}
{
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
at "GPU tests"
# shellcheck disable=SC2086
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE ${TESTS:-tests/test_fp4_grouped_direct.py} 2>&1 \
    | tail -8
at "grouped_prefill.py --only direct"
# shellcheck disable=SC2086
timeout 200 python3 scripts/bench/grouped_prefill.py --only direct --tokens ${TOKENS:-64 1024 8192} \
    --json "$out/direct.json" 2>&1 | grep -v Warning
at "bench $switch=0"; export "$switch=0"; bench off
at "bench $switch=1"; export "$switch=1"; bench on
at done
} 2>&1 | tee "$out/run.log"
