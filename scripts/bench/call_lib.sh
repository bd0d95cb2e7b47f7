# Shared by the one-call GPU scripts (call_s*.sh): `source` it after
# setting `out`. It makes OUT, installs the carried wheels (.whl, if any) into /tmp/site, puts the repository and
# then /tmp/site on PYTHONPATH, prints the GPU's name and UUID (which card ran the call), and defines
#   at LABEL                              seconds since the script started, after each stage
#   $decode_only                          the bench arguments of a decode-only A/B (12 timed steps a batch size,
#       no prefill graphs or compiled prefill: their capture is not what it measures)
#   bench NAME "BENCH ARGS" [VAR=VALUE ...]  `dsv4 bench --timing-only --no-transformers BENCH ARGS` with those
#       variables, into OUT/bench_NAME.json / .log, echoing its timing lines. 200 s: ~35 s of compile + capture
#       per decode bucket (the eighteenth session lost a bench at 120).
mkdir -p "$out"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,uuid --format=csv,noheader
t0=$(date +%s)
decode_only="--decode-steps 12 --prefill 128 --no-prefill-graphs --no-compile-prefill"
at() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
bench() {
    local name=$1 args=$2; shift 2
    # shellcheck disable=SC2086  # the bench arguments are meant to split
    env "$@" timeout 200 python3 -m dsv4 bench --timing-only --no-transformers $args \
        --out "$out/bench_$name.json" > "$out/bench_$name.log" 2>&1
    grep -E "ms/step \(|prefill [0-9]+:|floor_ratio" "$out/bench_$name.log" | cut -c1-120
}
