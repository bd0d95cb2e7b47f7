#!/usr/bin/env bash
# Thirty-seventh session, call B (~8 min, carry .whl), on call A's card: the decode bench with x quantised once per
# FP8 linear call at up to 16 rows (DSV4_FP8_PREQUANT_MAX_M=16: bs1 and bs8; the same bits), against call A's
# figures; then, if call A's micro-benchmark shows the fp16 decode kernel with 32-token tiles under the direct
# kernel at 1k, the bench's prefill 1k / 2k with it taking the prefill calls (DSV4_FP4_F16_PREFILL=1, up to 64
# rows per expert) against the default (PREFILL=0 skips that part), decode only at batch 1 there.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s37b.sh OUT_DIR
set -u
out=${1:?usage: call_s37b.sh OUT_DIR}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
DSV4_FP8_PREQUANT_MAX_M=16 timeout 200 python3 -m dsv4 bench --timing-only --no-transformers --decode-steps 12 \
    --prefill 128 --no-prefill-graphs --no-compile-prefill --out "$out/decode_prequant16.json" \
    > "$out/decode_prequant16.log" 2>&1
echo "decode_prequant16 rc $?"; grep -E "ms/step \(|floor_ratio" "$out/decode_prequant16.log" | cut -c1-170
[ "${PREFILL:-1}" = 0 ] && exit 0
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp4_decode_fp8mma.py -k f16_prefill \
    > "$out/tests.log" 2>&1; echo "tests rc $?"; tail -3 "$out/tests.log"
for v in 0 1; do
    DSV4_FP4_F16_PREFILL=$v timeout 200 python3 -m dsv4 bench --timing-only --no-transformers --decode-batches 1 \
        --decode-steps 4 --prefill 1024,2048 --out "$out/prefill_f16_$v.json" > "$out/prefill_f16_$v.log" 2>&1
    echo "DSV4_FP4_F16_PREFILL=$v rc $?"; grep -E "prefill [0-9]+:" "$out/prefill_f16_$v.log" | cut -c1-150
done
