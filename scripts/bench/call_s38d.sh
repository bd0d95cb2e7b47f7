#!/usr/bin/env bash
# Thirty-eighth session's plan, call D (~5 min, carry .whl; chained on a warm card): the prefill bench (1k / 8k,
# prefill graphs with compiled segments, as by default) without and with the fused mHC pre / head kernel at prefill
# (DSV4_HC_MIX_PREFILL=1). It gained in both eager A/Bs (twentieth session 1k / 8k -1.9 / -2.0 ms; twenty-ninth 1k
# 23.5 -> 22.4 ms, 8k even) and was never measured since the prefill segments are compiled (inductor then fuses
# part of the plain path it replaces).
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s38d.sh OUT_DIR
set -u
out=${1:?usage: call_s38d.sh OUT_DIR}
source scripts/bench/call_lib.sh
prefill_only="--decode-batches 1 --decode-steps 4 --prefill 1024,8192"
bench prefill_default "$prefill_only"
bench prefill_hc_mix "$prefill_only" DSV4_HC_MIX_PREFILL=1
at done
