#!/usr/bin/env bash
# Thirty-ninth session, call A (~8.5 min, carry .whl): device starts were scarce (six refused before it), so one
# call holds call_s37d.sh (the fp16 FP4 decode kernel with 8-byte copies: its GPU tests, then the decode bench with
# it and on the defaults, only if they pass) and the first half of call_s38c.sh (the decode bench with
# TORCHINDUCTOR_ENABLE_PDL=1) against that default bench, on the same card. PDL last: a cut at the call's limit
# loses only it.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s39a.sh OUT_DIR
set -u
out=${1:?usage: call_s39a.sh OUT_DIR}
bash scripts/bench/call_s37d.sh "$out"
source scripts/bench/call_lib.sh
[ -f "$out/bench_default.json" ] || bench default "$decode_only"       # call_s37d.sh's tests failed
bench pdl "$decode_only" TORCHINDUCTOR_ENABLE_PDL=1
at done
