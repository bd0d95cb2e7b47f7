#!/usr/bin/env bash
# One GPU call (issue 16, ~6-7 min on an H100): the bf16-decode FP4 grouped kernel (`ops/triton/fp4_grouped_direct.py`)
# checked, timed alone, and A/B'd in the bench: its GPU tests; `grouped_prefill.py --only direct` (the dispatched
# path, the kernel's tiles, cuBLAS over bf16 copies) at decode batch 64, 1k and 8k tokens; then the bench's 1k / 8k
# prefill eagerly (--no-compile: the kernel's effect without the compile time) with DSV4_FP4_DIRECT=0 and =1.
# Usage (repository root, on the GPU machine): bash scripts/bench/direct_checks.sh OUT_DIR
set -u
out=${1:?usage: direct_checks.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
t0=$(date +%s)
at() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
bench() {   # NAME: 1k and 8k prefill, one decode bucket (the decode figures are not the point)
    timeout 150 python3 -m dsv4 bench --timing-only --no-transformers --decode-batches 1 --decode-steps 8 --no-compile \
        --prefill 1024,8192 --out "$out/bench_$1.json" > "$out/bench_$1.log" 2>&1
    grep -E "prefill [0-9]+|Error" "$out/bench_$1.log" | cut -c1-160
}
{
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
at "GPU tests"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_fp4_grouped_direct.py 2>&1 | tail -8
at "grouped_prefill.py --only direct"
timeout 200 python3 scripts/bench/grouped_prefill.py --only direct --tokens 64 1024 8192 --json "$out/direct.json" \
    2>&1 | grep -v Warning
at "bench DSV4_FP4_DIRECT=0"; DSV4_FP4_DIRECT=0 bench off
at "bench DSV4_FP4_DIRECT=1"; DSV4_FP4_DIRECT=1 bench on
at done
} 2>&1 | tee "$out/run.log"
