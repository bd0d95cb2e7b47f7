"""mHC split + Sinkhorn as a dispatched op: the plain definition is `ops.ref.hc_split_sinkhorn`; on CUDA one
Triton kernel does the whole 4x4 Sinkhorn per token in registers (`ops/triton/sinkhorn.py`); under autograd
(training) the Sinkhorn iterations are one autograd function with a hand-written backward (`SinkhornNorm`), and
on CUDA the Triton forward with a Triton backward (`_TritonSinkhorn`, checked in the interpreter on CPU)."""

from __future__ import annotations

import torch

from dsv4.ops.ref import hc_split, sinkhorn_dims
from dsv4.ops.ref import hc_split_sinkhorn as _twin
from dsv4.ops.registry import custom_op, dispatch, register, register_triton

hc_split_sinkhorn = dispatch("hc_split_sinkhorn", _twin)


class SinkhornNorm(torch.autograd.Function):
    """`ops.ref.sinkhorn` with its backward written out. Autograd's backward of each step c' = c / (sum(c) + eps)
    runs ~9 ops (both operands of the division, the broadcast sum, the accumulation); the closed form
    dL/dc = (g - sum(g * c')) / d runs 4, over ~40 steps per mHC call (~14 calls a step: ~3k ops fewer).
    The forward is the twin's, bit for bit; the gradient is equal in exact arithmetic and differs by fp32
    roundings (it multiplies by the rounded c' where autograd divides by d twice)."""

    @staticmethod
    def forward(ctx, comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        ctx.dims, saved = sinkhorn_dims(iters), []
        for dim in ctx.dims:
            d = comb.sum(dim=dim, keepdim=True) + eps
            comb = comb / d
            saved += [comb, d]
        ctx.save_for_backward(*saved)
        return comb

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        for i in reversed(range(len(ctx.dims))):
            out, d = saved[2 * i], saved[2 * i + 1]
            grad = (grad - (grad * out).sum(dim=ctx.dims[i], keepdim=True)) / d
        return grad, None, None


def _grad_applies(mixes, scale, base, hc, iters, eps) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (mixes, scale, base))


def _with_sinkhorn_backward(mixes, scale, base, hc, iters, eps):
    pre, post, comb = hc_split(mixes, scale, base, hc, eps)
    return pre, post, SinkhornNorm.apply(comb, iters, eps)


class _TritonSinkhorn(torch.autograd.Function):
    """The Triton kernel's forward (one launch) with the Triton backward (one launch + ~12 small ops for the
    parameter gradients), for training on CUDA: autograd through the twin is ~570 ops per call (forward and
    backward), through `SinkhornNorm` ~340."""

    @staticmethod
    def forward(ctx, mixes, scale, base, hc: int, iters: int, eps: float):
        from dsv4.ops.triton.sinkhorn import hc_split_sinkhorn as kernel

        ctx.save_for_backward(mixes, scale, base)
        ctx.args = (hc, iters, eps)
        return kernel(mixes, scale, base, hc, iters, eps)

    @staticmethod
    def backward(ctx, grad_pre, grad_post, grad_comb):
        from dsv4.ops.triton.sinkhorn import hc_split_sinkhorn_backward

        grads = hc_split_sinkhorn_backward(*ctx.saved_tensors, grad_pre, grad_post, grad_comb, *ctx.args)
        return (*grads, None, None, None)


def _triton_grad_applies(mixes, scale, base, hc, iters, eps) -> bool:
    # Not inside a compiled training step (train/compiled.py): Dynamo would have to trace the kernels' launchers
    # (not custom ops), while the closed form below is plain PyTorch that inductor fuses into a few kernels, and is
    # what the CPU tests trace.
    return (_grad_applies(mixes, scale, base, hc, iters, eps) and mixes.is_cuda and mixes.dtype == torch.float32
            and scale.dtype == base.dtype == torch.float32 and hc & (hc - 1) == 0
            and not torch.compiler.is_compiling())


# First: on CUDA the Triton pair takes the training calls, elsewhere the closed-form backward in PyTorch.
register_triton("hc_split_sinkhorn", "triton_sinkhorn_train", _triton_grad_applies, _TritonSinkhorn.apply)
register("hc_split_sinkhorn", "sinkhorn_backward", _grad_applies, _with_sinkhorn_backward)


def _applies(mixes, scale, base, hc, iters, eps) -> bool:
    return mixes.is_cuda and mixes.dtype == torch.float32 and hc & (hc - 1) == 0 and not torch.is_grad_enabled()


def _shapes(mixes, scale, base, hc, iters, eps):
    lead = mixes.shape[:-1]
    return mixes.new_empty(*lead, hc), mixes.new_empty(*lead, hc), mixes.new_empty(*lead, hc, hc)


@custom_op("hc_split_sinkhorn", _shapes)
def _kernel(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dsv4.ops.triton.sinkhorn import hc_split_sinkhorn as kernel

    return kernel(mixes, scale, base, hc, iters, eps)


register_triton("hc_split_sinkhorn", "triton_sinkhorn", _applies, _kernel)
