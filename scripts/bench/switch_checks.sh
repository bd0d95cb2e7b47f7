#!/usr/bin/env bash
# One H200 call (~7 min; issue 16): the GPU tests of the opt-in paths made on the CPU in the eighteenth session,
# their micro-benchmark, the 4-layer bench with the switches on and off, and the graph test's padding diagnosis.
# Files under OUT: tests.log, transient.json/.log (grouped_prefill.py --only transient), bench_default.json/.log,
# bench_switches.json/.log (DSV4_MOE_TRANSIENT=1 DSV4_HC_MIX_PREFILL=1), graph_padding.log. Predictions: bench/NOTES.md
# ("Transient bf16 expert stacks ...", "Fused mHC pre for prefill chunks", "The graph test's difference: padding").
# Usage (repository root, on the GPU machine; `slim_tree.sh on tests/reference` first): bash scripts/bench/switch_checks.sh OUT
set -u
out=${1:?usage: switch_checks.sh OUT}
source "$(dirname "$0")/call_lib.sh"
args="--decode-steps 12 --prefill 1024,8192"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp4_dequant.py tests/test_grouped_linear.py \
    tests/test_hc_mix.py tests/test_hc_post.py tests/test_train_speed.py > "$out/tests.log" 2>&1
grep -E "passed|failed|^FAILED|^E  " "$out/tests.log" | head -20; at tests
timeout 120 python3 scripts/bench/grouped_prefill.py --only transient --json "$out/transient.json" \
    > "$out/transient.log" 2>&1
cat "$out/transient.log" | cut -c1-130; at transient
bench switches "$args" DSV4_MOE_TRANSIENT=1 DSV4_HC_MIX_PREFILL=1; at "bench with both switches"
bench default "$args" DSV4_FAST_OPS=1; at "bench default"
timeout 150 python3 scripts/bench/graph_padding.py --emulation-off --tokens 1 > "$out/graph_padding.log" 2>&1
tail -40 "$out/graph_padding.log" | cut -c1-150; at done
