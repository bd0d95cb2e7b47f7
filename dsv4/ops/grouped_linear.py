"""Routed experts over rows sorted by expert: fixed shapes, no host synchronisation (CUDA-graph capturable).

`grouped_linear(x, eid, weight, scale, fmt)` = x[m] @ W[eid[m]]^T, the same product as `pair_linear`, for rows
sorted by expert (decode at larger batch, prefill). The twin is `pair_linear`'s (gather + dequantise per row),
run over fixed-size row chunks so its gathered weights stay bounded; the Triton kernel
(`ops/triton/fp4_grouped.py`) reads each expert's FP4 weights about once per row block it appears in instead of
once per row; from one row per expert on average (decode at batch >= 43 with top-6 of 256, prefill), the
expert-major kernel (`ops/triton/fp4_grouped_prefill.py`) decodes each weight tile once per 64-128 rows of its
expert instead (below 96 rows per expert with its operands swapped: `ops/triton/fp4_grouped_swapped.py`), and from
16 rows per expert with bf16 x (prefill) the bf16-decode kernel (`ops/triton/fp4_grouped_direct.py`) takes the
call: weights decoded with their scale, one accumulator, token tiles up to 256, so each weight tile is decoded about
once per expert (H100, K 4096 -> N 2048, 256 experts: 1k 1363 -> 938 us, 8k 5135 -> 3175 us a call; `direct_tiles`).
All are bound by the FP4 decode arithmetic, not by bytes, so the one that decodes fewer tiles wins.
Measured on an H200 at the bench model's shapes (`scripts/bench/grouped_prefill.py`,
bench/results/h200_grouped_prefill.log; K 4096 -> N 2048, 256 experts): 6144 rows (1k-token prefill) 4.66 -> 2.09
ms, 49152 rows (8k) 27.6 -> 5.40 ms; at 384 rows (decode batch 64) see h200_grouped_decode.log.
Layouts (`x_korder`, `out_korder`, `out_dtype`, `out_index`; `dsv4.ops.korder`): the MoE's sorted path carries its
activations in the kernels' K order and has w2 write bf16 rows straight to token-pair order where the direct kernel
runs (`korder_pays`), which does all of it in its loads and stores; every other implementation (the twin included)
applies them around the plain product, so every path gives the same result for the same layouts.
`fp8_grid=True` is the caller's word that x is on the FP8 grid per 128-K block (the MoE's act-quant emulation):
the product is the same, but then the expert-major kernel may run the reference's own FP8 x FP8 arithmetic on
the tensor cores (`ops/triton/fp4_prefill_fp8mma.py`), opt-in with DSV4_FP4_FP8MMA=1 until measured; with
`decode_sized=True` as well (the step has at most `moe_pairs.DECODE_KERNEL_MAX_TOKENS` tokens) the split-K FP8-MMA
decode kernel takes the call (`moe_pairs.decode_fp8mma_plan`, DSV4_FP4_DECODE_MMA).
"""

from __future__ import annotations

import math
import os

import torch

from dsv4.ops.fp4_layout import out_features
from dsv4.ops.korder import check_layout, from_korder, to_korder
from dsv4.ops.moe_pairs import _fp4_decode_fp8mma, _pair_linear_twin, decode_fp8mma_plan
from dsv4.ops.registry import custom_op, dispatch, env_switch, fast_enabled, register_triton
from dsv4.ops.split_sum import sum_splits

_TWIN_CHUNK = 32                 # rows per gather: 32 dequantised [N, K] matrices at a time


def _grouped_linear_twin(x: torch.Tensor, eid: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                         fmt: str, fp8_grid: bool = False, x_korder: bool = False, out_korder: bool = False,
                         out_dtype: torch.dtype = torch.float32, out_index: torch.Tensor | None = None,
                         decode_sized: bool = False) -> torch.Tensor:
    """x [M, K], eid [M] -> [M, N] (float64 accumulation for fp32 inputs, like `pair_linear`; fp32 result unless
    `out_dtype`); `fp8_grid` and `decode_sized` change nothing here (see the module docstring). The layouts
    (`x_korder`, `out_korder`, `out_index`: see `fp4_grouped_gemm_direct`) are applied around the plain product: x
    back to element order, the result permuted and scattered after."""
    check_layout("grouped_linear", x.shape[0], out_features(weight), out_korder, out_dtype, out_index)
    if x.shape[0] == 0:
        return x.new_zeros(0, out_features(weight), dtype=out_dtype)
    x = from_korder(x) if x_korder else x
    y = torch.cat([_pair_linear_twin(x[i:i + _TWIN_CHUNK], eid[i:i + _TWIN_CHUNK], weight, scale, fmt)
                   for i in range(0, x.shape[0], _TWIN_CHUNK)])
    return with_layout(y, out_korder, out_dtype, out_index)


def with_layout(y: torch.Tensor, out_korder: bool, out_dtype: torch.dtype, out_index: torch.Tensor | None):
    """y [M, N] in element order and sorted rows -> the output layout asked (what the direct kernel writes)."""
    y = (to_korder(y) if out_korder else y).to(out_dtype)
    return y if out_index is None else torch.empty_like(y).index_copy_(0, out_index.long(), y)


grouped_linear = dispatch("grouped_linear", _grouped_linear_twin)


def _fp4_applies(x, eid, weight, scale, fmt, fp8_grid=False, decode_sized=False, **layout) -> bool:
    return (fmt == "fp4" and x.is_cuda and x.shape[1] % 128 == 0 and not torch.is_grad_enabled()
            and x.dtype in (torch.bfloat16, torch.float32))


_EXPERT_MAJOR_FROM = 1           # mean rows per expert from which the expert-major kernel runs
# Below this many rows per expert the expert-major kernel takes the packed decode and its 16-row tiles by default:
# measured on the H200 (bench/results/h200_s6_switches, one switch per run), decode batch 64 (1.5 rows per expert)
# 21.0-21.4 -> 10.05 ms a step; within 1e-5 of the default kernel and of the twin (its GPU test). From 16 rows on the
# packed decode stays opt-in (DSV4_FP4_PACKED=1): at 8k prefill it measured slower (241.6 vs 222.9 ms).
_PACKED_BELOW = 16


def _fp4_kernel(x, eid, weight, scale, fmt, fp8_grid=False, x_korder=False, out_korder=False,
                out_dtype=torch.float32, out_index=None, decode_sized=False):
    check_layout("grouped_linear", x.shape[0], out_features(weight), out_korder, out_dtype, out_index)
    # decode batches and short prefill steps, by the step's tokens (`moe_pairs.DECODE_KERNEL_MAX_TOKENS`), never by
    # this call's rows: a step and its padded bucket must take the same kernel class
    plan = decode_fp8mma_plan(x, weight, fp8_grid) if decode_sized else None
    if plan is not None:
        from dsv4.ops.triton.fp4_grouped_prefill import expert_offsets

        xe = from_korder(x) if x_korder else x.contiguous()
        offs = expert_offsets(eid, weight.shape[0])
        # the partials' sum and the layouts are traced with the caller: under compile they fuse into the consumer
        part = _fp4_decode_fp8mma(xe, eid, weight, scale, offs, *plan)
        return with_layout(sum_splits(part), out_korder, out_dtype, out_index)
    if x.shape[0] >= _EXPERT_MAJOR_FROM * weight.shape[0]:
        return _fp4_grouped_gemm_prefill(x.contiguous(), eid, weight, scale, fp8_grid, x_korder, out_korder,
                                         out_dtype, out_index)
    y = _fp4_grouped_gemm(from_korder(x) if x_korder else x.contiguous(), eid, weight, scale)
    return with_layout(y, out_korder, out_dtype, out_index)


@custom_op("fp4_grouped_gemm", lambda x, eid, weight, scale: x.new_empty(x.shape[0], out_features(weight),
                                                                         dtype=torch.float32))
def _fp4_grouped_gemm(x: torch.Tensor, eid: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from dsv4.ops.triton.fp4_grouped import fp4_grouped_gemm

    return fp4_grouped_gemm(x, eid, weight, scale)


def _prefill_fake(x, eid, weight, scale, fp8_grid, x_korder=False, out_korder=False, out_dtype=torch.float32,
                  out_index=None):
    return x.new_empty(x.shape[0], out_features(weight), dtype=out_dtype)


@custom_op("fp4_grouped_gemm_prefill", _prefill_fake)
def _fp4_grouped_gemm_prefill(x: torch.Tensor, eid: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                              fp8_grid: bool, x_korder: bool = False, out_korder: bool = False,
                              out_dtype: torch.dtype = torch.float32,
                              out_index: torch.Tensor | None = None) -> torch.Tensor:
    """The kernels from one row per expert. The direct kernel writes the layouts itself; the others compute in
    element order and sorted rows, and the layouts are applied around them (correct, not fast: the MoE asks for
    K order only where the direct kernel runs, `korder_pays`)."""
    from dsv4.ops.triton.fp4_decode import packed_from_env
    from dsv4.ops.triton.fp4_grouped_prefill import fp4_grouped_gemm_prefill

    tiles = direct_tiles(x.shape[0], weight.shape[0]) if _direct_enabled(x.dtype, fp8_grid) else None
    if tiles is not None and weight.data_ptr() % 4 == 0:
        from dsv4.ops.triton.fp4_grouped_direct import fp4_grouped_gemm_direct

        return fp4_grouped_gemm_direct(x, eid, weight, scale, block_m=tiles[0], block_n=tiles[1],
                                       num_warps=tiles[2], num_stages=tiles[3], xperm=tiles[4], x_korder=x_korder,
                                       out_korder=out_korder, out_dtype=out_dtype, out_index=out_index,
                                       unroll=unroll_from_env(x.shape[1]))
    x = from_korder(x) if x_korder else x
    if fp8mma_applies(fp8_grid):
        block_m, block_n, warps, maxnreg = fp8mma_tiles(x.shape[0], weight.shape[0])
        y = fp4_grouped_gemm_prefill(x, eid, weight, scale, block_m=block_m, block_n=block_n, num_warps=warps,
                                     fp8mma=True, maxnreg=maxnreg)
        return with_layout(y, out_korder, out_dtype, out_index)
    tiles = swapped_tiles(x.shape[0], weight.shape[0])
    if tiles is not None and env_switch("DSV4_FP4_SWAPPED", default=True):
        from dsv4.ops.triton.fp4_grouped_swapped import fp4_grouped_gemm_swapped

        y = fp4_grouped_gemm_swapped(x, eid, weight, scale, block_m=tiles[0], block_n=tiles[1],
                                     num_warps=tiles[2], korder=weight.data_ptr() % 4 == 0,  # int32 reads
                                     unroll=unroll_from_env(x.shape[1]))
        return with_layout(y, out_korder, out_dtype, out_index)
    packed = packed_from_env() or x.shape[0] < _PACKED_BELOW * weight.shape[0]
    block_m, block_n, warps = expert_major_tiles(x.shape[0], weight.shape[0], packed)
    y = fp4_grouped_gemm_prefill(x, eid, weight, scale, block_m=block_m, block_n=block_n, num_warps=warps,
                                 packed=packed)
    return with_layout(y, out_korder, out_dtype, out_index)


def unroll_from_env(k: int) -> int:
    """128-K blocks per loop step of the direct and swapped kernels (their `unroll`): DSV4_FP4_UNROLL (1, 2, 4 or
    8; unset: 1, the measured default), capped by what divides K / 128 (tiny models). The same sums in the same
    order whatever it is; the switch is there to measure it in the bench (bench/NOTES.md, thirtieth session)."""
    value = os.environ.get("DSV4_FP4_UNROLL", "1")
    if value not in ("1", "2", "4", "8"):
        raise ValueError(f"DSV4_FP4_UNROLL must be 1, 2, 4 or 8, got {value!r}")
    return math.gcd(int(value), max(1, k // 128))


def _direct_enabled(dtype: torch.dtype, fp8_grid: bool) -> bool:
    """May the direct kernel take an FP4 call from `DIRECT_FROM` rows per expert (bf16 x, DSV4_FP4_DIRECT on, not
    the opt-in FP8-MMA variant)?"""
    return (dtype == torch.bfloat16 and not fp8mma_applies(fp8_grid)
            and env_switch("DSV4_FP4_DIRECT", default=DIRECT_DEFAULT))


def korder_pays(rows: int, x: torch.Tensor, weight: torch.Tensor, fmt: str, fp8_grid: bool) -> bool:
    """Should the MoE carry its activations in K order (`dsv4.ops.korder`) through `grouped_linear` calls of `rows`
    rows with these operands (x: the un-gathered input; weight [E, N, K/2] the first matrix's stack)? Yes where the
    direct kernel takes them: it reads and writes K order for free, and every K-ordered copy it saves is an
    [rows, K] pass (8k prefill at Flash: ~0.6 ms a w1 / w3 call, ~7 ms a step). Elsewhere the layouts would cost
    copies, so no. DSV4_MOE_KORDER=0 turns it off (the A/B switch). (The weight's alignment is not checked: a data
    pointer cannot be read under tracing, and a misaligned stack only makes the call take the other kernels, still
    exact.)"""
    n = out_features(weight)
    # the row count last: under compile with dynamic shapes it is the one guard this adds
    return (fmt == "fp4" and x.is_cuda and not torch.is_grad_enabled() and x.shape[-1] % 128 == 0 and n % 128 == 0
            and fast_enabled("grouped_linear") and _direct_enabled(x.dtype, fp8_grid)
            and env_switch("DSV4_MOE_KORDER", default=True)
            and rows >= DIRECT_FROM * weight.shape[0])


def expert_major_tiles(rows: int, experts: int, packed: bool) -> tuple[int, int, int]:
    """(block_m, block_n, num_warps) of the expert-major kernel. Default decode: the fastest measured tiles, 64 x 64
    at 1.5 and 24 rows per expert, 128 x 128 at 192 (h200_grouped_prefill.log, h200_grouped_decode.log). Packed
    decode: below 16 rows per expert, 16 x 64 with 4 warps, its fewest instructions per weight
    element offline (5.8 against 9.3 at 64 x 64), since a 64-row tile is mostly empty there; on by default there
    (`_PACKED_BELOW`), measured."""
    if rows >= 96 * experts:
        return 128, 128, 8
    if packed and rows < 16 * experts:
        return 16, 64, 4
    return 64, 64, 8


def swapped_tiles(rows: int, experts: int) -> tuple[int, int, int] | None:
    """(block_m, block_n, num_warps) of the swapped-operand kernel (`ops/triton/fp4_grouped_swapped.py`, K-ordered),
    or None where the expert-major kernel runs instead. On by default below 96 rows per expert (DSV4_FP4_SWAPPED=0
    turns it off). Measured on the H200 (2026-12-05, bench/results/h200_s16_checks/grouped_swapped.log, graph
    replays, Flash K 4096 -> N 2048, 256 experts): decode batch 64 (1.5 rows per expert) 648 -> 575 us with 16
    tokens x 64 weight rows, 4 warps; 1k prefill (24 rows per expert) 1921 -> 1335 us with 32 x 64, 4 warps (32 x
    128 with 8 warps: 1301, within noise); in the bench, bs64 decode 10.08 -> 9.08 ms, 1k prefill 53.8 -> 39.3 ms.
    At 8k prefill (192 rows per expert) the 128 x 128 expert-major tiles stay: 5225 us against 7859 at best."""
    if rows >= 96 * experts:
        return None
    return (16, 64, 4) if rows < 16 * experts else (32, 64, 4)


DIRECT_DEFAULT = True             # DSV4_FP4_DIRECT's default (read at each call)
DIRECT_FROM = 16                  # rows per expert from which the direct kernel runs (`direct_tiles`)


def direct_tiles(rows: int, experts: int) -> tuple[int, int, int, int, bool] | None:
    """(block_m, block_n, num_warps, num_stages, xperm) of the bf16-decode kernel (`ops/triton/fp4_grouped_direct.py`),
    or None below 16 rows per expert (decode batches: the swapped kernel's regime, 581 against 620 us at batch 64).
    The token tile (wgmma's N) is the power of two that holds ~1.25x the mean rows per expert, so most experts take
    one tile and each weight tile is decoded about once: 32 at 1k prefill (24 rows per expert at Flash), 256 at 8k
    (192). Measured on an H100 (bench/results/h100_s27/call_a, graph replays, K 4096 -> N 2048, 256 experts): 1k
    1363 -> 971 us (32 x 64, 4 warps; 1283-2542 for the other tiles), 8k 5135 -> 3123 us (256 x 128, 8 warps, 3
    stages; 2 stages 3703, 128 x 128 3507), both including x's K-ordered copy (79 / 612 us alone). Narrow tiles
    permute x in the kernel instead (`xperm`: offline the same instructions per weight at 32 x 64; call_b on another
    H100: 938 against 986 us with the copy at 1k; at 128 x 128 it costs more than the copy, 3907 against 3442 at
    8k)."""
    if rows < DIRECT_FROM * experts:
        return None
    mean = rows / experts
    block_m = min(256, 1 << max(4, int(1.25 * mean - 1).bit_length()))
    if block_m == 256:
        return 256, 128, 8, 3, False
    return (block_m, 128, 8, 3, False) if block_m == 128 else (block_m, 64, 4, 3, True)


def fp8mma_applies(fp8_grid: bool) -> bool:
    """The FP8-MMA variant runs only for x on the FP8 grid (there it is exact products) and when opted in:
    DSV4_FP4_FP8MMA=1 (read at each call, like DSV4_FP4_PACKED; unset or 0: off)."""
    return fp8_grid and env_switch("DSV4_FP4_FP8MMA")


def fp8mma_tiles(rows: int, experts: int) -> tuple[int, int, int, int | None]:
    """(block_m, block_n, num_warps, maxnreg) of the FP8-MMA variant: 32 tokens x 128 weight rows with 4 warps
    (fewest SASS instructions per weight element at the 1k-prefill shape offline: 3.7; an expert's 24 rows on
    average fit one row tile), registers capped at 168 (three programs per SM instead of two; the spills fall
    outside the K loop); 16 tokens below 16 rows per expert (2.9, 140 registers; decode batches). Not measured
    yet (bench/NOTES.md, "FP8-MMA expert-major prefill")."""
    return (16, 128, 4, None) if rows < 16 * experts else (32, 128, 4, 168)


register_triton("grouped_linear", "triton_fp4_grouped_gemm", _fp4_applies, _fp4_kernel)
