"""Fast `linear` for FP8 weights on CUDA, reading the stored e4m3 bytes and e8m0 scales: no weight copies.

* Small M (decode, <= SMALL_M rows): the Triton kernel `ops/triton/fp8_linear.py` (weight tiles straight into
  the FP8 MMA, act quant fused, split-K).
* Larger M (prefill) with the act-quant emulation on: x quantised to FP8 per 128 (`act_quant_fp8`, bit-identical
  to `dsv4.quant.act_quant`), then cuBLAS's blockwise-scaled FP8 GEMM through `torch.nn.functional.scaled_mm`
  (1x128 activation scales x 128x128 weight scales, fp32 accumulation): the reference's arithmetic, FP8 x FP8.
* Larger M with the emulation off (bf16 activations): the weight is decoded to bf16 for that call only
  (transient, freed after the GEMM), as the twin does; nothing is kept.

Replaces the cached bf16 copies of v1-v7 (`cached_linear.py`, removed), which held 2x every FP8 weight.
Precision class: bf16 output (the twin rounds its fp32 product to bf16 as well).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.ops.ref import dequant_weight
from dsv4.ops.registry import custom_op, env_switch, register_triton
from dsv4.ops.split_sum import sum_splits

# At most this many rows take the Triton kernel (batch-invariant up to here: `kernel_plan`). NOTE: above it cuBLAS
# computes the rows, other bits than the kernel's: a row's result changes when its call crosses 64 rows.
SMALL_M = 64
ROW_ALIGN = 16               # scaled_mm gets its rows padded to a multiple of this


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def scaled_mm_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """act_quant(x) @ W^T by cuBLAS's blockwise FP8 GEMM; x [..., K] bf16, out bf16."""
    from dsv4.ops.triton.quant import act_quant_fp8, e8m0_to_float

    flat = x.reshape(-1, x.shape[-1])
    m = flat.shape[0]
    if m % ROW_ALIGN:                      # whole 16-row tiles for cuBLAS's blockwise kernels (zero rows: cheap)
        flat = F.pad(flat, (0, 0, 0, ROW_ALIGN - m % ROW_ALIGN))
    q, s = act_quant_fp8(flat)
    y = F.scaled_mm(q, weight.t(), s, F.ScalingType.BlockWise1x128, e8m0_to_float(scale).t(),
                    F.ScalingType.BlockWise128x128, output_dtype=x.dtype)
    return y[:m].view(*x.shape[:-1], weight.shape[0])


@custom_op("fp8_stored_linear", lambda x, weight, scale, act_quant_on: x.new_empty(*x.shape[:-1], weight.shape[0]))
def _fp8_stored_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       act_quant_on: bool) -> torch.Tensor:
    if _rows(x) <= SMALL_M:
        from dsv4.ops.triton.fp8_linear import fp8_linear_small_m

        return fp8_linear_small_m(x, weight, scale, act_quant_on)
    if act_quant_on and _scaled_mm_fits(weight):
        return scaled_mm_fp8(x, weight, scale)
    # NOTE: emulation on with an odd shape: the twin's arithmetic (act_quant, then the bf16 decode) via ops.ref.
    if act_quant_on:
        from dsv4.ops.ref import linear as ref_linear

        return ref_linear(x, weight, scale, "fp8", True)
    return F.linear(x, dequant_weight(weight, scale, "fp8").to(x.dtype))


def _scaled_mm_fits(weight: torch.Tensor) -> bool:
    """cuBLAS's 128x128 weight scales must come in whole groups of 4 blocks (torch 2.11 on the H200 rejected
    a [256, 256] weight: "scale_b must have shape 4 x 2"); smaller or odd shapes take the per-call bf16 decode."""
    return weight.shape[0] % 512 == 0 and weight.shape[1] % 512 == 0


# The split-K partials' sum traced with the caller (DSV4_FP8_SUM_TRACED, on unless 0), up to this many splits:
# inductor unrolls a reduction of at most `unroll_reductions_threshold` (8) elements into pointwise adds, which fuse
# into the consumer (RMSNorm, SwiGLU, the residual); a longer one would be a reduction kernel of its own, no launch
# saved. Measured (H100, bench/results/h100_s32 calls A and B, same card): decode bs1 / 8 / 64 1.73 / 3.04 / 7.67 ->
# 1.71 / 3.01 / 7.56 ms (13 of the step's 29 `_sum_splits` launches fused away); bit for bit the kernel's sum.
TRACED_SUM_MAX_SPLIT = 8


def _small_m_split(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> int:
    from dsv4.ops.triton.fp8_linear import kernel_plan

    return kernel_plan(_rows(x), weight.shape[0], x.shape[-1] // groups, x.device)[0]


@custom_op("fp8_small_m_partials", lambda x, weight, scale, act_quant_on, groups=1: x.new_empty(
    _small_m_split(x, weight, groups), _rows(x), weight.shape[0], dtype=torch.float32))
def _fp8_small_m_partials(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                          act_quant_on: bool, groups: int = 1) -> torch.Tensor:
    """The small-M kernel's fp32 split-K partials [split, M, N], unsummed (x [..., groups * K])."""
    from dsv4.ops.triton.fp8_linear import fp8_linear_small_m

    return fp8_linear_small_m(x, weight, scale, act_quant_on, partials=True, groups=groups)


def _traced_sum(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> bool:
    """Under torch.compile at decode sizes: add the K splits in the traced graph instead of `_sum_splits`'s second
    launch (one launch fewer per linear in the captured step). The adds run in split order, as `_sum_splits`'s do,
    and round once: bit for bit the kernel's sum. Only while compiling: eagerly they would be split - 1 launches.
    x [..., groups * K] (`ops.block_diag_linear` passes its groups; the plain linear one)."""
    return (torch.compiler.is_compiling() and _rows(x) <= SMALL_M
            and env_switch("DSV4_FP8_SUM_TRACED", default=True)
            and 1 < _small_m_split(x, weight, groups) <= TRACED_SUM_MAX_SPLIT)


def small_m_traced(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant_on: bool,
                   groups: int = 1) -> torch.Tensor:
    """The small-M kernel's result [..., N] for x [..., groups * K] with its K splits added in the traced graph
    (where `_traced_sum` says so)."""
    part = _fp8_small_m_partials(x, weight, scale, act_quant_on, groups)
    return sum_splits(part).to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def fp8_stored_linear(x, weight, scale, fmt, act_quant_on, dequantized=None) -> torch.Tensor:
    """Same contract as `ops.ref.linear`."""
    if _traced_sum(x, weight):
        return small_m_traced(x, weight, scale, act_quant_on)
    return _fp8_stored_linear(x, weight, scale, act_quant_on)


def _applies(x, weight, scale, fmt, act_quant_on, dequantized=None) -> bool:
    return (fmt == "fp8" and x.is_cuda and x.dtype == torch.bfloat16 and dequantized is None
            and not torch.is_grad_enabled() and weight.shape[0] % 128 == 0 and weight.shape[1] % 128 == 0
            and weight.is_contiguous() and scale.is_contiguous())


register_triton("linear", "fp8_stored_linear", _applies, fp8_stored_linear)
