#!/usr/bin/env bash
# Thirty-eighth session's plan, call E (~6 min, carry .whl; a tree that KEEPS the built-in model:
# `slim_tree.sh on tests/reference bench/results`): the greedy agreement of the fast path with the reference path
# on the trained built-in model (`dsv4 bench` without --timing-only: `greedy_agreement_builtin_model`, with its
# control, a second exact path), on the defaults and with the FP8 small-M kernel on fp16 tensor cores
# (DSV4_FP8_F16_MMA=1, with DSV4_FP8_PREQUANT=1). Last measured in h100_s34: fast 239 / 256, control 250 / 256.
# Prediction with the fp16 MMA: 243-250 / 256 (the FP8 linear's rounding flips gone; the sparse attention's
# differences stay), the control unchanged.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s38e.sh OUT_DIR
set -u
out=${1:?usage: call_s38e.sh OUT_DIR}
source scripts/bench/call_lib.sh
agreement() {
    local name=$1; shift
    env "$@" timeout 280 python3 -m dsv4 bench --decode-steps 4 --prefill 1024 --no-transformers \
        --out "$out/agreement_$name.json" > "$out/agreement_$name.log" 2>&1
    echo "$name rc $?"; grep -E "greedy agreement|op error|floor_ratio" "$out/agreement_$name.log" | cut -c1-160
}
agreement default
agreement f16_prequant DSV4_FP8_PREQUANT=1 DSV4_FP8_F16_MMA=1
at done
