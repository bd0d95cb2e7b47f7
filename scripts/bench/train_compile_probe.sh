#!/usr/bin/env bash
# One H200 call (issue 17): the training step eager vs torch.compile'd blocks (`--compile inductor`), 10 steps each
# at 32k tokens a step (one padded sequence), then the gpu tests of the compiled step. Prints, per setting, steady
# tokens/s, median step time, peak memory and the compilation time (first step minus the median); OUT gets
# compile_probe.txt and each probe's log (inductor's compile log included).
# Usage (repository root, on the GPU machine; carry .builtin_data: scripts/builtin_data.py downloads wheels):
#   bash scripts/bench/train_compile_probe.sh OUT [train args...]
set -u
out=$1; shift
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
[ -f .builtin_data/train.npz ] || { echo "no .builtin_data/train.npz: carry it (scripts/builtin_data.py)"; exit 2; }
probe() {   # name, extra args
    local name=$1; shift
    rm -rf "/tmp/cprobe_$name"
    timeout 420 python3 scripts/train_builtin_gpu.py .builtin_data "/tmp/cprobe_$name" --steps 10 --no-eval "$@" \
        > "$out/probe_$name.log" 2>&1
    echo "== $name rc $?"
    python3 -c "import json,sys; p=json.load(open(sys.argv[1])); print({k: p.get(k) for k in ('tok_per_s_steady',
        'step_s_median', 'step_s_first', 'compile_s_est', 'peak_mem_gib', 'tokens_per_step')})" \
        "/tmp/cprobe_$name/perf.json" || tail -30 "$out/probe_$name.log"
}
{
    probe eager "$@"
    TORCH_LOGS=graph_breaks,recompiles probe inductor --compile inductor "$@"
    python3 -m pytest -q -p no:cacheprovider tests/test_train_compile.py -m gpu 2>&1 | tail -15
} 2>&1 | tee "$out/compile_probe.txt"
