#!/usr/bin/env bash
# Thirty-eighth session's plan, call C (~5 min, carry .whl; chain it on the warm card after call_s37d.sh, whose
# default bench is the baseline): two of torch's own compiler switches, no code of ours, on the compiled decode
# step, whose ~290 small kernels are most of batch 1's gap to its floor (bench/NOTES.md):
#   TORCHINDUCTOR_ENABLE_PDL=1: inductor's Triton kernels launched with programmatic dependent launch (Hopper): each
#     may start while the kernel before it drains, waiting (griddepcontrol.wait) only where it reads that kernel's
#     outputs; kept as edges in a CUDA graph. Our own kernels and cuBLAS launch as before (they wait for the whole
#     previous kernel), so only inductor-to-inductor steps can gain.
#   TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1: inductor searches the block sizes of its pointwise / reduction kernels
#     at compile time instead of taking its heuristics.
# The bench records TORCHINDUCTOR_* variables in its JSON (`env`).
# Usage (repository root, on the GPU machine): bash scripts/bench/call_s38c.sh OUT_DIR
set -u
out=${1:?usage: call_s38c.sh OUT_DIR}
source scripts/bench/call_lib.sh
bench pdl "$decode_only" TORCHINDUCTOR_ENABLE_PDL=1
bench coordinate_descent "$decode_only" TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1
at done
