"""Routed experts as (row, expert) pairs: fixed shapes and no host synchronisation (CUDA-graph capturable).

`pair_linear(x, ids, weight, scale, fmt)` = x[p] @ W[ids[p]]^T for stacked expert weights [E, N, ...] as stored
(FP4 packed + e8m0, or FP8 + 128x128 e8m0). The plain twin gathers and dequantises the named experts; the Triton
kernel (`ops/triton/fp4_gemv.py`) decodes FP4 in-kernel and reads only those experts. Both accumulate in fp32.
`fp8_grid=True` is the caller's word that x is on the FP8 grid per 128-K block (the MoE's act-quant emulation):
the product is the same, and then the split-K FP8-MMA decode kernel may take the call (`decode_fp8mma_plan`,
`ops/triton/fp4_decode_fp8mma.py`: the reference's FP8 x FP8 arithmetic; DSV4_FP4_DECODE_MMA) where the caller
also says `decode_sized=True`: its step has at most `DECODE_KERNEL_MAX_TOKENS` tokens (the MoE decides; below).
"""

from __future__ import annotations

import torch

from dsv4.ops.fp4_layout import is_tiled, out_features
from dsv4.ops.ref import dequant_weight
from dsv4.ops.registry import custom_op, dispatch, env_switch, register_triton
from dsv4.ops.split_sum import sum_splits


def _pair_linear_twin(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      fmt: str, fp8_grid: bool = False, decode_sized: bool = False) -> torch.Tensor:
    """x [P, K], ids [P] -> fp32 [P, N] (float64 accumulation for fp32 inputs, like `ops.dense`); `fp8_grid` and
    `decode_sized` change nothing here (the module docstring)."""
    acc = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    w = _dequant_gathered(weight[ids], None if scale is None else scale[ids], fmt)
    return torch.einsum("pk,pnk->pn", x.to(acc), w.to(acc)).float()


def _dequant_gathered(w: torch.Tensor, s: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """Gathered weights [P, N, ...] (+ scales [P, ...]) -> fp32 [P, N, K]: one batched dequantisation (elementwise,
    so bit for bit the per-pair `dequant_weight` of each; tests/test_moe_pairs_dequant.py). No host sync, fixed
    shapes (capturable). NOTE: a Python loop over the pairs, as before, traced into ~10k graph nodes under
    torch.compile; the batched form's temporaries are a few [P, N, K] tensors, beside the fp32 result's own."""
    return dequant_weight(w, s, fmt)


pair_linear = dispatch("pair_linear", _pair_linear_twin)


def _fp4_applies(x, ids, weight, scale, fmt, fp8_grid=False, decode_sized=False) -> bool:
    return fmt == "fp4" and x.is_cuda and x.shape[1] % 128 == 0 and not torch.is_grad_enabled()


def _fp4_kernel(x, ids, weight, scale, fmt, fp8_grid=False, decode_sized=False):
    plan = decode_fp8mma_plan(x, weight, fp8_grid) if decode_sized else None
    if plan is not None:
        # the partials' sum is traced with the caller: under compile it fuses into the consumer (SwiGLU, the sum)
        return sum_splits(_fp4_decode_fp8mma(x.contiguous(), ids, weight, scale, None, *plan))
    return _fp4_pair_gemv(x.contiguous(), ids, weight, scale)


_WAVE_PROGRAMS = 2 * 132          # programs per call from which splitting K stopped paying (h100_s30 call A)
# The plan's K split is the one a batch-1 call (about this many pair rows: top-6 routing) takes, whatever the call's
# rows: the split sets the fp32 summation order of a row's partials, so a row must get it from the weight's shape,
# never from its batch (batch invariance: a request's tokens alone and in a batch are the same bits).
_PLAN_ROWS = 8
# The MoE steps (tokens, padding included) whose FP4 calls may take the FP8-MMA decode kernel: every decode batch
# up to this size, and prefill steps this short. The token count, not the call's rows, chooses the kernel, and this
# is the smallest prefill bucket (`engine.prefill_graphs.buckets_up_to`, which checks it), so a step and the bucket
# it is padded to take the same kernel class (see `decode_fp8mma_plan`). Decode batches above it (max_num_seqs >
# 256) would take the fp32-class kernels: a token's bits then differ between batches below and above it.
DECODE_KERNEL_MAX_TOKENS = 256
# DSV4_FP4_DECODE_MMA's default: off, so a request's tokens do not depend on the steps it shares (`decode_fp8mma_plan`).
DECODE_MMA_DEFAULT = False


def decode_fp8mma_plan(x: torch.Tensor, weight: torch.Tensor, fp8_grid: bool) -> tuple[int, int, int, int] | None:
    """(split, block_m, block_n, num_warps) of the split-K FP8-MMA decode kernel, or None where it does not run:
    x off the FP8 grid (its FP8 x FP8 products would not be exact), K not a multiple of 128, or
    DSV4_FP4_DECODE_MMA off (opt-in, `DECODE_MMA_DEFAULT`; the callers also gate it by the step's tokens,
    `DECODE_KERNEL_MAX_TOKENS`).
    16 tokens per tile (8-token tiles, fewer instructions offline, ran 2x slower on the H100 with Triton 3.6:
    bench/results/h100_s30); K split until a batch-1 call (`_PLAN_ROWS` rows, one program per row and weight-row
    block) runs `_WAVE_PROGRAMS` programs, the same split at every batch (`_PLAN_ROWS`). Measured on H100s: over
    the stored layout not faster than the kernels dispatched there (h100_s30: bs1 29.4 against 22.8 us a call,
    bs64 565 against 572); over the tile-major layout the fastest at every decode batch (h100_s31, the bench's decode
    step: bs1 1.85 -> 1.72 ms, bs8 3.33 -> 3.18, bs64 8.51 -> 7.58 against the pair GEMV and the swapped kernel over
    the same layout).
    Precision class: its FP8 MMA accumulates each 32-K sub-block below fp32 (the reference fp4_gemm's class), the
    other FP4 kernels in fp32. Up to the thirty-fifth session the call's row count chose it, so a general step and
    its padded prefill bucket could compute the same rows in two classes (h100_s32 call A: test_prefill_graphs'
    replay tests, cosine 0.994 and 0.928 on the tiny random model). Now the step's token count chooses it, and
    `DECODE_KERNEL_MAX_TOKENS` is a prefill bucket edge: those tests pass with it on (h100_s36 call B). It stays
    opt-in for the engine's mixed steps: a request's decode tokens computed in a step of more than 256 tokens
    (prefill chunks beside them) take the fp32 class, alone the FP8-MMA one, and on the tiny random model the
    difference flips greedy tokens (h100_s36 call A: test_engine::test_cuda_defaults_give_the_same_tokens, the
    only failure with it on). Measured (h100_s36, one H100): decode bs1 / bs8 1.46 / 2.78 ms against 1.47 /
    2.93 without; bs64 7.63 ms (8.31 on the thirty-fifth session's card without)."""
    if not (fp8_grid and x.dtype in (torch.bfloat16, torch.float32) and x.shape[1] % 128 == 0
            and env_switch("DSV4_FP4_DECODE_MMA", default=DECODE_MMA_DEFAULT)):
        return None
    # 64 weight rows per program over the tile-major layout (its tile: one contiguous 4 KB run per 128-K block;
    # h100_s30 call B, h100_s32 call C: 16 x 64 with 4 warps and 3 stages the fastest there at bs8 and bs64), 128
    # over the stored one
    block_n = 64 if is_tiled(weight) else 128
    blocks, tiles = x.shape[1] // 128, _PLAN_ROWS * -(-out_features(weight) // block_n)
    split = 1
    while split * tiles < _WAVE_PROGRAMS and blocks % (2 * split) == 0 and split < 8:
        split *= 2
    return split, 16, block_n, 4


def _decode_fake(x, eid, weight, scale, offs, split, block_m, block_n, num_warps):
    return x.new_empty(split, x.shape[0], out_features(weight), dtype=torch.float32)


@custom_op("fp4_decode_fp8mma", _decode_fake)
def _fp4_decode_fp8mma(x: torch.Tensor, eid: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       offs: torch.Tensor | None, split: int, block_m: int, block_n: int,
                       num_warps: int) -> torch.Tensor:
    """fp32 partials [split, M, N] (`fp4_decode_fp8mma`); `offs` None: pair rows, else sorted rows' offsets."""
    from dsv4.ops.triton.fp4_decode_fp8mma import fp4_decode_fp8mma

    return fp4_decode_fp8mma(x, eid, weight, scale, offs=offs, split=split, block_m=block_m, block_n=block_n,
                             num_warps=num_warps)


@custom_op("fp4_pair_gemv", lambda x, ids, weight, scale: x.new_empty(x.shape[0], out_features(weight),
                                                                         dtype=torch.float32))
def _fp4_pair_gemv(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from dsv4.ops.triton.fp4_decode import packed_from_env
    from dsv4.ops.triton.fp4_gemv import fp4_pair_gemv

    return fp4_pair_gemv(x, ids, weight, scale, packed=packed_from_env())


register_triton("pair_linear", "triton_fp4_pair_gemv", _fp4_applies, _fp4_kernel)
