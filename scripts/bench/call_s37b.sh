#!/usr/bin/env bash
# Thirty-seventh session, call B (~6 min, carry .whl), on call A's card: the decode bench with x quantised once per
# FP8 linear call at up to 16 rows (DSV4_FP8_PREQUANT_MAX_M=16: bs1 and bs8; the same bits) against call A's
# default figures, then the FP4 kernel micro-benchmark (`--only f16`: the fp16 decode kernel against its FP8
# variant and today's kernels at 1 / 8 / 64 tokens, and at 1k with 32- / 64-token tiles against the direct kernel).
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s37b.sh OUT_DIR
set -u
out=${1:?usage: call_s37b.sh OUT_DIR}
source scripts/bench/call_lib.sh
bench prequant16 "--decode-steps 12 --prefill 128 --no-prefill-graphs --no-compile-prefill" DSV4_FP8_PREQUANT_MAX_M=16
timeout 150 python3 scripts/bench/fp4_decode_kernels.py --only f16 --tokens 1 8 64 1024 --json "$out/f16_kernels.json" \
    > "$out/f16_kernels.log" 2>&1; echo "kernels rc $?"; grep -vE "^\s*$" "$out/f16_kernels.log" | cut -c1-120 | tail -32
at done
