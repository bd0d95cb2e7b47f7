#!/usr/bin/env bash
# One GPU call (issue 16, ~8-9 min on an H100): the prefill variants that are opt-in until measured, each against
# the default in the same call, and their GPU tests first (a variant whose test fails is not timed).
#   1. PrefillGraphs' compiled segments (EngineConfig.compile_prefill): scripts/bench/prefill_graph.py --compile
#      at 1k and 2k (captured buckets), then the bench's 1k / 8k prefill with --compile-prefill (8k: the segments at
#      their own length, compiled with dynamic token counts);
#   2. DSV4_FP4_FP8MMA=1 (the FP8-MMA expert-major kernel) with the default prefill path.
# GRAPH=0 skips step 1's prefill_graph.py (~240 s of compiling; the bench's --compile-prefill times the same
# segments at 1k and 8k), so that the call fits in one 600 s device command.
# Usage (repository root, on the GPU machine): [GRAPH=0] bash scripts/bench/prefill_variants.sh OUT_DIR
set -u
out=${1:?usage: prefill_variants.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
t0=$(date +%s)
at() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
bench() {   # NAME [bench args...]: 1k and 8k prefill, one decode bucket (the decode figures are not the point)
    local name=$1; shift
    timeout 170 python3 -m dsv4 bench --timing-only --no-transformers --decode-batches 1 --decode-steps 8 --no-compile \
        --prefill 1024,8192 --out "$out/bench_$name.json" "$@" > "$out/bench_$name.log" 2>&1
    grep -E "prefill [0-9]+|Error" "$out/bench_$name.log" | cut -c1-160
}
{
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
git log --oneline -1 2>/dev/null | cut -c1-80
at "GPU tests"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_prefill_graphs.py \
    tests/test_fp4_prefill_fp8mma.py -k "compiled or fp8mma" 2>&1 | tail -4
if [ "${GRAPH:-1}" != 0 ]; then
at "prefill_graph.py --compile"
timeout 240 python3 scripts/bench/prefill_graph.py --tokens 1024 2048 --compile --json "$out/prefill_graph.json" \
    2>&1 | grep -v Warning | tail -3
fi
at "bench default"; bench default
at "bench --compile-prefill"; bench compile --compile-prefill
at "bench DSV4_FP4_FP8MMA=1"; DSV4_FP4_FP8MMA=1 bench fp8mma
at done
} 2>&1 | tee "$out/run.log"
