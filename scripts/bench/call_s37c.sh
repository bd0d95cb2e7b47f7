#!/usr/bin/env bash
# Thirty-seventh session, call C (~8 min, carry .whl), if call B's micro-benchmark shows the fp16 decode kernel with
# 32-token tiles under the direct kernel at 1k: its 1k dispatch test, then the bench's prefill 1k / 2k with it
# taking the prefill calls (DSV4_FP4_F16_PREFILL=1, up to 64 rows per expert) against the default, on one card
# (decode only at batch 1).
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s37c.sh OUT_DIR
set -u
out=${1:?usage: call_s37c.sh OUT_DIR}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp4_decode_fp8mma.py -k f16_prefill \
    > "$out/tests.log" 2>&1; echo "tests rc $?"; tail -3 "$out/tests.log"
for v in 0 1; do
    DSV4_FP4_F16_PREFILL=$v timeout 200 python3 -m dsv4 bench --timing-only --no-transformers --decode-batches 1 \
        --decode-steps 4 --prefill 1024,2048 --out "$out/prefill_f16_$v.json" > "$out/prefill_f16_$v.log" 2>&1
    echo "DSV4_FP4_F16_PREFILL=$v rc $?"; grep -E "prefill [0-9]+:" "$out/prefill_f16_$v.log" | cut -c1-150
done
