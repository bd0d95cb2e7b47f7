#!/usr/bin/env bash
# One H200 call (~9.5 min; issue 16): the default bench (the figures; it also prices the batch-invariant
# FP8 tiles and the fixed step's oldest-first window lists against v10), the FP8-MMA FP4 prefill (opt-in
# DSV4_FP4_FP8MMA=1) and its micro-benchmark, v10's wide FP8 tiles at bs64 (DSV4_FP8_WIDE_TILES=1), then the GPU
# suite in the time left (serve tests fail to collect there: no fastapi/openai; the inductor training test runs in
# the training call instead, where its compile is paid once), then the fixed/general step divergence probe.
# Usage (repository root, on the GPU machine): bash scripts/bench/bench_and_suite.sh OUT_DIR [SECONDS_BUDGET]
set -u
out=${1:?usage: bench_and_suite.sh OUT_DIR [SECONDS]}
budget=${2:-570}
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$out/gpu.txt" 2>&1
at() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
bench() {   # name, env assignment, seconds, bench args...
    local name=$1 envs=$2 secs=$3; shift 3
    at "bench $name ($envs)"
    env $envs timeout "$secs" python3 -u -m dsv4 bench --timing-only --no-transformers --decode-steps 12 "$@" \
        --out "$out/$name.json" > "$out/$name.log" 2>&1
    grep -E "ms/step \(|prefill [0-9]+:|resident|floor_ratio" "$out/$name.log" | cut -c1-170
}
{
bench h200_v11 DSV4_NONE=0 220 --prefill 1024,8192
bench h200_v11_fp8mma DSV4_FP4_FP8MMA=1 110 --decode-batches 1 --prefill 1024,8192
bench h200_v11_wide_tiles DSV4_FP8_WIDE_TILES=1 70 --decode-batches 64 --prefill 1024
at "FP8-MMA prefill micro-benchmark"
timeout 80 python3 scripts/bench/grouped_prefill.py --only fp8mma --tokens 1024 8192 \
    --json "$out/grouped_prefill_fp8mma.json" 2>&1 | tail -15
s=$(( $(left) - 60 )); at "GPU suite with $s s (per-test lines in gpu_suite.log)"
# -v lines reach the log as each test ends, and SIGINT at the limit makes pytest print its summary of what ran.
[ "$s" -gt 30 ] && timeout -s INT "$s" python3 -m pytest -v -m gpu -p no:cacheprovider \
    --continue-on-collection-errors -rfE --durations=10 --ignore=tests/test_train_compile.py tests \
    > "$out/gpu_suite.log" 2>&1
grep -E "FAILED|ERROR|passed|failed|row cosine" "$out/gpu_suite.log" | tail -30
s=$(( $(left) - 5 )); at "graph_divergence --tokens 1 with $s s"
[ "$s" -gt 10 ] && timeout "$s" python3 scripts/bench/graph_divergence.py --tokens 1 2>&1 | grep -v "rows differ" | tail -20
at done
} 2>&1 | tee "$out/run.log"
