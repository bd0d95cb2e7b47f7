#!/usr/bin/env bash
# One H200 call (~8-9 min; issue 16 item 7): every GPU test, then the default 4-layer bench, in the same run, so the
# bench figures come from kernels whose GPU tests passed in that run (the log is committed beside the JSON).
# Only the test files that hold GPU tests are collected: the serve modules import fastapi/openai, which the device
# lacks, and `-m gpu` deselects their tests anyway. xgrammar and jsonschema (test_structured's GPU test) travel as
# wheels: carry .whl (see the device README); this script installs them into /tmp/site and puts that AFTER the
# repository on PYTHONPATH (the fifteenth session's call set PYTHONPATH=/tmp/site alone, and every script beside
# the suite failed to import dsv4).
# The bench runs first (its figures are the call's point), then the suite in SUITE_S seconds (default 380).
# The whole suite takes ~430 s on an H100 (twentieth session: 80 of 85 tests in 429 s), the bench ~110 s (~190 s
# with its prefill compiled, the default since the twenty-sixth session): more than
# one call's 600 s. PART splits it into two calls on the same warm machine (each records the GPU's UUID, so the
# logs show one card ran both): PART=1 the bench and the tests outside the compile-heavy files up to
# test_prefill_graphs.py (~300 s), PART=2 those files (training compile, compiled decode, training rows/speed/syncs:
# ~230 s) and the rest from test_prefill_graphs.py on (~165 s); unset: everything in one call.
# Usage (repository root, on the GPU machine): [PART=1|2] [SUITE_S=N] bash scripts/bench/gpu_suite_bench.sh OUT_DIR
set -u
out=${1:?usage: gpu_suite_bench.sh OUT_DIR}
t0=$(date +%s)
at() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
mkdir -p "$out"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}      # the repository goes in front just below
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,uuid,driver_version,clocks.max.sm,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null | cut -c1-80
python3 -c "import torch, triton, xgrammar, dsv4; print('torch', torch.__version__, 'triton', triton.__version__)"
files=$(grep -l "pytest.mark.gpu\|pytestmark = pytest.mark.gpu" tests/test_*.py | grep -v "test_serve" | tr '\n' ' ')
heavy="test_train_compile|test_compiled_decode|test_train_rows|test_train_speed|test_train_syncs"
# PART=2 also takes the files from tests/test_prefill_graphs.py on (by name): in the thirty-third session PART=1's
# bench took 234 s and its tests ran past SUITE_S=310 in test_prefill_graphs.py (those files: ~165 s more)
late() { awk -F/ '$2 >= "test_prefill_graphs.py"'; }
case "${PART:-}" in
1) files=$(echo "$files" | tr ' ' '\n' | grep -vE "$heavy" | awk -F/ '$2 < "test_prefill_graphs.py"' | tr '\n' ' ');;
2) files=$( (echo "$files" | tr ' ' '\n' | grep -E "$heavy"; echo "$files" | tr ' ' '\n' | grep -vE "$heavy" | late) \
           | sort | tr '\n' ' ');;
esac
if [ "${PART:-}" != 2 ]; then
    at "bench (default)"
    timeout 300 python3 -u -m dsv4 bench --timing-only --no-transformers --decode-steps 12 --prefill 1024,8192 \
        --out "$out/bench.json" > "$out/bench.log" 2>&1
    grep -E "ms/step \(|prefill [0-9]+:|resident|floor_ratio" "$out/bench.log" | cut -c1-170
fi
at "GPU tests in: $files"
# -v lines reach the log as each test ends; SIGINT at the limit makes pytest print its summary of what ran
timeout -s INT "${SUITE_S:-380}" python3 -m pytest -v -m gpu -p no:cacheprovider -rfEs --durations=12 $files > "$out/gpu_suite.log" 2>&1
grep -E "FAILED|ERROR|SKIPPED|passed|failed|row cosine" "$out/gpu_suite.log" | cut -c1-200 | tail -30
at done
} 2>&1 | tee "$out/run.log"
