#!/usr/bin/env bash
# One H200 call (<= 9.5 min; issue 16 item 7): the graph test and the FP8 linear's GPU tests, where the fixed and
# general decode steps first differ (1 and 3 tokens, with and without the indexer kernel), the decode bench with the
# batch-invariant FP8 tiles (default) and with v10's (DSV4_FP8_WIDE_TILES=1) at bs64, the bisection in the time left.
# Usage (repository root, on the GPU machine): bash scripts/bench/graph_checks.sh OUT_DIR
set -u
out=${1:?usage: graph_checks.sh OUT_DIR}
t0=$(date +%s)
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
at() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
{
at "GPU tests"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_graphs_gpu.py tests/test_fp8_linear.py \
    -s 2>&1 | grep -E "row cosine|passed|failed|FAILED|Error" | tail -20
for t in 1 3; do
    for envs in DSV4_NONE=0 DSV4_INDEXER_KERNEL=1; do
        at "graph_divergence --tokens $t ($envs)"
        env $envs timeout 40 python3 scripts/bench/graph_divergence.py --tokens $t 2>&1 | grep -v "rows differ" | tail -25
    done
done
bench() {   # name, env assignment, bench args...
    local name=$1 envs=$2; shift 2
    at "decode bench $name ($envs)"
    env $envs timeout 100 python3 -u -m dsv4 bench --timing-only --no-transformers --decode-steps 12 --prefill 1024 \
        "$@" --out "$out/$name.json" > "$out/$name.log" 2>&1
    grep -E "ms/step \(|prefill [0-9]+:" "$out/$name.log" | cut -c1-170
}
bench decode_invariant DSV4_NONE=0
bench decode_wide_tiles DSV4_FP8_WIDE_TILES=1 --decode-batches 64
left=$(( 570 - ($(date +%s) - t0) ))
at "graph bisect (emulation on, 1 token), $left s left"
[ "$left" -gt 20 ] && timeout $(( left - 5 )) python3 scripts/bench/graph_bisect.py --out "$out/graph_bisect.json" \
    2>&1 | tail -20
at "done"
} 2>&1 | tee "$out/run.log"
