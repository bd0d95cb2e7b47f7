#!/usr/bin/env bash
# One H200 call (issue 17): two 10-step probes of the training step at 32k tokens (the last 3 steps of each under
# torch.profiler: the indexer top-k by the full stable sort, then by `ops.stable_topk`, DSV4_STABLE_TOPK=1), then
# a training run of MINUTES with the faster of the two, continuing from INIT (a model/ folder; "-" = from scratch).
# OUT gets probes.txt (both profiles and step times) and RUN/ (the bundle of scripts/train_builtin_gpu.py: at most
# 7 files). Extra arguments go to the training run (e.g. --lr 1e-3 --seed 2).
# Usage (repository root, on the GPU machine):
#   bash scripts/bench/train_probe_and_run.sh INIT MINUTES OUT RUN [train args...]     (MINUTES 0: probes only)
set -u
init=$1 minutes=$2 out=$3 run=$4; shift 4
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
init_args=(); [ "$init" != "-" ] && init_args=(--init "$init")
probe() {   # name, stable-topk switch
    rm -rf "/tmp/probe_$1"
    DSV4_STABLE_TOPK=$2 timeout 170 python3 scripts/train_builtin_gpu.py .builtin_data "/tmp/probe_$1" --steps 10 \
        --profile 3 --no-eval "${init_args[@]}" > "/tmp/probe_$1.log" 2>&1
    echo "== probe $1 (DSV4_STABLE_TOPK=$2) rc $?"
    python3 -c "import json,sys; p=json.load(open(sys.argv[1])); print({k: p[k] for k in ('tok_per_s_steady', 'step_s_median', 'peak_mem_gib')})" "/tmp/probe_$1/perf.json" || tail -20 "/tmp/probe_$1.log"
}
{ probe sort 0; probe topk 1; } 2>&1 | tee "$out/probes.txt"
for n in sort topk; do { echo "==== profile, $n"; cat "/tmp/probe_$n/profile.txt"; } >> "$out/probes.txt" 2>&1; done
speed() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step_s_median'])" "/tmp/probe_$1/perf.json" 2>/dev/null || echo 1e9; }
topk=0; python3 -c "import sys; sys.exit(0 if float(sys.argv[2]) < 0.98 * float(sys.argv[1]) else 1)" "$(speed sort)" "$(speed topk)" && topk=1
echo "training with DSV4_STABLE_TOPK=$topk" | tee -a "$out/probes.txt"
[ "$minutes" = 0 ] && exit 0
DSV4_STABLE_TOPK=$topk python3 scripts/train_builtin_gpu.py .builtin_data "/tmp/$run" --minutes "$minutes" \
    --bundle "$out/$run" "${init_args[@]}" "$@" 2>&1 | grep -v Warning | tail -40
