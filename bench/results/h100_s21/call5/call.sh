#!/usr/bin/env bash
# session 21 call 5 (issue 16): the fixes' GPU tests, PrefillGraphs with shared buffers, the bench with graphs default
export PYTHONUNBUFFERED=1
t0=$(date +%s); el(){ echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
nvidia-smi --query-gpu=name --format=csv,noheader
el tests
timeout 170 python3 -m pytest -q -m gpu tests/test_train_compile.py tests/test_train_syncs.py tests/test_prefill_graphs.py tests/test_graphs_gpu.py tests/test_fast_ops.py -p no:cacheprovider -W ignore --tb=short 2>&1 | grep -v "DEBUG\|^  warn" | tail -40 > $OUT/gpu_tests.log; tail -8 $OUT/gpu_tests.log
el prefill_graph
PYTHONPATH=. timeout 70 python3 scripts/bench/prefill_graph.py --tokens 1024 2048 --json $OUT/pg.json 2>&1 | tail -3
el bench
PYTHONPATH=. timeout 200 python3 -m dsv4 bench --timing-only --no-transformers --decode-steps 12 --prefill 1024,8192 --out $OUT/bench.json 2>&1 | grep -v "it/s\|bucket/s\|warn" | tail -22
el done
