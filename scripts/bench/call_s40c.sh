#!/usr/bin/env bash
# Fortieth session, call C (~3.5 min, carry .whl; chain it on call A / B's warm card; their default bench is the
# baseline): DSV4_BF16_SMALL_M=1, the router's and the compressors' fp32 products of bf16 weights at decode rows on
# a Triton split-K kernel (traced split sums) instead of cuBLAS's split-K GEMM + reduce (`ops/triton/bf16_small_m.py`).
# Its GPU tests (fp32 class against float64 at Flash's shapes, batch invariance, dispatch, the traced sum), then the
# decode bench with it on, only if they pass.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s40c.sh OUT_DIR
set -u
out=${1:?usage: call_s40c.sh OUT_DIR}
source scripts/bench/call_lib.sh
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_bf16_small_m.py > "$out/tests.log" 2>&1
rc=$?; echo "tests rc $rc"; grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -8
at tests
[ $rc -eq 0 ] && bench bf16_small_m "$decode_only" DSV4_BF16_SMALL_M=1
at done
