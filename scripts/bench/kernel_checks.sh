#!/usr/bin/env bash
# One H200 call (~8 min; issue 16): the GPU tests of what the seventh session changed without a GPU (decode attention
# on the fused kernel with batch-invariant splits: the graph test's 1-token case; the greedy probe's batched
# forward), the default bench (its figures), then where a 1k prefill's time goes with and without the FP8-MMA FP4
# kernel (profile_step.py, kernel tables side by side: the switch measured 7.5 ms slower per prefill while its calls
# measured faster). At most 6 files come back (the device returns 8).
# Usage (repository root, on the GPU machine): bash scripts/bench/kernel_checks.sh OUT_DIR [SECONDS]
set -u
out=${1:?usage: kernel_checks.sh OUT_DIR [SECONDS]}
budget=${2:-480}
t0=$(date +%s)
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
at() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
{
at "GPU tests"
timeout 200 python3 -m pytest -v -m gpu -p no:cacheprovider -rfE -s tests/test_graphs_gpu.py \
    tests/test_sparse_attention_kernel.py tests/test_seq_unlikelihood.py tests/test_compiled_decode.py \
    > "$out/gpu_tests.log" 2>&1
grep -E "row cosine|PASSED|FAILED|ERROR|passed|failed" "$out/gpu_tests.log" | cut -c1-160 | tail -30
at "greedy probe (batched P sequences; run 11 measured ~47 s per probe)"
timeout 75 python3 scripts/bench/greedy_probe.py --device cuda --dtype bf16 --no-count --prefixes 32 --tokens 64 \
    2>&1 | tail -8
at "bench (default)"
timeout 200 python3 -u -m dsv4 bench --timing-only --no-transformers --decode-steps 12 --prefill 1024,8192 \
    --out "$out/bench.json" > "$out/bench.log" 2>&1
grep -E "ms/step \(|prefill [0-9]+:|resident|floor_ratio" "$out/bench.log" | cut -c1-170
for envs in DSV4_NONE=0 DSV4_FP4_FP8MMA=1; do
    left=$(( budget - ($(date +%s) - t0) ))
    at "profile_step prefill 1024 ($envs), $left s left"
    [ "$left" -gt 40 ] && env $envs timeout $(( left / 2 )) python3 scripts/bench/profile_step.py --batches \
        --prefill 1024 --out "$out/profile_${envs%%=*}.json" 2>&1 | tail -25
done
at done
} 2>&1 | tee "$out/run.log"
