#!/usr/bin/env bash
# Forty-first session's plan, item 5 (~7 min on a warm card, carry .whl): the fused mHC pre / head kernel
# (`ops/triton/hc_mix.py`, opt-in DSV4_HC_MIX) with its split-K stage rebuilt as one IEEE fp32 dot a program
# (GPU-unrun): its GPU tests, a bs1 profile with it on (`_partials`, `_mix` timed alone), then the decode bench
# with and without it on the same card. Prediction and rule: bench/NOTES.md, "Next GPU session (written in the
# forty-first session)", item 5.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s41b.sh OUT_DIR
set -u
out=${1:?usage: call_s41b.sh OUT_DIR}
source scripts/bench/call_lib.sh
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_hc_mix.py > "$out/tests.log" 2>&1
echo "tests rc $?"; grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -6
DSV4_HC_MIX=1 timeout 130 python3 scripts/bench/profile_step.py --batches 1 --prefill --out "$out/profile.json" \
    > "$out/profile.log" 2>&1
echo "profile rc $?"; grep -E "=== decode|_partials|_mix|_sinkhorn|dot_kernel|reduce_1Block" "$out/profile.log" \
    | cut -c1-120
at tests
bench default "$decode_only"
bench hc_mix "$decode_only" DSV4_HC_MIX=1
at done
