#!/usr/bin/env bash
# Thirty-eighth session's plan, call B (~7 min, carry .whl; chain it on call s37d's warm card): two variants of the
# FP8 small-M kernel (decode's dense linears), opt-in, never run on a GPU:
#   DSV4_FP8_PREQUANT=1: x quantised once per call (`act_quant_fp8`) instead of in every program; the same bits.
#     Measured at bs64 only once, with the host time in the figure (h100_s33 call B: +0.13 ms).
#   DSV4_FP8_F16_MMA=1: the same e4m3 codes as fp16 into an fp16 MMA with fp32 sums (the twin's class) instead of
#     the FP8 MMA, whose accumulation inside a 128 block is narrower than fp32; aimed at the greedy agreement (the
#     fast path parts from the reference 17 times in 256 where an exact control parts 6: h100_s34).
# Offline for sm_90 with the divisibility a launch passes (Triton 3.6; 3.9 alike), K-loop SASS instructions per
# weight byte: default 6.8, prequant 1.8, fp16 MMA + prequant 3.2, fp16 MMA alone 8.1; at bs64 every one of a call's
# four 16-row blocks runs the loop (~4 x 70 us of issue for a step's ~300 MB at the default's 6.8).
# Order: the FP8 linear's GPU tests (the fp16 MMA's fp32-class and same-bits test among them), the engine's
# same-tokens test with both switches on, the decode bench with prequant, then with both, then the per-call micro
# of all four variants with their errors against float64.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s38b.sh OUT_DIR
set -u
out=${1:?usage: call_s38b.sh OUT_DIR}
source scripts/bench/call_lib.sh
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_fp8_linear.py > "$out/tests.log" 2>&1
echo "tests rc $?"; grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -8
# a request's tokens alone and among others, with both switches on (the class edge at 64 rows: cuBLAS above)
DSV4_FP8_PREQUANT=1 DSV4_FP8_F16_MMA=1 timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs \
    "tests/test_engine.py::test_cuda_defaults_give_the_same_tokens" > "$out/engine_tests.log" 2>&1
echo "engine test rc $?"; grep -E "FAILED|ERROR|passed|failed" "$out/engine_tests.log" | tail -4
at tests
bench prequant "$decode_only" DSV4_FP8_PREQUANT=1
bench f16_prequant "$decode_only" DSV4_FP8_PREQUANT=1 DSV4_FP8_F16_MMA=1
timeout 150 python3 scripts/bench/fp8_linear.py --prequant --out "$out/fp8_variants.json" > "$out/fp8_variants.log" 2>&1
echo "micro rc $?"; grep -E "^M=|Error|error" "$out/fp8_variants.log" | cut -c1-160
at done
