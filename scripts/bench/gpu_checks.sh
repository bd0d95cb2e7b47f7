#!/usr/bin/env bash
# One H200 call (~9 min): the whole GPU test suite (issue 16 item 7; the captured T = k + 1 verify of issue 18;
# the in-kernel split-K sum), the FP8 small-M kernel with and without the in-kernel sum, and the two divergence
# controls: speculative decoding's built-in runs in fp32 (issue 18: do the bs1 differences from k = 0 vanish?) and
# the prefix-cache bench with a no-cache run in page-sized chunks (issue 19: does chunking alone change replies?).
# Carry .whl (the prefix bench's Flash-width model needs the V4 tokenizer, absent on the GPU machine).
# Usage (repository root, on the GPU machine): bash scripts/bench/gpu_checks.sh OUT_DIR
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors --durations=15 tests > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc $?"; grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -5
timeout 60 python3 scripts/bench/fp8_linear.py --quick --out "$out/fp8_fused_sum.json" > "$out/fp8_fused_sum.log" 2>&1
echo "fp8 rc $?"; grep -E "^M=|wkv|wq_b" "$out/fp8_fused_sum.log" | cut -c1-220
timeout 110 python3 scripts/bench/speculative.py --builtin-only --builtin-dtype float32 --builtin-tokens 128 \
    --out "$out/speculative_fp32_control.json" > "$out/speculative_fp32_control.log" 2>&1
echo "speculative control rc $?"; grep -E "^built-in k[0-9] batch" "$out/speculative_fp32_control.log" | cut -c1-200
timeout 120 python3 scripts/bench/prefix_cache.py --repeats 1 --reply 16 --control \
    --out "$out/prefix_cache_control.json" > "$out/prefix_cache_control.log" 2>&1
echo "prefix control rc $?"; tail -4 "$out/prefix_cache_control.log" | cut -c1-250
