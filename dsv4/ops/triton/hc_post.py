"""mHC post (`ops.hc_post`) in one pass: out[t, k, d] = post[t, k] x[t, d] + sum_j comb[t, j, k] residual[t, j, d].

The plain twin materialises the products comb x residual as [b, s, hc, hc, D] fp32 (2.1 GB at an 8192-token Flash
prefill, D = 4096; ~35 ms of the 204 ms step, bench/results/h200_s16_checks/prefill_stacks.log). Here program
(token block, D block) reads a token's post [hc] and comb [hc, hc], its x and residual blocks once and writes its
output block once: (2 + 8 + 8) bytes per (token, d) in bf16, 8192 x 4096 x 18 B = 604 MB per call, ~0.13 ms at
~4.8 TB/s predicted; measured on the H200 (bench/results/h200_s18/prefill_stacks_hc_post.log): 151 us a call at
8192 tokens, ~4.0 TB/s (0.83 of the copy bandwidth). Dispatched by default at inference (DSV4_HC_POST=0: the twin).
Arithmetic: the twin's, in fp32: the products, summed over the source streams j in order, then post_k x added;
one rounding to x's dtype. On the GPU the compiler may contract a product and the following add into an FMA (one
rounding less), so fp32 results agree with the twin to a few fp32 roundings of sum |terms|, not bit for bit.

Its backward (`hc_post_backward`, training) in one pass too: program (token block, D block) reads the output
gradient g, x and the residual once and writes dx[t, d] = sum_k post_k g_k and dres[t, j, d] = sum_k comb[j, k] g_k
(in x's dtype), and its D block's partial sums of dpost[t, k] = g_k . x and dcomb[t, j, k] = res_j . g_k (fp32,
added over the D blocks in order afterwards). The twin's autograd writes [.., hc, hc, D] fp32 products again.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# A program's tile is BLOCK_T x HC x BLOCK_D outputs (4 x 4 x 256 fp32: 32 registers a thread at 4 warps); 256
# along D is 8 bf16 (16 bytes, one vector load or store) per thread of a warp. Unmeasured choice.
BLOCK_T, BLOCK_D = 4, 256


@triton.jit
def _term(comb_ptrs, stream_ptrs, ok_t, ok):
    """comb[t, j, :] [BLOCK_T, HC] times stream j [BLOCK_T, BLOCK_D] -> [BLOCK_T, HC, BLOCK_D] in fp32."""
    c = tl.load(comb_ptrs, mask=ok_t[:, None], other=0.0)
    r = tl.load(stream_ptrs, mask=ok, other=0.0).to(tl.float32)
    return c[:, :, None] * r[:, None, :]


# T (tokens) is not specialised: prefill lengths vary, and a kernel per "T % 16 == 0" would compile twice.
@triton.jit(do_not_specialize=["T"])
def _hc_post(x_ptr, r_ptr, post_ptr, comb_ptr, out_ptr, T, D, HC: tl.constexpr, BLOCK_T: tl.constexpr,
             BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, HC)
    ok_t = t < T
    ok = ok_t[:, None] & (d < D)[None, :]                                          # [BLOCK_T, BLOCK_D]
    t = t.to(tl.int64)                                                             # T * HC * D may pass 2^31
    x = tl.load(x_ptr + t[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t[:, None] * HC + k[None, :], mask=ok_t[:, None], other=0.0)     # [BLOCK_T, HC]
    comb = comb_ptr + t[:, None] * (HC * HC) + k[None, :]                          # comb[t, 0, k]
    streams = r_ptr + t[:, None] * (HC * D) + d[None, :]                           # residual[t, 0, d]
    # The twin's torch.sum over the source streams adds them in order: ((c0 r0 + c1 r1) + c2 r2) + c3 r3.
    mixed = _term(comb, streams, ok_t, ok)
    for j in tl.static_range(1, HC):
        mixed += _term(comb + j * HC, streams + j * D, ok_t, ok)
    out = post[:, :, None] * x[:, None, :] + mixed                                 # [BLOCK_T, HC, BLOCK_D]
    dst = out_ptr + t[:, None, None] * (HC * D) + k[None, :, None] * D + d[None, None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=ok[:, None, :])


def _check(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> None:
    if residual.dim() < 2:
        raise ValueError(f"residual must be [..., hc, D], got shape {tuple(residual.shape)}")
    *lead, hc, dim = residual.shape
    if hc < 1 or hc & (hc - 1):
        raise ValueError(f"hc (residual.shape[-2]) must be a power of two, got {hc}")
    want = {"x": (*lead, dim), "post": (*lead, hc), "comb": (*lead, hc, hc)}
    for name, t in (("x", x), ("post", post), ("comb", comb)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must have shape {want[name]} for residual {tuple(residual.shape)}, got "
                             f"{tuple(t.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or residual.dtype != x.dtype:
        raise ValueError(f"x and residual must share a dtype of bf16, fp16 or fp32, got {x.dtype}, {residual.dtype}")
    if post.dtype != torch.float32 or comb.dtype != torch.float32:
        raise ValueError(f"post and comb must be fp32, got {post.dtype}, {comb.dtype}")
    if not x.device == residual.device == post.device == comb.device:
        raise ValueError(f"inputs on different devices: {x.device}, {residual.device}, {post.device}, {comb.device}")


def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """`ops.hc_post` for x [..., D], residual [..., hc, D] (x's dtype: bf16, fp16 or fp32), post [..., hc] and
    comb [..., hc, hc] fp32: the new streams [..., hc, D] in x's dtype."""
    _check(x, residual, post, comb)
    hc, dim = residual.shape[-2:]
    tokens = math.prod(x.shape[:-1])
    out = torch.empty(residual.shape, dtype=x.dtype, device=x.device)
    if tokens and dim:
        block_d = min(BLOCK_D, triton.next_power_of_2(dim))
        grid = (triton.cdiv(tokens, BLOCK_T), triton.cdiv(dim, block_d))
        _hc_post[grid](x.contiguous(), residual.contiguous(), post.contiguous(), comb.contiguous(), out, tokens, dim,
                       HC=hc, BLOCK_T=BLOCK_T, BLOCK_D=block_d)
    return out


@triton.jit
def _load_streams(ptr, t, d, ok, HC: tl.constexpr, D):
    """[BLOCK_T, HC, BLOCK_D] fp32 of a [T, HC, D] tensor."""
    k = tl.arange(0, HC)
    at = ptr + t[:, None, None] * (HC * D) + k[None, :, None] * D + d[None, None, :]
    return tl.load(at, mask=ok[:, None, :], other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["T"])
def _hc_post_backward(g_ptr, x_ptr, r_ptr, post_ptr, comb_ptr, dx_ptr, dr_ptr, dpost_ptr, dcomb_ptr, T, D,
                      HC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, HC)
    ok_t = t < T
    ok = ok_t[:, None] & (d < D)[None, :]
    t = t.to(tl.int64)
    g = _load_streams(g_ptr, t, d, ok, HC, D)                                     # [BLOCK_T, HC(dst), BLOCK_D]
    x = tl.load(x_ptr + t[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t[:, None] * HC + k[None, :], mask=ok_t[:, None], other=0.0)     # [BLOCK_T, HC]
    tl.store(dx_ptr + t[:, None] * D + d[None, :], tl.sum(post[:, :, None] * g, axis=1).to(dx_ptr.dtype.element_ty),
             mask=ok)
    part = (tl.program_id(1) * T + t) * HC                                          # this D block's partial sums
    tl.store(dpost_ptr + part[:, None] + k[None, :], tl.sum(g * x[:, None, :], axis=2), mask=ok_t[:, None])
    for j in tl.static_range(HC):
        c = tl.load(comb_ptr + t[:, None] * (HC * HC) + j * HC + k[None, :], mask=ok_t[:, None], other=0.0)
        tl.store(dr_ptr + t[:, None] * (HC * D) + j * D + d[None, :],
                 tl.sum(c[:, :, None] * g, axis=1).to(dr_ptr.dtype.element_ty), mask=ok)
        r = tl.load(r_ptr + t[:, None] * (HC * D) + j * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(dcomb_ptr + (part[:, None] + j) * HC + k[None, :], tl.sum(g * r[:, None, :], axis=2),
                 mask=ok_t[:, None])


def hc_post_backward(grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
                     comb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, residual, post, comb) of `hc_post` for the output gradient `grad` [..., hc, D]: x's and the
    residual's in x's dtype, post's and comb's fp32."""
    _check(x, residual, post, comb)
    hc, dim = residual.shape[-2:]
    tokens = math.prod(x.shape[:-1])
    block_d = min(BLOCK_D, triton.next_power_of_2(max(dim, 1)))
    blocks = triton.cdiv(dim, block_d)
    dx, dres = torch.empty_like(x), torch.empty(residual.shape, dtype=x.dtype, device=x.device)
    dpost = torch.zeros(blocks, tokens, hc, dtype=torch.float32, device=x.device)
    dcomb = torch.zeros(blocks, tokens, hc, hc, dtype=torch.float32, device=x.device)
    if tokens and dim:
        _hc_post_backward[(triton.cdiv(tokens, BLOCK_T), blocks)](
            grad.contiguous(), x.contiguous(), residual.contiguous(), post.contiguous(), comb.contiguous(), dx,
            dres, dpost, dcomb, tokens, dim, HC=hc, BLOCK_T=BLOCK_T, BLOCK_D=block_d)
    return dx, dres, dpost.sum(0).view(post.shape), dcomb.sum(0).view(comb.shape)
