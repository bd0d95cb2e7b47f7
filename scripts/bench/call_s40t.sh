#!/usr/bin/env bash
# Fortieth session, the shortest call (~4 min, carry .whl): PDL's GPU test, then the decode bench at bs1 / bs8 on the
# defaults and with DSV4_PDL=1 (only if its test passed). For a card that comes with under ~450 s left.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s40t.sh OUT_DIR
set -u
out=${1:?usage: call_s40t.sh OUT_DIR}
source scripts/bench/call_lib.sh
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_pdl.py > "$out/pdl_tests.log" 2>&1
pdl_rc=$?; echo "pdl tests rc $pdl_rc"; grep -E "FAILED|ERROR|passed|failed" "$out/pdl_tests.log" | tail -6
bench default "$decode_only --decode-batches 1,8"
[ $pdl_rc -eq 0 ] && bench pdl "$decode_only --decode-batches 1,8" DSV4_PDL=1
at done
