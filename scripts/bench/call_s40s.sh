#!/usr/bin/env bash
# Fortieth session, the short call (~6 min, carry .whl): what fits when under ~650 s of device time is left when a
# card comes. PDL's GPU test (same bits with and without, eagerly and in a replayed graph), the decode bench on the
# defaults, then with DSV4_PDL=1 at bs1 / 8 (only if its test passed), then the fp16 FP4 decode kernel at bs64 only,
# timing alone (enough to decide to remove it; adopting it needs call_s40a.sh's tests too).
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s40s.sh OUT_DIR
set -u
out=${1:?usage: call_s40s.sh OUT_DIR}
source scripts/bench/call_lib.sh
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_pdl.py > "$out/pdl_tests.log" 2>&1
pdl_rc=$?; echo "pdl tests rc $pdl_rc"; grep -E "FAILED|ERROR|passed|failed" "$out/pdl_tests.log" | tail -6
bench default "$decode_only"
[ $pdl_rc -eq 0 ] && bench pdl "$decode_only --decode-batches 1,8" DSV4_PDL=1
bench f16 "$decode_only --decode-batches 64" DSV4_FP4_DECODE_F16=1
at done
