#!/usr/bin/env bash
# Thirty-seventh session, call C (~8 min, carry .whl), if call B's micro-benchmark shows the fp16 decode kernel with
# 32-token tiles under the direct kernel at 1k: its 1k dispatch test, then the bench's prefill 1k / 2k with it
# taking the prefill calls (DSV4_FP4_F16_PREFILL=1, up to 64 rows per expert) against the default, on one card
# (decode only at batch 1).
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s37c.sh OUT_DIR
set -u
out=${1:?usage: call_s37c.sh OUT_DIR}
source scripts/bench/call_lib.sh
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp4_decode_fp8mma.py -k f16_prefill \
    > "$out/tests.log" 2>&1; echo "tests rc $?"; tail -3 "$out/tests.log"
prefill="--decode-batches 1 --decode-steps 4 --prefill 1024,2048"
bench prefill_default "$prefill"
bench prefill_f16 "$prefill" DSV4_FP4_F16_PREFILL=1
at done
