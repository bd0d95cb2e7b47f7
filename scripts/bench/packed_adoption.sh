#!/usr/bin/env bash
# One GPU call (~7-8 min on an H200) that decides whether the packed FP4 decode (ops/triton/fp4_decode.py) replaces
# the default decode: its GPU tests, the two kernel micro-benchmarks with and without it, and the bench's decode
# timings with every opt-in fast path on (DSV4_FP4_PACKED=1, DSV4_FP8_FUSED_SUM=1, DSV4_HC_MIX=1; compare with
# bench/results/h200_v8*.json, same command without the variables; per-kernel attribution: the micro-benchmarks).
# Usage (repository root, on the GPU machine): bash scripts/bench/packed_adoption.sh OUT_DIR
set -u
out=${1:?usage: packed_adoption.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp4_decode.py tests/test_fp4_packed_kernels.py \
    tests/test_fast_ops.py tests/test_grouped_linear.py tests/test_grouped_prefill.py tests/test_hc_mix.py > "$out/gpu_tests.log" 2>&1
tail -3 "$out/gpu_tests.log"
timeout 120 python3 -u scripts/bench/fp4_gemv.py --out "$out/fp4_gemv_packed.json" > "$out/fp4_gemv_packed.log" 2>&1
tail -12 "$out/fp4_gemv_packed.log"
timeout 150 python3 -u scripts/bench/grouped_prefill.py --tokens 64 1024 8192 --json "$out/grouped_packed.json" \
    > "$out/grouped_packed.log" 2>&1
grep -E "tokens|dispatched|packed" "$out/grouped_packed.log" | head -40
DSV4_FP4_PACKED=1 DSV4_FP8_FUSED_SUM=1 DSV4_HC_MIX=1 timeout 240 python3 -u -m dsv4 bench --timing-only --no-transformers --decode-steps 12 \
    --prefill 1024 --out "$out/bench_optins.json" > "$out/bench_optins.log" 2>&1
tail -8 "$out/bench_optins.log"
