#!/usr/bin/env bash
# The multi-GPU evidence run of issue 8 (e.g. 2x H200: NCCL, FSDP2 + expert parallel): the long-range retrieval
# task of scripts/finetune_retrieval.py trained on 1 GPU and under torchrun on N GPUs with --expert-parallel, same
# data and settings (the same as the committed CPU curve in docs/finetune/), then both curves and accuracies.
# Usage: bash scripts/finetune_multigpu.sh OUT [N_GPUS (default 2)] [STEPS (default 300)]
# Writes OUT/gpu1/ and OUT/gpuN/ (metrics.jsonl, loss.png, model/), and prints the held-out accuracies.
set -euo pipefail
out=${1:?usage: bash scripts/finetune_multigpu.sh OUT [N_GPUS] [STEPS]}
n=${2:-2}
steps=${3:-300}
cd "$(dirname "$0")/.."
python3 scripts/finetune_retrieval.py "$out" --prepare-only
args=(finetune --model "$out/base" --data "$out/retrieval.jsonl" --full --max-steps "$steps" --lr 3e-3
      --warmup-steps 20 --seq-len 470 --packs-per-step 4 --clip-grad 1.0 --no-grad-ckpt --no-quant-emulation
      --device cuda)
python3 -m dsv4 "${args[@]}" --out "$out/gpu1"
torchrun --standalone --nproc-per-node "$n" -m dsv4 "${args[@]}" --expert-parallel --out "$out/gpu$n"
python3 scripts/finetune_retrieval.py "$out" --accuracy "$out/gpu1/model"
python3 scripts/finetune_retrieval.py "$out" --accuracy "$out/gpu$n/model"
python3 - "$out/gpu1/metrics.jsonl" "$out/gpu$n/metrics.jsonl" <<'PY'
import json, sys
a, b = ([json.loads(line) for line in open(p)] for p in sys.argv[1:3])
for x, y in list(zip(a, b))[:: max(1, len(a) // 15)]:
    print(f"step {x['step']:4d}  1 GPU loss {x['loss']:.5f}  N GPUs loss {y['loss']:.5f}")
PY
