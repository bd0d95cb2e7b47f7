#!/usr/bin/env bash
# The compiled-prefill bisect of the twenty-fourth session's calls c and d (bench/results/h100_s24/), one script:
# `test_compiled_replays_match_the_general_step_on_cuda` (the opt-in compile_prefill; its bound is cosine 0.999)
# run as committed (inductor), with inductor's precision-cast emulation, then with the test's backend edited to
# `aot_eager` and to `eager` (Dynamo alone), then inductor with every fast op off. Measured on an H100: 0.98436,
# 0.98436, 0.99812, 0.99812, no result within 100 s. The test file is restored at the end.
# Usage (repository root, on the GPU machine): bash scripts/bench/compiled_prefill_bisect.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
file=tests/test_prefill_graphs.py
test=$file::test_compiled_replays_match_the_general_step_on_cuda
cp "$file" /tmp/test_prefill_graphs.py.orig
run() {   # LABEL [VAR=VALUE ...]
    echo "== $1"; shift
    env "$@" timeout 110 python3 -m pytest -q -m gpu -p no:cacheprovider "$test" 2>&1 \
        | grep -E "^E  .*assert|passed|failed" | head -3
}
run "inductor (as committed)"
run "inductor, emulate_precision_casts" TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1
for backend in aot_eager eager; do
    sed -i "s/compile=\"[a-z_]*\")/compile=\"$backend\")/" "$file"
    run "backend $backend"
done
cp /tmp/test_prefill_graphs.py.orig "$file"
run "inductor, DSV4_FAST_OPS=0" DSV4_FAST_OPS=0
