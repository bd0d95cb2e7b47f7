#!/usr/bin/env bash
# One H200 call (issue 17; issue 16's graph checks alongside): a training run of scripts/train_builtin_gpu.py
# sized so that the whole call ends within SECONDS (setup, the final evaluation and the bundle included: 70 s are
# kept for those), and, with CHECKS=1, the CUDA-graph tests and the fixed/general step divergence probe running
# beside it on the same GPU (small: they slow the training a little, cost the call nothing) into OUT/checks.log.
# OUT gets RUN/ (the run's bundle: at most 7 files) and checks.log: the device returns at most 8 files a call.
# The model stays in /tmp/RUN/model for a next call on the warm machine (--init /tmp/RUN/model).
# Usage (repository root, on the GPU machine; carry .builtin_data):
#   [CHECKS=1] bash scripts/bench/train_fit.sh SECONDS OUT RUN [train args: --init DIR --lr ... ]
set -u
t_start=$(date +%s)
secs=$1 out=$2 run=$3; shift 3
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
if [ "${CHECKS:-0}" = 1 ]; then
    { timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_graphs_gpu.py 2>&1 | tail -40
      for t in 1 3; do echo "== graph_divergence --tokens $t"
          timeout 90 python3 scripts/bench/graph_divergence.py --tokens $t 2>&1 | grep -v "rows differ" | head -60
      done; } > "$out/checks.log" 2>&1 &
fi
minutes=$(python3 -c "import sys; print(round(max(0.5, (int(sys.argv[1]) - (int(sys.argv[2]) - int(sys.argv[3])) - 70) / 60), 2))" \
    "$secs" "$(date +%s)" "$t_start")
echo "training budget: $minutes minutes"
python3 scripts/train_builtin_gpu.py .builtin_data "/tmp/$run" --minutes "$minutes" --bundle "$out/$run" "$@" 2>&1 \
    | grep -v Warning | tail -45
wait
[ -f "$out/checks.log" ] && grep -E "passed|failed|FAILED|cosine|first|origin" "$out/checks.log" | head -20
echo "call done at $(( $(date +%s) - t_start )) s"
