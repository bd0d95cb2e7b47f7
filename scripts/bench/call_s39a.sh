#!/usr/bin/env bash
# Thirty-ninth session, call A (~8.5 min, carry .whl): device starts were scarce (three refused before it), so one
# call holds call_s37d.sh (the fp16 FP4 decode kernel with 8-byte copies: its GPU tests, then the decode bench with
# it, only if they pass) and the first half of call_s38c.sh (the decode bench with TORCHINDUCTOR_ENABLE_PDL=1), both
# against this call's default bench on the same card. PDL last: a cut at the call's limit loses only it.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s39a.sh OUT_DIR
set -u
out=${1:?usage: call_s39a.sh OUT_DIR}
source scripts/bench/call_lib.sh
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_fp4_decode.py \
    tests/test_fp4_decode_fp8mma.py "tests/test_engine.py::test_cuda_defaults_give_the_same_tokens" \
    > "$out/tests.log" 2>&1
rc=$?; echo "tests rc $rc"; grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -12
at tests
decode_only="--decode-steps 12 --prefill 128 --no-prefill-graphs --no-compile-prefill"
[ $rc -eq 0 ] && bench f16 "$decode_only" DSV4_FP4_DECODE_F16=1
bench default "$decode_only"
bench pdl "$decode_only" TORCHINDUCTOR_ENABLE_PDL=1
at done
