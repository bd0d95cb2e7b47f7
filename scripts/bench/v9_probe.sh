#!/usr/bin/env bash
# The issue-16 diagnosis call after v8 (one H200, ~9.5 min): where the stored-format step loses its time.
# 1. the FP8 small-M kernel's configuration sweep (v8 measured only the default: 0.05-0.36 of the copy bandwidth);
# 2. a per-kernel profile of the compiled bs1 decode step and the 1k prefill (which kernels hold the 1.76 / 63 ms);
# 3. the depth run of item 6 without torch.compile (v8's compile took 157 s per batch bucket at 20 layers).
# Usage (repository root, on the GPU machine): bash scripts/bench/v9_probe.sh OUT_DIR
set -u
out=${1:?usage: v9_probe.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 150 python3 scripts/bench/fp8_linear.py --out "$out/h200_v9_fp8_sweep.json" > "$out/h200_v9_fp8_sweep.log" 2>&1
echo "fp8 sweep rc $?"; grep -E "^M=" "$out/h200_v9_fp8_sweep.log"
timeout 150 python3 scripts/bench/profile_step.py --batches 1 --prefill 1024 --out "$out/h200_v9_profile.json" \
    > "$out/h200_v9_profile.log" 2>&1
echo "profile rc $?"; head -40 "$out/h200_v9_profile.log" | cut -c1-200
timeout 260 python3 -m dsv4 bench --layers 20 --no-compile --decode-steps 8 --prefill 32768 --no-transformers \
    --timing-only --out "$out/h200_v9_deep.json" > "$out/h200_v9_deep.log" 2>&1
echo "deep rc $?"; tail -20 "$out/h200_v9_deep.log" | cut -c1-200
