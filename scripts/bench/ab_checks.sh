#!/usr/bin/env bash
# One GPU call (issue 16, ~6 min on an H100): a change's GPU tests, its micro-benchmark, then A/B runs of the bench
# under environment variants on the same card:
# * prefill 1k / 8k eagerly (--no-compile: prefill through uncompiled graph segments; the change's effect without
#   the compile time) for every variant of PREFILL_VARIANTS;
# * decode at batch 1 / 8 / 64 with the compiled step for every variant of DECODE_VARIANTS.
# A variant is "base" (the defaults) or comma-separated NAME=VALUE settings, e.g. "DSV4_INDEXER_KERNEL=1"; an
# empty list (DECODE_VARIANTS= ) skips that part.
# Defaults: the twenty-ninth session's call (ops.widened_dense and the tiled FP8 quant kernels: their tests and
# micro-benchmarks; the indexer kernel and mHC's prefill kernel as prefill variants).
# TESTS=- / MICRO=- skip those parts; RECORD=1 runs the bench of record (the defaults, as gpu_suite_bench.sh does)
# after the tests, so one call can give the record and its A/B variants on one card.
# Usage (repository root, on the GPU machine): [TESTS=..] [MICRO=..] [RECORD=1] [PREFILL_VARIANTS=..]
#        [DECODE_VARIANTS=..] bash scripts/bench/ab_checks.sh OUT
set -u
out=${1:?usage: ab_checks.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
t0=$(date +%s)
at() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
run_variant() {   # KIND VARIANT ARGS...: the bench under VARIANT's settings, its figures printed
    local kind=$1 variant=$2 name; shift 2
    name=$(echo "$variant" | tr ',=' '__')
    at "$kind $variant"
    # shellcheck disable=SC2046
    env $(echo "$variant" | sed 's/^base$//' | tr ',' ' ') timeout 200 python3 -m dsv4 bench --timing-only \
        --no-transformers "$@" --out "$out/${kind}_$name.json" > "$out/${kind}_$name.log" 2>&1
    grep -E "ms/step \(|prefill [0-9]+:|Error" "$out/${kind}_$name.log" | cut -c1-160
}
{
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
if [ "${TESTS:-}" != - ]; then
    at "GPU tests"
    # shellcheck disable=SC2086
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE ${TESTS:-tests/test_widened_dense.py tests/test_fp8_linear.py tests/test_fast_ops.py} 2>&1 | tail -8
fi
if [ "${RECORD:-}" = 1 ]; then    # the bench of record (defaults; gpu_suite_bench.sh's line) before the variants
    at "bench (default)"
    timeout 300 python3 -u -m dsv4 bench --timing-only --no-transformers --decode-steps 12 --prefill 1024,8192 \
        --out "$out/bench.json" > "$out/bench.log" 2>&1
    grep -E "ms/step \(|prefill [0-9]+:|resident|floor_ratio" "$out/bench.log" | cut -c1-170
fi
if [ "${MICRO:-}" != - ]; then
    at "micro-benchmark"
    timeout 120 ${MICRO:-python3 scripts/bench/widened_dense.py --json $out/micro.json} 2>&1 | grep -v Warning
    [ -z "${MICRO:-}" ] && timeout 60 python3 scripts/bench/quant_kernels.py --json "$out/quant.json" 2>&1 | grep -v Warning
fi
for v in ${PREFILL_VARIANTS-base DSV4_WIDENED_DENSE=0 DSV4_INDEXER_KERNEL=1 DSV4_HC_MIX_PREFILL=1}; do
    run_variant prefill "$v" --decode-batches 1 --decode-steps 4 --no-compile --prefill 1024,8192
done
for v in ${DECODE_VARIANTS-base DSV4_WIDENED_DENSE=0}; do
    run_variant decode "$v" --decode-batches 1,8,64 --decode-steps 12 --prefill 1024 --no-compile-prefill
done
at done
} 2>&1 | tee "$out/run.log"
