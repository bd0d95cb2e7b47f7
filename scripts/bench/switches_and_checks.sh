#!/usr/bin/env bash
# One H200 call (~6 min; issue 16): the bench once per opt-in fast-path switch, each on the regimes it can move
# (to attribute the all-opt-ins bs64 halving, bench/NOTES.md "Fourth session's last H200 call"), then the GPU
# tests that failed there: the fused mHC kernel (its rounding check now allows the other variant's FMA
# contraction), the graph test's emulation-on case three times (deterministic?) and, when the folder .v8 holds
# the v8 tree (git archive bc7d7ba), the same test on the v8 code (a regression, or this seed's near-tie?).
# Usage (repository root, on the GPU machine): bash scripts/bench/switches_and_checks.sh OUT_DIR
set -u
out=${1:?usage: switches_and_checks.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
bench() {   # name, env assignment, bench args...
    local name=$1 envs=$2; shift 2
    env $envs timeout 200 python3 -u -m dsv4 bench --timing-only --no-transformers --decode-steps 12 "$@" \
        --out "$out/bench_$name.json" > "$out/bench_$name.log" 2>&1
    echo "== $name ($envs) rc $?"; grep -E "ms/step \(|prefill [0-9]+:|resident" "$out/bench_$name.log" | cut -c1-160
}
bench fp4_packed DSV4_FP4_PACKED=1 --decode-batches 1,8,64 --prefill 1024,8192
bench fp8_fused_sum DSV4_FP8_FUSED_SUM=1 --decode-batches 64 --prefill 8192
bench hc_mix DSV4_HC_MIX=1 --decode-batches 1,64 --prefill 1024
t() { timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider "$@" 2>&1 | grep -E "^FAILED|^ERROR|passed|failed|cosine" ; }
{
echo "== hc_mix, stable_topk, sinkhorn training pair"; t tests/test_hc_mix.py tests/test_stable_topk.py tests/test_train_speed.py
for i in 1 2 3; do echo "== graphs, emulation on (current) #$i"; t -s tests/test_graphs_gpu.py -k "emulation-on"; done
if [ -d .v8 ]; then echo "== graphs, emulation on (v8 code)"; (cd .v8 && export PYTHONPATH=$PWD && t -s tests/test_graphs_gpu.py -k "emulation-on"); fi
} 2>&1 | tee "$out/gpu_checks.log"
