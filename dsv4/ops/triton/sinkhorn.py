"""mHC split + Sinkhorn in one kernel: per token, pre = sigmoid + eps, post = 2 sigmoid, comb = row softmax + eps
then column-first Sinkhorn (1 column step, iters-1 row+column rounds), all fp32 in registers. The plain twin
(`ops.ref.hc_split_sinkhorn`) launches ~120 small kernels per call; this is one. fp32 class: the exp and
division of the kernel may differ from torch's by an ulp, so results agree to ~1e-6 relative, not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def split_sinkhorn(pre, post, c, scale_ptr, base_ptr, eps, ITERS: tl.constexpr, HC: tl.constexpr):
    """The math of `_sinkhorn` on mixes already in registers: pre [BLOCK_T, HC], post [BLOCK_T, HC], comb
    c [BLOCK_T, HC(src), HC(dst)] -> (pre, post, comb) (also used by the fused mHC pre in `hc_mix.py`)."""
    j = tl.arange(0, HC)
    s0, s1, s2 = tl.load(scale_ptr), tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)
    pre = tl.sigmoid(pre * s0 + tl.load(base_ptr + j)[None, :]) + eps
    post = 2.0 * tl.sigmoid(post * s1 + tl.load(base_ptr + HC + j)[None, :])
    jk = j[:, None] * HC + j[None, :]                                              # [HC, HC] (source, destination)
    c = c * s2 + tl.load(base_ptr + 2 * HC + jk)[None, :, :]
    c = tl.exp(c - tl.max(c, axis=2)[:, :, None])
    c = c / tl.sum(c, axis=2)[:, :, None] + eps
    c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
    for _ in range(ITERS - 1):
        c = c / (tl.sum(c, axis=2)[:, :, None] + eps)
        c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
    return pre, post, c


# NOTE: T (tokens) is not specialised: Triton compiles a kernel per "T % 16 == 0" (and T == 1) by default, and the
# training packs' lengths vary from step to step, so the first pack of a length divisible by 16 compiled both
# kernels again mid-run (~250 ms of host time in one step of the issue 17 profile). T only bounds the masks.
@triton.jit(do_not_specialize=["T"])
def _sinkhorn(m_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, T, eps, ITERS: tl.constexpr,
              HC: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < T
    width = (2 + HC) * HC
    j = tl.arange(0, HC)
    jk = j[:, None] * HC + j[None, :]
    vec, mat = rows[:, None] * width + j[None, :], rows[:, None, None] * width + 2 * HC + jk[None, :, :]
    pre, post, c = split_sinkhorn(tl.load(m_ptr + vec, mask=ok[:, None], other=0.0),
                                  tl.load(m_ptr + vec + HC, mask=ok[:, None], other=0.0),
                                  tl.load(m_ptr + mat, mask=ok[:, None, None], other=0.0),
                                  scale_ptr, base_ptr, eps, ITERS, HC)
    tl.store(pre_ptr + rows[:, None] * HC + j[None, :], pre, mask=ok[:, None])
    tl.store(post_ptr + rows[:, None] * HC + j[None, :], post, mask=ok[:, None])
    tl.store(comb_ptr + rows[:, None, None] * HC * HC + jk[None, :, :], c, mask=ok[:, None, None])


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `ops.ref.hc_split_sinkhorn` for fp32 mixes [..., (2+hc)*hc]."""
    assert mixes.dtype == torch.float32 and mixes.shape[-1] == (2 + hc) * hc and hc & (hc - 1) == 0
    lead = mixes.shape[:-1]
    m = mixes.reshape(-1, mixes.shape[-1]).contiguous()
    t = m.shape[0]
    pre = torch.empty(t, hc, dtype=torch.float32, device=m.device)
    post, comb = torch.empty_like(pre), torch.empty(t, hc, hc, dtype=torch.float32, device=m.device)
    if t:
        block = 64
        _sinkhorn[(triton.cdiv(t, block),)](m, scale.float().contiguous(), base.float().contiguous(), pre, post,
                                            comb, t, eps, ITERS=iters, HC=hc, BLOCK_T=block)
    return pre.view(*lead, hc), post.view(*lead, hc), comb.view(*lead, hc, hc)


@triton.jit(do_not_specialize=["T"])                  # as `_sinkhorn`: one compiled kernel for every T
def _sinkhorn_bwd(m_ptr, scale_ptr, base_ptr, gpre_ptr, gpost_ptr, gcomb_ptr, gz_ptr, cs_ptr, T, eps,
                  ITERS: tl.constexpr, HC: tl.constexpr, BLOCK_T: tl.constexpr):
    """Gradient of `_sinkhorn`'s outputs w.r.t. its pre-activations z = mixes * scale + base, per token: [T, width].
    Nothing is saved between the forward and the backward: the kernel first replays the normalisation steps from
    the softmax, storing each step's input c_i in `cs_ptr` [T, 2 ITERS - 1, HC, HC] (its own scratch, read back by
    the same program), then walks the steps backwards. The same operations in the same order as the forward: the
    c_i are the forward's bits. (It recomputed each c_i from the softmax before, O(steps^2) 4x4 steps a token:
    1.1 ms a call at 32k tokens on the H200, 16 ms of a 0.41 s training step: h200_s18/train_probes.txt.)"""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < T
    width = (2 + HC) * HC
    j = tl.arange(0, HC)
    s0, s1, s2 = tl.load(scale_ptr), tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)
    vec = rows[:, None] * width + j[None, :]
    sig = tl.sigmoid(tl.load(m_ptr + vec, mask=ok[:, None], other=0.0) * s0 + tl.load(base_ptr + j)[None, :])
    g = tl.load(gpre_ptr + rows[:, None] * HC + j[None, :], mask=ok[:, None], other=0.0)
    tl.store(gz_ptr + vec, g * sig * (1.0 - sig), mask=ok[:, None])
    sig = tl.sigmoid(tl.load(m_ptr + vec + HC, mask=ok[:, None], other=0.0) * s1 + tl.load(base_ptr + HC + j)[None, :])
    g = tl.load(gpost_ptr + rows[:, None] * HC + j[None, :], mask=ok[:, None], other=0.0)
    tl.store(gz_ptr + vec + HC, 2.0 * g * sig * (1.0 - sig), mask=ok[:, None])
    jk = j[:, None] * HC + j[None, :]
    mat = rows[:, None, None] * width + 2 * HC + jk[None, :, :]
    z = tl.load(m_ptr + mat, mask=ok[:, None, None], other=0.0) * s2 + tl.load(base_ptr + 2 * HC + jk)[None, :, :]
    soft = tl.exp(z - tl.max(z, axis=2)[:, :, None])
    soft = soft / tl.sum(soft, axis=2)[:, :, None]
    g = tl.load(gcomb_ptr + rows[:, None, None] * HC * HC + jk[None, :, :], mask=ok[:, None, None], other=0.0)
    steps = 2 * ITERS - 1
    at = cs_ptr + rows[:, None, None].to(tl.int64) * steps * HC * HC + jk[None, :, :]       # step 0's c of each row
    c = soft + eps
    for i in range(steps):                                        # the forward's steps: column, then row / column
        tl.store(at + i * HC * HC, c, mask=ok[:, None, None])
        if i % 2 == 0:
            c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
        else:
            c = c / (tl.sum(c, axis=2)[:, :, None] + eps)
    for back in range(steps):
        i = steps - 1 - back                                      # step i maps c_i to c_{i+1} = c_i / d
        c = tl.load(at + i * HC * HC, mask=ok[:, None, None], other=1.0)
        # NOTE: both sums broadcast to [BLOCK_T, HC, HC] and chosen by tl.where: an if/else on the runtime i that
        # binds d to [.., 1, HC] in one branch and [.., HC, 1] in the other does not compile on the GPU (the
        # interpreter accepts it).
        even = i % 2 == 0
        zero = tl.zeros_like(c)
        d = tl.where(even, tl.sum(c, axis=1)[:, None, :] + zero, tl.sum(c, axis=2)[:, :, None] + zero) + eps
        gc = g * (c / d)
        g = (g - tl.where(even, tl.sum(gc, axis=1)[:, None, :] + zero, tl.sum(gc, axis=2)[:, :, None] + zero)) / d
    g = soft * (g - tl.sum(g * soft, axis=2)[:, :, None])         # through the row softmax
    tl.store(gz_ptr + mat, g, mask=ok[:, None, None])


def hc_split_sinkhorn_backward(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, grad_pre: torch.Tensor,
                               grad_post: torch.Tensor, grad_comb: torch.Tensor, hc: int, iters: int,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (mixes [..., (2+hc)*hc], scale [3], base [(2+hc)*hc]) of `hc_split_sinkhorn`'s outputs, fp32."""
    assert mixes.dtype == torch.float32 and mixes.shape[-1] == (2 + hc) * hc and hc & (hc - 1) == 0
    width = mixes.shape[-1]
    m = mixes.reshape(-1, width).contiguous()
    t = m.shape[0]
    gz = torch.empty_like(m)
    if t:
        block = 32
        steps = torch.empty(t, 2 * iters - 1, hc, hc, dtype=torch.float32, device=m.device)   # the kernel's scratch
        _sinkhorn_bwd[(triton.cdiv(t, block),)](
            m, scale.float().contiguous(), base.float().contiguous(), grad_pre.reshape(t, hc).float().contiguous(),
            grad_post.reshape(t, hc).float().contiguous(), grad_comb.reshape(t, hc * hc).float().contiguous(), gz,
            steps, t, eps, ITERS=iters, HC=hc, BLOCK_T=block)
    sizes = (hc, hc, hc * hc)
    # each column's scale (no host list sent to the device: that copy would wait for the GPU every call)
    per_column = torch.cat([scale[i:i + 1].float().expand(n) for i, n in enumerate(sizes)])
    grad_scale = (gz * m).sum(0).split(sizes)
    return ((gz * per_column).view(mixes.shape), torch.stack([g.sum() for g in grad_scale]), gz.sum(0))
