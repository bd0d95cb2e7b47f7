"""mHC pre, post and head mixing as dispatched ops (`model/hyper.py`'s hc_pre / hc_post / hc_head).

The twins are the plain path: the fp32 RMS over the concatenated streams, the fp32 product with fn (`dense`), then
the split + Sinkhorn (the dispatched `hc_split_sinkhorn`, so its Triton forward and training backward still apply)
or the head's sigmoid, and the weighted sum of the streams. On CUDA, at inference, for at most MAX_TOKENS tokens
(decode), `ops/triton/hc_mix.py` does a call in two launches; opt-in (DSV4_HC_MIX=1: measured no faster than the
compiled decode step's fused twin). Above it (prefill chunks, not compiled) the same launches with
DSV4_HC_MIX_PREFILL=1 (opt-in: not yet measured alone).
hc_post's twin materialises the [b, s, hc, hc, D] fp32 products; on CUDA, at inference, above MAX_TOKENS tokens
(prefill), `ops/triton/hc_post.py` does it in one pass (default; DSV4_HC_POST=0 off). In eager training on CUDA with
DSV4_HC_POST_TRAIN=1 (opt-in until a training step is timed with it), the one-pass kernel and its one-pass backward
(`hc_post_train`, a custom op with autograd): the twin's autograd writes two such tensors a call (the CPU byte proxy:
~15 % of a step's traffic).
"""

from __future__ import annotations

import math

import torch

from dsv4.ops.hc import hc_split_sinkhorn
from dsv4.ops.ref import dense, mean_square, widen
from dsv4.ops.registry import custom_op, dispatch, env_switch, register_triton, trace_constant
from dsv4.ops.widened_dense import widened_dense

MAX_TOKENS = 64          # decode's largest batch: the pre / head kernel at or below it, hc_post's above


def _mixes(h: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 flattened streams [b, s, hc*D], mixes [b, s, n] = (X @ fn^T) * rsqrt(mean(X^2) + eps))."""
    x = widen(h.flatten(2))
    rsqrt = torch.rsqrt(mean_square(x) + norm_eps)
    if torch.is_grad_enabled() and h.requires_grad:     # training: x's three uses share one upcast (its gradient)
        return x, dense(x, fn, h.dtype) * rsqrt
    return x, widened_dense(h.flatten(2), fn) * rsqrt


def _pre_mix_twin(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                  norm_eps: float, hc_eps: float):
    """h [b, s, hc, D] -> (y [b, s, D] in h's dtype, pre [b, s, hc], post [b, s, hc], comb [b, s, hc, hc])."""
    x, mixes = _mixes(h, fn, norm_eps)
    pre, post, comb = hc_split_sinkhorn(mixes, scale, base, hc, iters, hc_eps)
    y = torch.sum(pre.unsqueeze(-1) * x.view(h.shape), dim=2).to(h.dtype)
    return y, pre, post, comb


def _head_mix_twin(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
                   hc_eps: float) -> torch.Tensor:
    """h [b, s, hc, D] -> y [b, s, D] with weights sigmoid(mixes * scale + base) + eps (no post / comb)."""
    x, mixes = _mixes(h, fn, norm_eps)
    pre = torch.sigmoid(mixes * scale + base) + hc_eps
    return torch.sum(pre.unsqueeze(-1) * x.view(h.shape), dim=2).to(h.dtype)


def _post_twin(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New stream k = post_k * x + sum_j comb[j, k] * residual_j, in fp32, cast to x's dtype."""
    mixed = torch.sum(comb.unsqueeze(-1) * residual.unsqueeze(-2), dim=2)   # [b, s, hc(dst), D]
    return (post.unsqueeze(-1) * x.unsqueeze(-2) + mixed).to(x.dtype)


def _post_training(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> bool:
    """An eager training call: autograd on, not inside a compiled step (inductor fuses the twin's products into
    its sum: nothing [.., hc, hc, D] in memory), no broadcasting (the backward returns gradients of these shapes)."""
    hc, dim = residual.shape[-2:]
    return (torch.is_grad_enabled() and any(t.requires_grad for t in (x, residual, post, comb))
            and not torch.compiler.is_compiling()
            and x.shape == (*residual.shape[:-2], dim) and post.shape == residual.shape[:-1]
            and comb.shape == (*residual.shape[:-1], hc))


hc_pre_mix = dispatch("hc_pre_mix", _pre_mix_twin)
hc_head_mix = dispatch("hc_head_mix", _head_mix_twin)
hc_post = dispatch("hc_post", _post_twin)


@trace_constant
def enabled() -> bool:
    """DSV4_HC_MIX=1 turns the fused kernel on: opt-in until its H200 timing is measured (read once per traced
    graph under torch.compile, like the registry's switch)."""
    return env_switch("DSV4_HC_MIX")


@trace_constant
def prefill_enabled() -> bool:
    """DSV4_HC_MIX_PREFILL=1: the same two launches above MAX_TOKENS tokens (prefill chunks), where the plain path is
    not compiled: at an 8k Flash chunk its upcast copy, products, fp32 GEMM and reductions are ~1.7 ms a call
    (bench/results/h200_s18/prefill_stacks_hc_post.log; ~13 ms of the 8 calls' 151 ms). Predicted 0.3-0.6 ms a
    call (h read twice, 134 MB of split partials written and read). Opt-in: measured alone once (H100,
    bench/results/h100_s20/s20_transient): 1k / 8k prefill 63.0 / 164.8 -> 61.1 / 162.8 ms, -2 ms, within the
    default's run-to-run spread at 8k (163.6-164.8 in three runs that day); a second A/B on one machine decides."""
    return env_switch("DSV4_HC_MIX_PREFILL")


def _fits(h: torch.Tensor, *params: torch.Tensor) -> bool:
    hc = h.shape[-2]
    tokens = h.numel() // (hc * h.shape[-1])
    return ((enabled() if tokens <= MAX_TOKENS else prefill_enabled())
            and h.is_cuda and h.dtype in (torch.bfloat16, torch.float16) and hc & (hc - 1) == 0
            and all(p.dtype == torch.float32 for p in params) and not torch.is_grad_enabled())


def _pre_shapes(h, fn, scale, base, hc, iters, norm_eps, hc_eps):
    lead = h.shape[:-2]
    f32 = dict(dtype=torch.float32)
    return (h.new_empty(*lead, h.shape[-1]), h.new_empty(*lead, hc, **f32), h.new_empty(*lead, hc, **f32),
            h.new_empty(*lead, hc, hc, **f32))


@custom_op("hc_pre_mix", _pre_shapes)
def _pre_kernel(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                norm_eps: float, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from dsv4.ops.triton.hc_mix import hc_mix

    return hc_mix(h, fn, scale, base, hc, iters, norm_eps, hc_eps)


@custom_op("hc_head_mix", lambda h, fn, scale, base, norm_eps, hc_eps: h.new_empty(*h.shape[:-2], h.shape[-1]))
def _head_kernel(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
                 hc_eps: float) -> torch.Tensor:
    from dsv4.ops.triton.hc_mix import hc_mix

    return hc_mix(h, fn, scale, base, h.shape[-2], 0, norm_eps, hc_eps, head=True)


register_triton("hc_pre_mix", "triton_hc_pre", lambda h, fn, scale, base, *rest: _fits(h, fn, scale, base),
                _pre_kernel)
register_triton("hc_head_mix", "triton_hc_head", lambda h, fn, scale, base, *rest: _fits(h, fn, scale, base),
                _head_kernel)


@trace_constant
def post_enabled() -> bool:
    """The one-pass hc_post kernel at inference (prefill), on by default; DSV4_HC_POST=0 turns it off. Measured on
    the H200 (eighteenth session, bench/results/h200_s18/): 4-layer Flash 8k prefill 204 -> 151 ms of kernel time,
    its 8 calls 1.2 ms. Read once per traced graph under torch.compile."""
    return env_switch("DSV4_HC_POST", default=True)


@trace_constant
def post_train_enabled() -> bool:
    """DSV4_HC_POST_TRAIN=1: eager training's kernel pair below. Opt-in: its GPU test passes (bf16 within 2^-8 of
    float64, eighteenth session) but a training step with it has not been timed."""
    return env_switch("DSV4_HC_POST_TRAIN")


def _post_fits(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> bool:
    hc = residual.shape[-2]
    return (post_enabled()                                            # first: while off, no shape guard
            and x.is_cuda                                             # a GPU kernel (the interpreter is for tests)
            and x.dtype in (torch.bfloat16, torch.float16)            # inference's streams; fp32 keeps the twin
            and residual.dtype == x.dtype                             # the kernel reads both in one dtype
            and post.dtype == comb.dtype == torch.float32             # the kernel reads fp32 weights
            and not torch.is_grad_enabled()                           # no backward: training keeps the twin
            and hc & (hc - 1) == 0                                    # tl.arange(0, HC) needs a power of two
            and math.prod(x.shape[:-1]) > MAX_TOKENS)                 # prefill: decode's compiled step fuses the twin


@custom_op("hc_post", lambda x, residual, post, comb: x.new_empty(*residual.shape))
def _post_kernel(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    from dsv4.ops.triton.hc_post import hc_post as launch

    return launch(x, residual, post, comb)


@custom_op("hc_post_train", lambda x, residual, post, comb: x.new_empty(*residual.shape))
def _post_train_kernel(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    from dsv4.ops.triton.hc_post import hc_post as launch

    return launch(x, residual, post, comb)


@custom_op("hc_post_train_backward", lambda grad, x, residual, post, comb: (
    torch.empty_like(x), torch.empty_like(residual), torch.empty_like(post), torch.empty_like(comb)))
def _post_train_backward(grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
                         comb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from dsv4.ops.triton.hc_post import hc_post_backward

    return hc_post_backward(grad, x, residual, post, comb)


def _post_train_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _post_train_grad(ctx, grad):
    return _post_train_backward(grad, *ctx.saved_tensors)


_post_train_kernel.register_autograd(_post_train_grad, setup_context=_post_train_setup)


def _post_train_kernel_fits(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> bool:
    """DSV4_HC_POST_TRAIN=1 in eager training on CUDA: the one-pass forward and backward kernels (x and residual in
    one 16-bit dtype, fp32 weights, no broadcasting)."""
    hc = residual.shape[-2]
    return (post_train_enabled() and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and residual.dtype == x.dtype and post.dtype == comb.dtype == torch.float32 and hc & (hc - 1) == 0
            and _post_training(x, residual, post, comb))


register_triton("hc_post", "triton_hc_post", _post_fits, _post_kernel)
# NOTE: eager training elsewhere keeps the twin. A matmul form (one baddbmm per token, backward with matmuls) cut its
# bytes by 2/3 but is not batch-invariant on CPU (the batched GEMM's rounding changed with the token count), so
# expert-parallel ranks, each with half the tokens, drifted from the one-process run (tests/test_train_ep.py).
# The kernel pair computes each token alone, in a fixed order: batch-invariant.
register_triton("hc_post", "triton_hc_post_train", _post_train_kernel_fits, _post_train_kernel)
