#!/usr/bin/env bash
# session 21 call 1 (issue 16): GPU tests of the graphs and fast ops, host A/B, PrefillGraphs timing, bench
export PYTHONUNBUFFERED=1
t0=$(date +%s); el(){ echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
nvidia-smi --query-gpu=name --format=csv,noheader
el tests
timeout 120 python3 -m pytest -q -m gpu tests/test_prefill_graphs.py tests/test_fast_ops.py tests/test_graphs_gpu.py -x -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/gpu_tests.log
el host_ab
for t in old new; do d=$t; [ $t = new ] && d=.; PYTHONPATH=$d timeout 60 python3 scripts/bench/prefill_host.py --tokens 1024 --json $OUT/host_$t.json 2>&1 | tail -25; done
el prefill_graph
PYTHONPATH=. timeout 90 python3 scripts/bench/prefill_graph.py --tokens 1024 2048 --json $OUT/pg.json 2>&1 | tail -12
PYTHONPATH=. timeout 60 python3 scripts/bench/prefill_graph.py --tokens 1000 --bucket 1024 --json $OUT/pg_pad.json 2>&1 | tail -8
el bench
PYTHONPATH=. timeout 200 python3 -m dsv4 bench --timing-only --no-transformers --decode-steps 12 --prefill 1024,8192 --prefill-graphs --out $OUT/bench.json 2>&1 | tail -30
el done
