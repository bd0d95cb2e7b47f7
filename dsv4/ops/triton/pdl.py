"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's own kernels: DSV4_PDL=1, opt-in.

Why: a captured batch-1 decode step is ~346 kernels of 1-20 us (bench/results/h100_s32 call C), and each starts
only when the one before has drained: its launch, its prologue and its first loads' latency are paid in series. With
PDL a kernel's programs may start while the kernel before it finishes; they block in `griddepcontrol.wait`
(`pdl_wait`) until that kernel has completed and its writes are visible. Before the wait a program may touch only
what no kernel of the step writes: the FP8 linear's weight and scales, whose slice `prefetch_rows` asks the L2 for
(one bulk prefetch per weight row), so its first loads after the wait hit the L2.
`pdl_release` (`griddepcontrol.launch_dependents`) lets the next kernel launch once every program of this one has
called it (or exited); the kernels here call it after their last load of anything a later kernel may write, as
inductor's own PDL kernels do (`TORCHINDUCTOR_ENABLE_PDL`), so a dependent that does not wait cannot overwrite what
they still read.
Kernels with PDL: the FP8 and bf16 small-M linears (both prefetch) and their split sum, the FP4 decode kernel and its
x operand, the act and fake quants, mHC's Sinkhorn, the sparse attention and its merge (the Triton kernels of a
decode step's profile, bench/results/h100_s32 call C).
The chain stays correct kernel by kernel: every PDL kernel waits before it reads any output of the step and before
it releases, so when a kernel launches, everything before its predecessor has completed. Kernels launched without
PDL (cuBLAS, torch's own) keep full stream order before and after them.
DSV4_PDL=1 also turns inductor's PDL on for the compiled steps (`engine.graphs.compiled`): our kernels' programs
start early only where the kernel before them releases early.
Off the GPU (Triton's CPU interpreter, which has no inline assembly) the flag is False and these are no-ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.registry import env_switch


def pdl_on(device: torch.device) -> bool:
    """Launch the decode kernels with PDL here? DSV4_PDL=1 on a CUDA device of compute capability 9 or more."""
    return (device.type == "cuda" and env_switch("DSV4_PDL")
            and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until the previous kernel has completed and its writes are visible (nothing without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel launch once every program has come here (nothing without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_rows(row_ptrs, nbytes, PDL: tl.constexpr):
    """Ask the L2 for `nbytes` (a multiple of 16) from each of `row_ptrs` (16-byte aligned): one TMA bulk prefetch
    per row, no registers or shared memory held (nothing without PDL)."""
    if PDL:
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; // $0", "=r,l,r",
                                  [row_ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)
