#!/usr/bin/env bash
# One H200 call (issue 17): 10-step probes of the training step at 32k tokens, one per setting (default: eager,
# and torch.compile'd blocks with `--compile inductor`; the last 3 steps of the eager one under torch.profiler), then
# a training run with the fastest setting, continuing from INIT (a model/ folder; "-" = from scratch).
# MINUTES: the training run's budget, or fit:SECONDS to size it so the whole call ends within SECONDS (probes,
# setup, saving and the evaluation included: 75 s are kept for those after the run).
# OUT gets probes.txt (step times, profiles, compile logs' tails) and RUN/ (scripts/train_builtin_gpu.py's bundle:
# at most 7 files). Extra arguments go to every probe and to the run (e.g. --lr 7e-4 --seed 5).
# PROBES (environment) overrides the settings: "name=args;name=args", e.g. PROBES="eager=;topk=DSV4_STABLE_TOPK".
# PROBE_TIMEOUT (environment): seconds per probe (default 300; a cold --compile inductor probe compiles everything).
# DATA (environment): the data folder (default .builtin_data; e.g. a scripts/data_shard.py shard, .data_s0).
# Usage (repository root, on the GPU machine; carry the data folder and the init):
#   [DATA=.data_s0] bash scripts/bench/train_probe_and_run.sh INIT MINUTES|fit:SECONDS OUT RUN [train args...]   (MINUTES 0: probes only)
set -u
t_start=$(date +%s)
init=$1 minutes=$2 out=$3 run=$4; shift 4
data=${DATA:-.builtin_data}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
init_args=(); [ "$init" != "-" ] && init_args=(--init "$init")
IFS=';' read -r -a probes <<< "${PROBES:-eager=--profile 3;inductor=--compile inductor}"
probe() {   # name, args (a word DSV4_*: that switch set to 1)
    local name=$1 envs=() args=(); shift
    for a in $*; do case $a in DSV4_*) envs+=("$a=1");; *) args+=("$a");; esac; done
    rm -rf "/tmp/probe_$name"
    env TORCH_LOGS=graph_breaks,recompiles "${envs[@]}" timeout "${PROBE_TIMEOUT:-300}" python3 scripts/train_builtin_gpu.py "$data" "/tmp/probe_$name" --steps 10 \
        --no-eval "${init_args[@]}" "${args[@]}" "${extra[@]}" > "/tmp/probe_$name.log" 2>&1
    echo "== probe $name (${envs[*]} ${args[*]}) rc $?"
    python3 -c "import json,sys; p=json.load(open(sys.argv[1])); print({k: p.get(k) for k in ('tok_per_s_steady',
        'step_s_median', 'step_s_first', 'compile_s_est', 'peak_mem_gib', 'compiled_graphs_first_step',
        'compiled_graphs_later', 'compile_cache')})" "/tmp/probe_$name/perf.json" \
        || tail -25 "/tmp/probe_$name.log"
}
extra=("$@")
{ for p in "${probes[@]}"; do probe "${p%%=*}" "${p#*=}"; done; } 2>&1 | tee "$out/probes.txt"
for p in "${probes[@]}"; do n=${p%%=*}
    { echo "==== $n: profile (if any), last log lines"; cat "/tmp/probe_$n/profile.txt" 2>/dev/null
      # every recompilation and the guard that triggered it (the eighteenth session's inductor probe kept only the
      # log's tail: 7 block graphs on the GPU against 4 on the CPU, unexplained)
      grep -A3 "Recompiling function" "/tmp/probe_$n.log" | grep -E "Recompiling|- [0-9]+/[0-9]+:" | cut -c1-260
      grep -v Warning "/tmp/probe_$n.log" | tail -15; } >> "$out/probes.txt" 2>&1; done
best=$(python3 - "${probes[@]}" <<'PY'
import json, sys
times = {}
for p in sys.argv[1:]:
    name = p.split("=", 1)[0]
    try:
        times[p] = json.load(open(f"/tmp/probe_{name}/perf.json"))["step_s_median"]
    except (OSError, KeyError, ValueError):
        pass
print(min(times, key=times.get) if times else "")
PY
)
[ -z "$best" ] && { echo "no probe finished: no training run" | tee -a "$out/probes.txt"; exit 1; }
echo "training with: $best" | tee -a "$out/probes.txt"
[ "$minutes" = 0 ] && exit 0
if [[ $minutes == fit:* ]]; then
    minutes=$(python3 -c "import sys; print(max(0.5, (int(sys.argv[1]) - (int(sys.argv[2]) - int(sys.argv[3])) - 75) / 60 - 0.5))" \
        "${minutes#fit:}" "$(date +%s)" "$t_start")
    echo "training budget: $minutes minutes" | tee -a "$out/probes.txt"
fi
envs=() args=()
for a in ${best#*=}; do case $a in DSV4_*) envs+=("$a=1");; --profile) ;; [0-9]*) ;; *) args+=("$a");; esac; done
env "${envs[@]}" python3 scripts/train_builtin_gpu.py "$data" "/tmp/$run" --minutes "$minutes" \
    --bundle "$out/$run" "${init_args[@]}" "${args[@]}" "${extra[@]}" 2>&1 | grep -v Warning | tail -40
