#!/usr/bin/env bash
# One H200 call (issue 17): several short training continuations from one init, one after another on the GPU; each
# finished model is evaluated on the machine's CPU cores (scripts/bench/quick_eval_builtin.py: the eval's chat and
# code checks, greedy on CPU as the acceptance figures are) while the next one trains. The device returns at most
# 8 files and 64 MiB (one 39 MB bundle of 7 files), so only the best variant's bundle comes back, in OUT/best/, with
# every variant's quick-eval results, training record and the choice in OUT/variants.json. Copy nothing else
# into OUT: a ninth file there makes the device return none of them (the bundle included). "Best" = the largest worst margin over the
# three bounds (chat def+EOS fraction / 0.9, code distinct-4 mean / 0.6, code distinct-4 min / 0.3; >= 1: all pass)
# on the SELECTION set (quick_eval_builtin.py --selection: held-out chat requests 21+, other code prompts), so the
# chosen variant's acceptance figures (also reported) are not picked by themselves. Among variants that pass all
# three selection bounds (worst margin >= 1), the one whose README bodies (quick_eval_builtin.py's teacher-forced
# log-probability of plain bodies after README's prompt, mean of the bodies) score highest is chosen, one whose
# README text (generated alone, `readme_greedy`) does not loop before any that does: issue 17 item 6 (README's
# prompt gets a plausible body) is what such runs are for, and the selection set guards the rest.
# Usage (repository root, on the GPU machine; carry .builtin_data, or DATA=folder to train on another one, e.g. a
# scripts/data_shard.py shard):
#   [DATA=.data_s0] [EVAL_S=240] bash scripts/bench/train_variants.sh OUT INIT_DIR "NAME1 ARGS..." "NAME2 ARGS..." ...
# Each quoted variant: a name, then scripts/train_builtin_gpu.py arguments (--steps N, --seed S, ...).
set -u
out=$1 init=$2; shift 2
data=${DATA:-.builtin_data}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
t0=$(date +%s)
names=()
for spec in "$@"; do
    read -r name args <<< "$spec"
    names+=("$name")
    echo "== $name ($(( $(date +%s) - t0 )) s): $args"
    # shellcheck disable=SC2086  # the variant's arguments are meant to split
    python3 scripts/train_builtin_gpu.py "$data" "/tmp/$name" --init "$init" --bundle "/tmp/bundle_$name" \
        $args 2>&1 | grep -v Warning | grep -E "held-out|^step " | cut -c1-160 | tail -4
    CUDA_VISIBLE_DEVICES= timeout "${EVAL_S:-240}" python3 scripts/bench/quick_eval_builtin.py "/tmp/$name/model" --threads 4 \
        --data "$data" --selection --out "/tmp/$name.quick.json" > "/tmp/$name.quick.log" 2>&1 &
done
wait
echo "== evaluated ($(( $(date +%s) - t0 )) s)"
best=$(python3 - "$out" "${names[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
scores, results, training = {}, {}, {}
for n in names:
    # each variant's training record (perf.json: steps, tokens, times, settings) and probe seconds, in the one
    # variants.json: the device returns at most 8 files, and OUT/best/ already holds 7
    perf = Path(f"/tmp/{n}/perf.json")
    if perf.exists():
        training[n] = json.loads(perf.read_text())
        probes = [r["probe_s"] for r in map(json.loads, Path(f"/tmp/{n}/metrics.jsonl").read_text().splitlines())
                  if r.get("probe_s")]
        training[n]["probe_s_mean"] = sum(probes) / len(probes) if probes else None
    p = Path(f"/tmp/{n}.quick.json")
    if not p.exists():
        print(f"{n}: no evaluation", file=sys.stderr)
        continue
    d = results[n] = json.loads(p.read_text())
    c, k = d["chat"], d["code"]
    sc, sk = d["selection"]["chat"], d["selection"]["code"]
    scores[n] = min(sc["def_and_eos"] / sc["n"] / 0.9, sk["distinct4_mean"] / 0.6, sk["distinct4_min"] / 0.3)
    print(f"{n}: selection chat {sc['def_and_eos']}/{sc['n']}, code {sk['distinct4_mean']:.3f} / "
          f"{sk['distinct4_min']:.3f}, worst margin {scores[n]:.3f}; acceptance chat {c['def_and_eos']}/{c['n']}, "
          f"code {k['distinct4_mean']:.3f} / {k['distinct4_min']:.3f}", file=sys.stderr)
def readme(n):
    bodies = results[n].get("readme_bodies") or {}
    return sum(b["mean"] for b in bodies.values()) / len(bodies) if bodies else float("-inf")
def loops(n):
    return bool((results[n].get("readme_greedy") or {}).get("loops"))
passing = [n for n in scores if scores[n] >= 1]
if passing:
    # README's own text looping outranks its bodies' log-probability: a newcomer's first command must not loop
    best = max(passing, key=lambda n: (not loops(n), readme(n)))
else:
    best = max(scores, key=scores.get) if scores else ""
for n in scores:
    print(f"{n}: README bodies mean log-p {readme(n):.3f}{' (passes the selection bounds)' if n in passing else ''}"
          f"{'; README text LOOPS' if loops(n) else ''}", file=sys.stderr)
(out / "variants.json").write_text(json.dumps({"best": best, "worst_margin": scores, "passing": passing,
                                              "readme_mean": {n: readme(n) for n in scores}, "quick_eval": results,
                                              "training": training},
                                              indent=1, ensure_ascii=False) + "\n")
print(best)
EOF
)
[ -n "$best" ] && cp -r "/tmp/bundle_$best" "$out/best" && echo "best: $best"
echo "call done at $(( $(date +%s) - t0 )) s"
