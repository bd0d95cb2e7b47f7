#!/usr/bin/env bash
# Twenty-fourth session, call B (issue 17 item 6, and issue 16 item 7 beside it): one continuation of the installed
# built-in model on data v6 (.data_s6: a shard of data v6 with every `exercises` and `algorithms` document, carried),
# the generated small functions of scripts/exercises.py upweighted, evaluated by train_variants.sh (quick eval on
# the CPU cores); beside it on the same GPU, the GPU tests outside the compile-heavy files (gpu_suite_bench.sh's
# PART=1 set; no timing is taken in this call). OUT holds only train_variants.sh's files (the device returns at most
# 8): the tests' summary goes to stdout.
# Usage (repository root, on the GPU machine; carry .data_s6 and .whl): [MIN=4.0] [UP=...] [NO_EVAL=1] bash call_s24b.sh OUT
# (NO_EVAL=1: the bundle alone in OUT/best, no quick eval on the machine: evaluate it on the CPU afterwards)
set -u
out=${1:?}
t0=$(date +%s)
MIN=${MIN:-4.0}
UP=${UP:-stdlib=2,algorithms=4,exercises=8}
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
files=$(grep -l "pytest.mark.gpu\|pytestmark = pytest.mark.gpu" tests/test_*.py | grep -v "test_serve" \
        | grep -vE "test_train_compile|test_compiled_decode|test_train_rows|test_train_speed|test_train_syncs" | tr '\n' ' ')
( export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
  timeout -s INT "${SUITE_S:-420}" python3 -m pytest -v -m gpu -p no:cacheprovider -rfEs --durations=8 $files \
      > /tmp/gpu_tests.log 2>&1 ) &
tests=$!
common="--minutes $MIN --seq-len 32768 --row-len 256 --lr 2e-4 --unlikelihood 1 --probe-prefixes 8 --probe-tokens 192
 --greedy-probe-every 16 --probe-chat-share 0.5 --probe-header-lens 9,11 --probe-class-lens 20,22 --seq-unlikelihood 1
 --probe-cache --chat-repeat 3 --warmup-steps 5 --tf32"
common=$(echo $common)
if [ -n "${NO_EVAL:-}" ]; then     # the device budget is short: train only, evaluate on the CPU at home
    echo "== v10: $UP"
    DSV4_HC_POST_TRAIN=1 PYTHONPATH=$PWD python3 scripts/train_builtin_gpu.py .data_s6 /tmp/v10 --init dsv4/builtin_model \
        --bundle "$out/best" --upweight "$UP" --seed 43 $common 2>&1 | grep -v Warning | grep -E "held-out|^step " \
        | cut -c1-160 | tail -4
else
    DSV4_HC_POST_TRAIN=1 DATA=.data_s6 EVAL_S=${EVAL_S:-150} bash scripts/bench/train_variants.sh "$out" \
        dsv4/builtin_model "v10 --upweight $UP --seed 43 $common"
fi
wait $tests
echo "== GPU tests (ran beside the training): $files"
grep -E "PASSED|FAILED|ERROR|passed|failed|slowest|s call" /tmp/gpu_tests.log | cut -c1-180 | tail -60
grep -E "^E " /tmp/gpu_tests.log | head -30 | cut -c1-200
# The compiled-prefill bisect (call_s24a.sh's second half) in what is left: the suite above ran the test as
# committed (RoPE's real form inside traces); here with the complex form.
left=$(( 575 - ($(date +%s) - t0) ))
if [ "$left" -gt 60 ]; then
    sed -i 's/if torch.compiler.is_compiling() else cis/if False else cis/' dsv4/model/rope.py
    echo "== compiled prefill test, RoPE complex form in traces ($left s left; $(grep -c 'if False else cis' dsv4/model/rope.py) edit)"
    PYTHONPATH=$PWD:/tmp/site timeout "$left" python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_prefill_graphs.py::test_compiled_replays_match_the_general_step_on_cuda 2>&1 \
        | grep -E "^E  |Error|passed|failed" | head -6 | cut -c1-200
    git checkout dsv4/model/rope.py 2>/dev/null || sed -i 's/if False else cis/if torch.compiler.is_compiling() else cis/' dsv4/model/rope.py
fi
