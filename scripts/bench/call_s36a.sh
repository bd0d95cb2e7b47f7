#!/usr/bin/env bash
# Thirty-sixth session, call A (~9.5 min, carry .whl): the thirty-fifth session's call C (the record, PART=1's GPU
# tests, the wo_a micro-benchmark), then the decode bench once more with the fused mHC pre (DSV4_HC_MIX=1: opt-in
# since the fifth session, when it measured even against a step with larger costs) as an A/B against the record's
# decode on the same card. The A/B's prefill is one short eager chunk (it only times decode).
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s36a.sh OUT_DIR
set -u
out=${1:?usage: call_s36a.sh OUT_DIR}
bash scripts/bench/call_s35c.sh "$out"
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
DSV4_HC_MIX=1 timeout 110 python3 -m dsv4 bench --timing-only --no-transformers --decode-steps 12 --prefill 128 \
    --no-prefill-graphs --no-compile-prefill --out "$out/hc_mix.json" > "$out/hc_mix.log" 2>&1
echo "hc_mix rc $?"; grep -E "ms/step \(|floor_ratio" "$out/hc_mix.log" | cut -c1-170
