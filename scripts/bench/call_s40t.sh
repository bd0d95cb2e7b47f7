#!/usr/bin/env bash
# Fortieth session, the shortest call (~4 min, carry .whl): the decode bench at bs1 / bs8 with DSV4_PDL=1 and on the
# defaults, then PDL's GPU test (last: a cut by the budget's end loses only it; a figure whose test did not run is
# not enough to adopt PDL, only to decide whether it is worth the next session's call A). For a card that comes with
# under ~450 s left.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s40t.sh OUT_DIR
set -u
out=${1:?usage: call_s40t.sh OUT_DIR}
source scripts/bench/call_lib.sh
bench pdl "$decode_only --decode-batches 1,8" DSV4_PDL=1
bench default "$decode_only --decode-batches 1,8"
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_pdl.py > "$out/pdl_tests.log" 2>&1
echo "pdl tests rc $?"; grep -E "FAILED|ERROR|passed|failed" "$out/pdl_tests.log" | tail -6
at done
