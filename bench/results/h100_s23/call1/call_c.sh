#!/usr/bin/env bash
# Twenty-third session, call C (issue 17 item 6): one annealing continuation of the installed model on .data_s1a
# (shard 1 + every algorithms document, x96: ~58 % of the tokens), evaluated by train_variants.sh.
set -u
out=${1:?}
MIN=${MIN:-5.0}
common="--minutes $MIN --seq-len 32768 --row-len 256 --lr 2e-4 --unlikelihood 1 --probe-prefixes 8 --probe-tokens 192
 --greedy-probe-every 16 --probe-chat-share 0.5 --probe-header-lens 9,11 --probe-class-lens 20,22 --seq-unlikelihood 1
 --probe-cache --chat-repeat 3 --warmup-steps 5 --tf32"
common=$(echo $common)
nvidia-smi --query-gpu=name,uuid --format=csv,noheader; git log --oneline -1 | cut -c1-80
DSV4_HC_POST_TRAIN=1 DATA=.data_s1a EVAL_S=${EVAL_S:-150} bash scripts/bench/train_variants.sh "$out" dsv4/builtin_model \
    "v9 --upweight stdlib=2,algorithms=96 --seed 41 $common"
