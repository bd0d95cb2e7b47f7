#!/usr/bin/env bash
# Thirty-seventh session, call A (~9 min, carry .whl): the fp16-MMA variant of the split-K FP4 decode kernel
# (DSV4_FP4_DECODE_F16=1, built blind in the thirty-sixth session) on a GPU: its GPU tests (flash dims, batch
# invariance, the engine's same-tokens test with it on), the kernel micro-benchmark (`--only f16`: against the
# FP8-MMA variant and today's kernels at 1 / 8 / 64 tokens, against the direct kernel at 1k), then the decode bench
# with it on, to compare with the record of the same call's card (run the default bench first if the card is new).
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s37a.sh OUT_DIR
set -u
out=${1:?usage: call_s37a.sh OUT_DIR}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_fp4_decode_fp8mma.py \
    tests/test_fp4_prefill_fp8mma.py tests/test_fp4_tiled.py "tests/test_engine.py::test_cuda_defaults_give_the_same_tokens" \
    > "$out/tests.log" 2>&1; echo "tests rc $?"; grep -E "FAILED|ERROR|passed|failed" "$out/tests.log" | tail -12
timeout 120 python3 scripts/bench/fp4_decode_kernels.py --only f16 --tokens 1 8 64 1024 --json "$out/f16_kernels.json" \
    > "$out/f16_kernels.log" 2>&1; echo "kernels rc $?"; grep -vE "^\s*$" "$out/f16_kernels.log" | cut -c1-120 | tail -30
DSV4_FP4_DECODE_F16=1 timeout 200 python3 -m dsv4 bench --timing-only --no-transformers --decode-steps 12 \
    --prefill 128 --no-prefill-graphs --no-compile-prefill --out "$out/decode_f16.json" > "$out/decode_f16.log" 2>&1
echo "decode_f16 rc $?"; grep -E "ms/step \(|floor_ratio" "$out/decode_f16.log" | cut -c1-170
