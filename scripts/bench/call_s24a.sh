#!/usr/bin/env bash
# Twenty-fourth session, call A (~5 min, one H100/H200): (1) bisect the opt-in compile_prefill test's failure
# (cosine 0.984 in the twenty-third session): as is, then with RoPE's complex form inside traces; (2) the per-kernel
# profile of the compiled bs1 decode step and a 1k prefill after the twenty-third session's RoPE change.
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s24a.sh OUT_DIR
set -u
out=${1:?usage: call_s24a.sh OUT_DIR}
source scripts/bench/call_lib.sh
{
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
test=tests/test_prefill_graphs.py::test_compiled_replays_match_the_general_step_on_cuda
at "compiled prefill test, RoPE real form in traces (as committed)"
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider "$test" 2>&1 | grep -E "assert|Error|passed|failed" | head -8
cp dsv4/model/rope.py /tmp/rope.py.orig
sed -i 's/if torch.compiler.is_compiling() else cis/if False else cis/' dsv4/model/rope.py
grep -c "if False else cis" dsv4/model/rope.py
at "compiled prefill test, RoPE complex form in traces"
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider "$test" 2>&1 | grep -E "assert|Error|passed|failed" | head -8
cp /tmp/rope.py.orig dsv4/model/rope.py
at "profile (bs1 decode, 1k prefill)"
timeout 200 python3 scripts/bench/profile_step.py --batches 1 --prefill 1024 --out "$out/profile.json" > "$out/profile.log" 2>&1
head -45 "$out/profile.log" | cut -c1-150
at done
} 2>&1 | tee "$out/run.log"
