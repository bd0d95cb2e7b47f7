"""The block-diagonal linear as a dispatched op: attention's grouped `wo_a` (spec §3.4), held as stored.

`block_diag_linear(x [..., G, K], W [G*R, K], scale, fmt)` -> [..., G, R]. The checkpoint stores wo_a FP8 with
128x128 e8m0 scales; the reference dequantises it to bf16 at conversion and runs a bf16 einsum without quantising
its input. We keep the FP8 bytes (one copy, half the bf16 bytes): an e4m3 value times a power-of-two scale is exact
in bf16, so decoding per call multiplies the same weight values. The twin (`ops/ref.py`) decodes the whole weight
and runs the einsum; the fast path on CUDA (bf16 x, inference):
* Small M (decode, <= SMALL_M rows): the small-M FP8 kernel (`ops/triton/fp8_linear.py`) with its act-quant-off
  branch (x bf16, the weight bytes converted to bf16 exactly, each 128-K block's sum times its scale) and `groups`:
  each weight tile reads its group's K columns of x [M, G*K]. Its split-K sum is `ops/fp8_linear.py`'s (the traced
  sum under torch.compile included): the same machinery as the plain FP8 linear. Batch-invariant like it.
* Larger M (prefill): the weight decoded to bf16 for that call only (transient, `decode_bf16`: the twin's values
  without its fp32 copy) and the twin's einsum: the twin's bits.
Why: at decode the bf16 einsum read Flash's wo_a (G=8, R=1024, K=4096) as 67 MB a layer; FP8 is 34 MB.
Precision class: bf16 output, as `ops/fp8_linear.py`'s (the kernel's bf16 dot sums in fp32 per 128 block and adds
the blocks in fp32; the twin's bf16 einsum is cuBLAS's order): relative error <= 1e-2 of the output against the twin.
"""

from __future__ import annotations

import torch

from dsv4.ops import ref
from dsv4.ops.fp8_linear import SMALL_M, _rows, _traced_sum, small_m_traced
from dsv4.ops.registry import custom_op, dispatch, register_triton
from dsv4.quant import e8m0_to_float

block_diag_linear = dispatch("block_diag_linear", ref.block_diag_linear)

BLOCK_N = 64            # the kernel's weight tile: a group's rows must come in whole tiles


def decode_bf16(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 [N, K] with e8m0 scales [N/128, K/128] -> bf16 [N, K], the values of `dequant_weight(...).bfloat16()`
    bit for bit (e4m3 -> bf16 is exact, and so is the product by a power of two: bf16 arithmetic computes it in
    fp32 and rounds once). On CUDA one Triton launch building the bits (`ops/triton/fp8_dequant.py`: 3 bytes moved
    per weight); the twin below is torch's form (one bf16 buffer scaled in place, ~7 bytes a weight: measured
    ~240 us for Flash's wo_a on the H100, 7x its bytes' time)."""
    if weight.is_cuda:
        from dsv4.ops.triton.fp8_dequant import dequant_fp8_bf16

        return dequant_fp8_bf16(weight, scale)
    return decode_bf16_twin(weight, scale)


def decode_bf16_twin(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`decode_bf16` in torch ops."""
    n, k = weight.shape
    w = weight.to(torch.bfloat16)
    s = e8m0_to_float(scale).to(torch.bfloat16)                 # powers of two: exact
    w.view(n // 128, 128, k // 128, 128).mul_(s[:, None, :, None])
    return w


@custom_op("fp8_block_diag_linear", lambda x, weight, scale, groups: x.new_empty(*x.shape[:-1], weight.shape[0]))
def _fp8_block_diag(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int) -> torch.Tensor:
    """x [..., groups * K] -> [..., groups * R]."""
    if _rows(x) <= SMALL_M:
        from dsv4.ops.triton.fp8_linear import fp8_linear_small_m

        return fp8_linear_small_m(x, weight, scale, False, groups=groups)
    wide = decode_bf16(weight, scale)                                       # transient, this call only
    return ref.block_diag_linear(x.unflatten(-1, (groups, -1)), wide, None, "plain").flatten(-2)


def fp8_block_diag_linear(x, weight, scale, fmt, dequantized=None) -> torch.Tensor:
    """Same contract as `ops.ref.block_diag_linear`."""
    groups = x.shape[-2]
    flat = x.flatten(-2)                                            # [..., G * K]
    if _traced_sum(flat, weight, groups):
        y = small_m_traced(flat, weight, scale, False, groups)
    else:
        y = _fp8_block_diag(flat, weight, scale, groups)
    return y.unflatten(-1, (groups, -1))


def _applies(x, weight, scale, fmt, dequantized=None) -> bool:
    groups, n = x.shape[-2], weight.shape[0]
    return (fmt == "fp8" and x.is_cuda and x.dtype == torch.bfloat16 and dequantized is None
            and not torch.is_grad_enabled() and x.shape[-1] == weight.shape[1] and n % groups == 0
            and n // groups % BLOCK_N == 0 and n % 128 == 0 and weight.shape[1] % 128 == 0
            and weight.is_contiguous() and scale.is_contiguous())


register_triton("block_diag_linear", "fp8_block_diag_linear", _applies, fp8_block_diag_linear)
