#!/usr/bin/env bash
# Thirty-ninth session, call B (~5 min, carry .whl): what fits the ~420 s of device time left after twelve refused
# starts. The decode bench on the defaults (bs1 / 8 / 64), then with TORCHINDUCTOR_ENABLE_PDL=1 at bs1 / 8 only (its
# predicted gain: -0.02..-0.08 ms there, +-0.03 at bs64), then the fp16 FP4 decode kernel (8-byte copies) at bs64
# only, timing alone: its decision to remove needs only that (adopting it would need call_s37d.sh's tests too).
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s39b.sh OUT_DIR
set -u
out=${1:?usage: call_s39b.sh OUT_DIR}
source scripts/bench/call_lib.sh
bench default "$decode_only"
bench pdl "$decode_only --decode-batches 1,8" TORCHINDUCTOR_ENABLE_PDL=1
bench f16 "$decode_only --decode-batches 64" DSV4_FP4_DECODE_F16=1
at done
