#!/usr/bin/env bash
# One GPU call (~6 min; issue 16): the nineteenth session's follow-ups. The GPU tests of the rewritten FP4 dequant
# kernel (one int32 word per packed byte) and of the graph test (now: replay == eager on the same padded batch),
# the transient micro-benchmark (now in inference mode: its "dispatched" rows ran the twin before), and the
# 4-layer bench's prefill with each opt-in switch ALONE against the default (the nineteenth session measured the two
# together only: +34 ms at 8k on the H100, the dequant kernel at 0.80 TB/s). One decode bucket per bench (prefill
# is what the switches change). Files under OUT: tests.log, transient.json/.log, bench_{default,transient,mix}.json/
# .log. Predictions: bench/NOTES.md, "Nineteenth session: outcomes" and the next session's plan.
# Usage (repository root, on the GPU machine; `slim_tree.sh on tests/reference` first): bash scripts/bench/transient_checks.sh OUT
set -u
out=${1:?usage: transient_checks.sh OUT}
source "$(dirname "$0")/call_lib.sh"
args="--decode-batches 1 --decode-steps 8 --prefill 1024,8192"     # one decode bucket: prefill is what changes
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp4_dequant.py tests/test_graphs_gpu.py \
    > "$out/tests.log" 2>&1
grep -E "passed|failed|^FAILED|^E  " "$out/tests.log" | head -20; at tests
timeout 150 python3 scripts/bench/grouped_prefill.py --only transient --tokens 1024 8192 --repeats 5 \
    --json "$out/transient.json" > "$out/transient.log" 2>&1
cut -c1-130 "$out/transient.log"; at transient
bench default "$args" DSV4_FAST_OPS=1; at "bench default"
bench transient "$args" DSV4_MOE_TRANSIENT=1; at "bench DSV4_MOE_TRANSIENT=1"
bench mix "$args" DSV4_HC_MIX_PREFILL=1; at "bench DSV4_HC_MIX_PREFILL=1"
