#!/usr/bin/env bash
# Thirty-eighth session's plan, call B (~4 min, carry .whl; chain it on call s37d's warm card): x quantised once per
# FP8 linear call (`DSV4_FP8_PREQUANT=1`, the same bits) at decode batch 64, where it was only ever measured with the
# host time in the figure (h100_s33 call B: +0.13 ms), then the per-call micro-benchmark at M = 1 / 8 / 64 with the
# quantisation's own launch counted (`fp8_linear.py --prequant`, never run on a GPU). Why it may pay at bs64: offline
# for sm_90, with the divisibility a launch passes, the kernel's K loop is 6.9 SASS instructions per weight byte
# with the in-kernel quantisation and 1.8 with prequantised x (Triton 3.6 and 3.9 alike), and every one of a bs64
# call's four 16-row blocks quantises its x again: ~4 x 70 us of issue for a step's ~300 MB of FP8 weights.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s38b.sh OUT_DIR
set -u
out=${1:?usage: call_s38b.sh OUT_DIR}
source scripts/bench/call_lib.sh
decode_only="--decode-steps 12 --prefill 128 --no-prefill-graphs --no-compile-prefill"
bench prequant "$decode_only" DSV4_FP8_PREQUANT=1
timeout 120 python3 scripts/bench/fp8_linear.py --prequant --out "$out/fp8_prequant.json" > "$out/fp8_prequant.log" 2>&1
echo "micro rc $?"; grep -E "^M=|Error|error" "$out/fp8_prequant.log" | cut -c1-160
at done
