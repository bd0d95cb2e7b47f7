#!/usr/bin/env bash
# Thirty-seventh session, call D (~7 min, carry .whl): the fp16 decode kernel after its fix (h100_s37 call A found
# it wrong on the GPU: its asm decoded four bytes an instance and assumed a word's bytes shared a register; now one
# int32 word per asm instance, `fp4_decode.e2m1_word_f16`): the decode helpers' GPU probe, the kernel's GPU tests and
# the engine's same-tokens test with it on; only if they pass, the decode bench on the defaults and with it on.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s37d.sh OUT_DIR
set -u
out=${1:?usage: call_s37d.sh OUT_DIR}
source scripts/bench/call_lib.sh
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_fp4_decode.py \
    tests/test_fp4_decode_fp8mma.py "tests/test_engine.py::test_cuda_defaults_give_the_same_tokens" \
    > "$out/tests.log" 2>&1
rc=$?; echo "tests rc $rc"; grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -12
at tests
if [ $rc -eq 0 ]; then
        bench f16 "$decode_only" DSV4_FP4_DECODE_F16=1      # first: a budget cut leaves the new figures
    bench default "$decode_only"
fi
at done
