#!/usr/bin/env bash
# Thirty-seventh session, call A (~9 min, carry .whl): the fp16-MMA variant of the split-K FP4 decode kernel
# (DSV4_FP4_DECODE_F16=1, built blind in the thirty-sixth session) on a GPU: its GPU tests (flash dims, batch
# invariance, the 1k prefill dispatch, the engine's same-tokens test with it on), then the decode bench on the
# defaults and with it on, on this card (decode only: one short eager prefill).
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s37a.sh OUT_DIR
set -u
out=${1:?usage: call_s37a.sh OUT_DIR}
source scripts/bench/call_lib.sh
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_fp4_decode_fp8mma.py \
    "tests/test_engine.py::test_cuda_defaults_give_the_same_tokens" > "$out/tests.log" 2>&1
echo "tests rc $?"; grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -12
bench default "$decode_only"
bench f16 "$decode_only" DSV4_FP4_DECODE_F16=1
at done
