"""The fp32 products of upcast 16-bit activations as a dispatched op (mHC's mixes, the router, the compressors).

The reference computes `x.float() @ W^T` in fp32 for these (x a bf16 activation, W the compressors' and router's
bf16-stored weights or mHC's fp32 `fn`); on CUDA without TF32 that is cuBLAS's fp32 GEMM on the CUDA cores
(H100: ~60 TFLOP/s, 8.9 ms of an 8k Flash-width prefill, bench/results/h100_s28/call_c/profile.log). The same
product runs on the bf16 tensor cores with nothing rounded but the fp32 sums:
* a bf16 weight (the loader holds these in their checkpoint format): one bf16 GEMM with an fp32 output; each
  product of two bf16 values (8-bit significands) is exact in fp32, the sums are fp32 as before (another order);
* an fp32 weight (mHC's fn, F32 on disk): split once per call into three bf16 parts, hi + mid + lo == W exactly
  (`bf16_split`), stacked along N: one GEMM of three times the columns, whose three slices are summed in fp32. Only
  from SPLIT_MIN_ROWS rows: below it the split's launches cost more than the GEMM saves (and decode's few rows keep
  the fp32 GEMV, which reads 4 bytes a weight against the split's 6).
Precision class: an fp32 GEMM's (every product exact, fp32 accumulation; tests/test_widened_dense.py bounds the
error against float64 by the fp32 summation bound). Not bit-equal to the fp32 GEMM (another summation order).
Off with DSV4_WIDENED_DENSE=0. Inference only: where autograd records x or the weight the twin runs (the training
step's upcast is shared between products, see `model/compressor.py`). Measured (H100, bench/results/h100_s29):
compressor wkv at 8192 rows 1471 -> 95 us, mHC fn (split) 700 -> 133 us; the 8k eager prefill 123.8 -> 113.0 ms.
"""

from __future__ import annotations

import torch

from dsv4.ops import ref
from dsv4.ops.fp8_linear import TRACED_SUM_MAX_SPLIT, _small_m_split  # (the same split plan)
from dsv4.ops.registry import custom_op, dispatch, env_switch, register, register_triton, trace_constant
from dsv4.ops.split_sum import sum_splits

widened_dense = dispatch("widened_dense", ref.widened_dense)

# fp32 weights take the split from this many rows (prefill: the 1k graph bucket and up). mHC's fn at Flash width is
# [24, 16384]: at 1k rows the fp32 GEMM needs the activations widened, 67 MB written and read again (~40 us at
# 3.35 TB/s), where the split's ~8 small launches (~2-3 us each in a captured segment) and the bf16 read (34 MB)
# take ~30 us; at the 1k bucket the twin's fp32 GEMMs were 0.43 ms (8 calls, bench/results/h100_s28/call_c).
# NOTE: in an eager (uncaptured) step those launches are host time: the 1k eager step measured 31.0 ms with this path
# on, 27.5 off (bench/NOTES.md, "A regression found ..."); the engine's default captures steps of <= 2048 tokens.
SPLIT_MIN_ROWS = 1024


@trace_constant
def enabled() -> bool:
    """DSV4_WIDENED_DENSE=0 turns the tensor-core path off (read once per traced graph under torch.compile)."""
    return env_switch("DSV4_WIDENED_DENSE", default=True)


def bf16_split(weight: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] -> bf16 [3N, K], the parts hi, mid, lo stacked: hi = bf16(W), mid = bf16(W - hi),
    lo = W - hi - mid. Exact (hi + mid + lo == W) for |W| >= 2^-102 or 0: W's 24-bit significand is 8 bits in hi,
    <= 16 left after it, <= 8 after mid; below 2^-102 lo can fall among bf16's subnormals and lose bits."""
    hi = weight.bfloat16()
    rest = weight - hi.float()
    mid = rest.bfloat16()
    return torch.cat([hi, mid, (rest - mid.float()).bfloat16()])


def _fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if not (enabled() and x.is_cuda and x.dtype == torch.bfloat16 and weight.dim() == 2
            and x.shape[-1] == weight.shape[1] and not training):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return weight.dtype == torch.bfloat16 or (weight.dtype == torch.float32 and rows >= SPLIT_MIN_ROWS)


@custom_op("widened_dense", lambda x, weight: x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32))
def _tensor_cores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if weight.dtype == torch.bfloat16:
        y = torch.mm(x2, weight.t(), out_dtype=torch.float32)
    else:
        n = weight.shape[0]
        parts = torch.mm(x2, bf16_split(weight).t(), out_dtype=torch.float32)
        y = (parts[:, :n] + parts[:, n:2 * n]) + parts[:, 2 * n:]
    return y.view(*x.shape[:-1], weight.shape[0])


# Decode's few rows of a bf16 weight (the router, the compressors' pairs) on a Triton split-K kernel instead of
# cuBLAS's split-K GEMM + reduce (`ops/triton/bf16_small_m.py`). On by default (DSV4_BF16_SMALL_M=0 turns it off):
# h100_s41, decode bs1 / 8 / 64 1.443 / 2.893 / 8.201 ms against 1.461-1.464 / 2.923-2.928 / 8.213 on the same
# card, and batch invariant where cuBLAS picks its algorithm by the row count. Above SMALL_M rows (prefill) cuBLAS
# takes the call, as the FP8 small-M kernel's edge: both sides the fp32 class, not the same bits.
SMALL_M = 64


@trace_constant
def small_m_enabled() -> bool:
    """DSV4_BF16_SMALL_M=0 turns the small-M kernel off (read once per traced graph under torch.compile)."""
    return env_switch("DSV4_BF16_SMALL_M", default=True)


def _fits_small_m(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_fits(x, weight) and weight.dtype == torch.bfloat16 and small_m_enabled()
            and x.numel() // max(x.shape[-1], 1) <= SMALL_M and weight.shape[0] % 64 == 0
            and weight.shape[1] % 128 == 0)


@custom_op("bf16_small_m_partials", lambda x, weight: x.new_empty(
    _small_m_split(x, weight), x.numel() // x.shape[-1], weight.shape[0], dtype=torch.float32))
def _small_m_partials(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from dsv4.ops.triton.bf16_small_m import bf16_small_m

    return bf16_small_m(x, weight, partials=True)


@custom_op("bf16_small_m", lambda x, weight: x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32))
def _small_m_summed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from dsv4.ops.triton.bf16_small_m import bf16_small_m

    return bf16_small_m(x, weight)


def _small_m(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Compiled with 2-8 K splits: the partials, added in split order in the traced graph (fused into the consumer,
    `ops.fp8_linear.TRACED_SUM_MAX_SPLIT`); else the kernel with its split sum."""
    if torch.compiler.is_compiling() and 1 < _small_m_split(x, weight) <= TRACED_SUM_MAX_SPLIT:
        return sum_splits(_small_m_partials(x, weight)).view(*x.shape[:-1], weight.shape[0])
    return _small_m_summed(x, weight)


register_triton("widened_dense", "bf16_small_m_widened_dense", _fits_small_m, _small_m)
register("widened_dense", "tensor_core_widened_dense", _fits, _tensor_cores)
