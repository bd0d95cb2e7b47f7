#!/usr/bin/env bash
# Fortieth session, call A (~8.5 min, carry .whl): two opt-in decode paths never run on a GPU, against one default
# bench on the same card.
#   DSV4_FP4_DECODE_F16=1: the fp16-MMA FP4 decode kernel with 8-byte copies (call_s37d.sh's question: one precision
#     class for every MoE row at the FP8 variant's speed);
#   DSV4_PDL=1: programmatic dependent launch for our decode kernels (the FP8 linear prefetching its weight slice to
#     the L2 before it waits) and for inductor's (`ops/triton/pdl.py`).
# Order: the GPU tests of both (the fp16 kernel's, the engine's same-tokens test, PDL's same bits eagerly and in a
# replayed graph); the f16 bench only if its tests pass, the PDL bench only if its test passes; the default last but
# one. Usage (repository root, on the GPU machine): bash scripts/bench/call_s40a.sh OUT_DIR
set -u
out=${1:?usage: call_s40a.sh OUT_DIR}
source scripts/bench/call_lib.sh
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_fp4_decode.py \
    tests/test_fp4_decode_fp8mma.py "tests/test_engine.py::test_cuda_defaults_give_the_same_tokens" \
    > "$out/tests.log" 2>&1
f16_rc=$?; echo "f16 tests rc $f16_rc"; grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -12
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_pdl.py > "$out/pdl_tests.log" 2>&1
pdl_rc=$?; echo "pdl tests rc $pdl_rc"; grep -E "FAILED|ERROR|passed|failed" "$out/pdl_tests.log" | tail -6
at tests
[ $pdl_rc -eq 0 ] && bench pdl "$decode_only" DSV4_PDL=1
[ $f16_rc -eq 0 ] && bench f16 "$decode_only" DSV4_FP4_DECODE_F16=1
bench default "$decode_only"
at done
