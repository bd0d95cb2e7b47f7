#!/usr/bin/env bash
# Twenty-fifth session, call A (issue 17 item 6): the installed built-in model (v10) continued on a fresh shard of
# data v6 (.data_s6b: shard 1 of 4 with every `exercises` and `algorithms` document, carried), alone on the GPU
# (the twenty-fourth session's v10 shared it with the GPU tests and ran at half rate). Train only: the bundle goes
# to OUT/best and is evaluated on the CPU afterwards (scripts/install_builtin.py runs scripts/eval_builtin.py).
# Usage (repository root, on the GPU machine; carry the data): [MIN=5.0] [UP=...] [LR=2e-4] [DATA=.data_s6b]
#        [RUN=v11] [SEED=44] bash call_s25a.sh OUT
# (the next continuation: DATA=.data_s6c RUN=v12 SEED=45, from the then installed v11)
set -u
out=${1:?}
MIN=${MIN:-5.0}
UP=${UP:-stdlib=2,algorithms=4,exercises=8}
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
git log --oneline -1 2>/dev/null | cut -c1-80
common="--minutes $MIN --seq-len 32768 --row-len 256 --lr ${LR:-2e-4} --unlikelihood 1 --probe-prefixes 8
 --probe-tokens 192 --greedy-probe-every 16 --probe-chat-share 0.5 --probe-header-lens 9,11 --probe-class-lens 20,22
 --seq-unlikelihood 1 --probe-cache --chat-repeat 3 --warmup-steps 5 --tf32"
DATA=${DATA:-.data_s6b} RUN=${RUN:-v11}
echo "== $RUN: from dsv4/builtin_model on $DATA, $UP"
DSV4_HC_POST_TRAIN=1 PYTHONPATH=$PWD python3 scripts/train_builtin_gpu.py "$DATA" "/tmp/$RUN" --init dsv4/builtin_model \
    --bundle "$out/best" --upweight "$UP" --seed "${SEED:-44}" $(echo $common) 2>&1 | grep -v Warning \
    | grep -E "held-out|^step |tokens/s|peak|Error|error" | cut -c1-160 | tail -12
ls -la "$out/best" 2>&1 | head -12
