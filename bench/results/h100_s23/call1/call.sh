#!/usr/bin/env bash
# Twenty-third session, one call for two issues (device starts were refused eight times; one call's budget left):
# issue 17's annealing variant v9 (call_s23c.sh) on the GPU and, at the same time, the GPU tests of what changed or
# never ran on a GPU (issue 16: PrefillGraphs' arena, the engine's CUDA defaults, compiled decode with RoPE's real
# form, captured graphs, the split vocabulary reductions). The tests slow the training a little (same GPU); no
# timing is taken here. OUT holds only train_variants.sh's files (the device returns at most 8): the tests'
# summary goes to stdout.
set -u
out=${1:?}
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
( export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
  timeout -s INT 330 python3 -m pytest -v -m gpu -p no:cacheprovider -rfEs --durations=8 tests/test_rowwise.py \
      tests/test_prefill_graphs.py tests/test_engine.py tests/test_graphs_gpu.py tests/test_compiled_decode.py \
      > /tmp/gpu_tests.log 2>&1 ) &
tests=$!
bash scripts/bench/call_s23c.sh "$out"      # the file beside this one, call_c.sh
wait $tests
echo "== GPU tests (ran beside the training)"
grep -E "PASSED|FAILED|ERROR|passed|failed|slowest|s call" /tmp/gpu_tests.log | cut -c1-180 | tail -40
grep -E "^E " /tmp/gpu_tests.log | head -30 | cut -c1-200
