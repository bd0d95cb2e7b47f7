#!/usr/bin/env bash
# Forty-first session, call A (~4 min on a fresh card, carry .whl; TESTS=1 adds the GPU tests, ~1.5 min): the
# thirty-eighth session's FP8 question at bs64 only (where the prediction lives; bs1 / bs8 measured as noise in
# h100_s37): the decode bench on the defaults, with DSV4_FP8_PREQUANT=1, and with DSV4_FP8_PREQUANT=1
# DSV4_FP8_F16_MMA=1 (then, with TESTS=1, the FP8 linear's GPU tests).
# Rule (thirty-eighth session): prequant the default from 33 rows if bs64 gains >= 0.1 ms; else both go.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s41a.sh OUT_DIR
set -u
out=${1:?usage: call_s41a.sh OUT_DIR}
source scripts/bench/call_lib.sh
bs64="--decode-batches 64 $decode_only"
bench default "$bs64"
bench prequant "$bs64" DSV4_FP8_PREQUANT=1
bench f16_prequant "$bs64" DSV4_FP8_PREQUANT=1 DSV4_FP8_F16_MMA=1
at benches
[ "${TESTS:-0}" = 1 ] || exit 0
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_fp8_linear.py > "$out/tests.log" 2>&1
echo "tests rc $?"; grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -8
at done
