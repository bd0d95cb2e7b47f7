"""FP8 block-scaled linear for small M (decode) on the stored e4m3 bytes, on the tensor cores.

y [M, N] = x [M, K] @ W^T with W float8_e4m3fn [N, K] and one e8m0 scale per 128x128 block. The weight takes the
MMA's left (M = 64) slot and the few token rows its right one ("swapped operands": the MMA is as wide as the weight
tile, not as the batch), so each program reads a [BLOCK_N, 128] FP8 tile per K block and feeds it to `tl.dot`
as it is: no per-element decode, which made the earlier GEMV (removed after v8) issue-bound at ~0.05-0.35 of the
copy bandwidth. Measured on the H200 (v8, `bench/results/h200_fp8_linear.log`): this kernel is no faster yet,
0.05-0.36 of the copy bandwidth at its default configuration; see bench/NOTES.md, "v8".

Per 128-wide K block, with the act-quant emulation on, x is quantised in the kernel by the exact arithmetic of
`ops/triton/quant.py` (`fp8_block_quant`, bit-identical to `dsv4.quant.act_quant`), the block's FP8 x FP8 dot is
summed by the MMA, and the block sum is multiplied by both power-of-two scales and added to an fp32 accumulator
in registers: the reference's blockwise FP8 GEMM (and DeepSeek's promotion of partial sums every 128 K). With it
off, x stays bf16 and the weight is converted to bf16 (exact) for a bf16 dot. Split-K spreads the few output
tiles of a decode GEMV over the GPU; the partials are added in split order by a second kernel (deterministic).
Batch invariant (`kernel_plan`): every M takes 16-row tiles and a K split chosen from N and K, so a row's bits do
not depend on how many rows share the call (up to v10 the tile grew to 32 / 64 rows with M; measured against it
at bs64 in one call, 10.32 ms invariant vs 10.68 wide: bench/NOTES.md, seventh session).
Precision class: bf16 output (the twin's output is bf16 too); the FP8 MMA's internal accumulation over one 128
block is the hardware's (below fp32 on Hopper), as in cuBLAS's blockwise FP8 GEMM, so the test bound is the bf16
output class (relative 1e-2 of the row norm, measured ~2e-3), not the fp32 class. (An fp16-MMA variant, the same
codes with fp32 sums, ran slower than this one at bs64 and was removed: bench/NOTES.md, forty-first session.)

With `groups` (act quant off: attention's wo_a, `ops.block_diag_linear`) the weight's rows come in G groups of R (a
multiple of BLOCK_N) and x is [M, G*K]: each weight tile reads its group's K columns of x (row stride G*K, offset
g*K); tiles, split and sums are the one-group kernel's, so the same batch invariance.

In Triton's CPU interpreter (which has no FP8 dot) the weight bytes are decoded by bit placement instead and the
dot runs in fp32 (IEEE): the same products, exactly, so the interpreter checks the indexing and scaling.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dsv4.ops.registry import env_switch
from dsv4.ops.triton.fp4_grouped import _e8m0
from dsv4.ops.triton.quant import fp8_block_quant
from dsv4.ops.triton.splitk import add_splits, auto_split, divisor_at_most, split_outputs

_TWO_POW_120 = tl.constexpr(2.0**120)


@triton.jit
def _e4m3_bytes_to_f32(b):
    """uint8 e4m3 codes -> fp32 by bit placement (exponent and mantissa to fp32 bits 26-20, sign to 31, times
    2^120): the interpreter's stand-in for the hardware conversion. NaN codes decode as +-480 (unchecked here)."""
    w = b.to(tl.int32)
    bits = ((w & 0x7F) << 20) | ((w & 0x80) << 24)
    return bits.to(tl.float32, bitcast=True) * _TWO_POW_120


@triton.jit
def _x_codes(x_ptr, xs_ptr, rows, kb, offs_k, M, K, PREQUANT: tl.constexpr, HW_FP8: tl.constexpr,
             BLOCK_M: tl.constexpr):
    """One 128-K block of x as the dot's operand (on the GPU e4m3; the codes' fp32 values in the interpreter) and its
    per-row scales [BLOCK_M]: read from `act_quant_fp8`'s outputs (PREQUANT: codes [M, K], scales column-major
    [K/128, M]) or quantised here from x as stored; `fp8_block_quant` made both, so the same bits."""
    if PREQUANT:
        code = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + kb * 128 + offs_k[None, :],
                       mask=rows[:, None] < M, other=0)
        scale = tl.load(xs_ptr + kb * M + rows, mask=rows < M, other=0.0)
        if HW_FP8:
            q = code.to(tl.float8e4nv, bitcast=True)
        else:
            q = _e4m3_bytes_to_f32(code)
    else:
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + kb * 128 + offs_k[None, :],
                    mask=rows[:, None] < M, other=0.0).to(tl.float32)                            # [BM, 128]
        q, x_scale = fp8_block_quant(x, tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)[:, None])
        scale = tl.reshape(x_scale, [BLOCK_M])
        if HW_FP8:
            q = q.to(tl.float8e4nv)                                      # q is on the e4m3 grid: exact
    return q, scale


@triton.jit
def _fp8_linear_small_m(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, KB_PER_SPLIT,
                        ACT_QUANT: tl.constexpr, HW_FP8: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_M: tl.constexpr, xs_ptr=None, PREQUANT: tl.constexpr = False,
                        GROUPED: tl.constexpr = False, X_STRIDE=0, GROUP_N=1):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)          # row blocks adjacent: they share W tiles
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)        # N is a multiple of BLOCK_N: no mask
    split = tl.program_id(2)
    offs_k = tl.arange(0, 128)
    n_kb = K // 128
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)               # transposed output tile
    if GROUPED:                     # groups of GROUP_N weight rows: group g reads x[:, g*K:(g+1)*K] of [M, G*K]
        group = tl.program_id(1) * BLOCK_N // GROUP_N
        x_row = x_ptr + rows[:, None].to(tl.int64) * X_STRIDE + group * K                         # [BM, 1]
    else:                           # one group: x [M, K]
        x_row = x_ptr + rows[:, None].to(tl.int64) * K
    for i in range(0, KB_PER_SPLIT):
        kb = split * KB_PER_SPLIT + i
        wb = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + kb * 128 + offs_k[None, :])      # uint8 [BN, 128]
        w_scale = _e8m0(tl.load(s_ptr + (offs_n // 128) * n_kb + kb))                             # [BN]
        if ACT_QUANT:               # FP8 x FP8 (x's codes quantised once per call with PREQUANT, else here)
            q, x_scale = _x_codes(x_ptr, xs_ptr, rows, kb, offs_k, M, K, PREQUANT, HW_FP8, BLOCK_M)
            if HW_FP8:
                part = tl.dot(wb.to(tl.float8e4nv, bitcast=True), tl.trans(q))
            else:
                part = tl.dot(_e4m3_bytes_to_f32(wb), tl.trans(q), input_precision="ieee")
            acc += part * w_scale[:, None] * x_scale[None, :]
        else:                       # bf16 x, the weight converted to bf16 (exact)
            x = tl.load(x_row + kb * 128 + offs_k[None, :], mask=rows[:, None] < M, other=0.0).to(tl.float32)
            if HW_FP8:
                part = tl.dot(wb.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16), tl.trans(x.to(tl.bfloat16)))
            else:
                part = tl.dot(_e4m3_bytes_to_f32(wb), tl.trans(x), input_precision="ieee")
            acc += part * w_scale[:, None]
    idx = rows[None, :].to(tl.int64) * N + offs_n[:, None]
    tl.store(out_ptr + split.to(tl.int64) * M * N + idx, acc.to(out_ptr.dtype.element_ty), mask=rows[None, :] < M)


def check_fp8_weight(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_n: int = 64,
                     groups: int = 1) -> None:
    K, N = x.shape[-1] // groups, weight.shape[0]
    if groups > 1 and (x.shape[-1] % groups or N % groups or N // groups % block_n):
        raise ValueError(f"fp8 linear: {groups} groups need x [..., {groups} * K] and weight rows in groups of a "
                         f"multiple of block_n={block_n}; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if weight.dtype != torch.float8_e4m3fn or weight.shape != (N, K):
        raise ValueError(f"fp8 linear: weight must be float8_e4m3fn [N, {K}], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if N % 128 or K % 128 or tuple(scale.shape) != (N // 128, K // 128) or scale.element_size() != 1:
        raise ValueError(f"fp8 linear: N, K must be multiples of 128 with an e8m0 scale [N/128, K/128]; got weight "
                         f"{tuple(weight.shape)}, scale {scale.dtype} {tuple(scale.shape)}")
    if not (weight.is_contiguous() and scale.is_contiguous()):
        raise ValueError("fp8 linear: weight and scale must be contiguous")
    if 128 % block_n or block_n < 16:
        raise ValueError(f"fp8 linear: block_n must divide 128 and be >= 16, got {block_n}")


BLOCK_M = 16     # the tile height for every M: a row's arithmetic does not depend on its batch (below)


def kernel_plan(M: int, N: int, K: int, device: torch.device, block_n: int = 64, block_m: int = BLOCK_M,
                split_k: int | None = None, programs_per_sm: int = 4) -> tuple[int, tuple[int, int, int]]:
    """(K splits, grid) of a call. Batch invariance: the split and the tile come from N and K only, never from M,
    so a row's result is the same whether it is computed alone or with up to SMALL_M others (the fixed-shape
    decode step, the general step, a verification step, another batch size: all the same bits per row). Rows
    run in `block_m`-row blocks, each its own program; the blocks of one weight tile are adjacent in the grid
    (program_id 0), so they run together and read that tile from L2 after the first."""
    n_kb = K // 128
    want = split_k or auto_split(N // block_n, device, programs_per_sm)
    if split_k is None and max_split_from_env():
        want = min(want, max_split_from_env())
    split = divisor_at_most(n_kb, want)
    return split, (triton.cdiv(M, block_m), N // block_n, split)


# From this many rows a call quantises x once (`prequant`) by default. Measured (H100, bench/results/h100_s41/prequant,
# one card, one call): decode bs64 8.27 -> 8.02 ms (replay 8.20 -> 7.83): each of a 64-row call's four 16-row blocks
# quantised its x again in every program (the K loop 6.8 SASS instructions a weight byte with it, 1.8 without:
# thirty-eighth session). At bs1 / bs8 (one block) it measured as noise (h100_s37) and costs a launch, so not there.
PREQUANT_FROM_M = 33


def prequant_from_env(m: int) -> bool:
    """Quantise x once per call (`fp8_linear_small_m`'s `prequant`) for this call's M rows? By default from
    `PREQUANT_FROM_M` rows; DSV4_FP8_PREQUANT=1 at every M, =0 never. The bits are the same either way
    (`fp8_block_quant` makes both), so a row's result does not depend on which M took it."""
    if "DSV4_FP8_PREQUANT" in os.environ:
        return env_switch("DSV4_FP8_PREQUANT")
    return m >= PREQUANT_FROM_M


def max_split_from_env() -> int:
    """DSV4_FP8_MAX_SPLIT (default 8; 0: no cap): the most K splits the plan takes. At 8 or fewer, every FP8 linear
    of the compiled decode step has its split sum traced and fused into its consumer
    (`ops.fp8_linear.TRACED_SUM_MAX_SPLIT`): uncapped, Flash's wq_a / wkv (split 32) and the shared expert's w1 / w3
    (16) keep a `_sum_splits` launch each, 16 of a 4-layer step's 29 (bench/results/h100_s32 call C). The price:
    fewer programs (down to 64 for wkv's 8 weight tiles), which these latency-bound 1-8 MB linears did not feel.
    Measured (H100, bench/results/h100_s33 calls A and B, one card): decode bs1 / 8 / 64 1.95 / 3.55 / 8.64 ->
    1.89 / 3.34 / 8.69 ms. A function of the shape alone, as the split must be (batch invariance)."""
    value = os.environ.get("DSV4_FP8_MAX_SPLIT", "8")
    if not value.isdigit():
        raise ValueError(f"DSV4_FP8_MAX_SPLIT must be a non-negative integer, got {value!r}")
    return int(value)


def fp8_linear_small_m(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant_on: bool,
                       out_dtype: torch.dtype | None = None, block_n: int = 64, split_k: int | None = None,
                       programs_per_sm: int = 4, num_warps: int = 4, num_stages: int = 3, block_m: int = BLOCK_M,
                       partials: bool = False, prequant: bool | None = None, groups: int = 1) -> torch.Tensor:
    """`ops.ref.linear(x, weight, scale, "fp8", act_quant_on)` for x [..., K] (bf16 / fp32), weight float8_e4m3fn
    [N, K], scale e8m0 [N/128, K/128]. Output in `out_dtype` (default x's); fp32 gives the accumulator before the
    output rounding. Meant for M <= 64 (one to four 16-row blocks); split_k=None runs `programs_per_sm` programs per
    SM per 16-row block (the weight bytes in flight that HBM needs), see `kernel_plan`; the K splits are added in
    split order by a second kernel (`_sum_splits`; adding them inside the GEMM kernel instead, one launch fewer,
    measured nothing twice: bench/NOTES.md, sixth and thirtieth sessions). `block_m` other than 16 gives up batch
    invariance (the micro-benchmark's sweep prices it). `partials`: return the fp32 partial sums
    [split, M, N] unsummed (the caller adds them in split order: `ops.fp8_linear`). `prequant` (None:
    `prequant_from_env(M)`: from 33 rows; act quant on only): x quantised once by `act_quant_fp8` (one
    launch), the kernel reading its codes and scales, where otherwise every program of the grid (N / block_n x split
    of them) quantises its x blocks again, ~25 instructions an element; the same codes and scales
    (`fp8_block_quant` in both), so bit for bit the same result. `groups` > 1 (act quant off): the block-diagonal
    product (`ops.block_diag_linear`): x [..., G * K], weight [G * R, K] in G blocks of R rows (R a multiple of
    `block_n`), out [..., G * R], group g's rows multiplying x[..., g*K:(g+1)*K]; the same tiles, split and sums as
    one group."""
    check_fp8_weight(x, weight, scale, block_n, groups)
    if groups > 1 and act_quant_on:
        raise ValueError("fp8 linear: groups > 1 takes bf16 x (act quant off)")
    K, N = x.shape[-1] // groups, weight.shape[0]
    flat = x.reshape(-1, K * groups).contiguous()
    M = flat.shape[0]
    split, grid = kernel_plan(M, N, K, x.device, block_n, block_m, split_k, programs_per_sm)
    out, part = split_outputs(split, M, N, out_dtype or x.dtype, x.device, partials)
    if M:
        pre = act_quant_on and (prequant_from_env(M) if prequant is None else prequant)
        xs = None
        if pre:
            from dsv4.ops.triton.quant import act_quant_fp8

            codes, xs = act_quant_fp8(flat)
            flat, xs = codes.view(torch.uint8), xs.t()          # scales: the [K/128, M] buffer behind the view
        _fp8_linear_small_m[grid](flat, weight.view(torch.uint8), scale.view(torch.uint8), part, M, N, K,
                                  K // 128 // split, ACT_QUANT=act_quant_on, HW_FP8=x.is_cuda, BLOCK_N=block_n,
                                  BLOCK_M=block_m, xs_ptr=xs, PREQUANT=pre, GROUPED=groups > 1,
                                  X_STRIDE=K * groups, GROUP_N=N // groups, num_warps=num_warps, num_stages=num_stages)
        add_splits(part, out)
    return out if partials else out.view(*x.shape[:-1], N)
