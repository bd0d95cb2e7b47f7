#!/usr/bin/env bash
# Fortieth session, call B (~7 min, carry .whl; chain it on call A's warm card): PDL's split and its engine test.
# The engine's same-tokens test with DSV4_PDL=1 (compiled decode steps with PDL kernels throughout), then the decode
# bench with inductor's PDL alone (TORCHINDUCTOR_ENABLE_PDL=1: which part of call A's DSV4_PDL=1 figure is
# inductor's), then DSV4_PDL=1 with the fp16 decode kernel (if call A adopts both, their sum), then a profile of the
# bs1 step on the defaults (the last was h100_s32's, before wo_a FP8, the pairs and the traced sums).
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s40b.sh OUT_DIR
set -u
out=${1:?usage: call_s40b.sh OUT_DIR}
source scripts/bench/call_lib.sh
DSV4_PDL=1 timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs \
    "tests/test_engine.py::test_cuda_defaults_give_the_same_tokens" > "$out/engine_tests.log" 2>&1
echo "engine test (DSV4_PDL=1) rc $?"; grep -E "FAILED|ERROR|passed|failed" "$out/engine_tests.log" | tail -4
at tests
bench pdl_inductor "$decode_only" TORCHINDUCTOR_ENABLE_PDL=1
bench pdl_f16 "$decode_only" DSV4_PDL=1 DSV4_FP4_DECODE_F16=1
at benches
timeout 130 python3 scripts/bench/profile_step.py --batches 1 --prefill --out "$out/profile.json" \
    > "$out/profile.log" 2>&1
echo "profile rc $?"; grep -A12 "=== decode" "$out/profile.log" | cut -c1-120
at done
