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
def _sinkhorn(m_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, T, eps, ITERS: tl.constexpr,
              HC: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < T
    width = (2 + HC) * HC
    j = tl.arange(0, HC)
    s0, s1, s2 = tl.load(scale_ptr), tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)
    pre = tl.load(m_ptr + rows[:, None] * width + j[None, :], mask=ok[:, None], other=0.0)
    pre = tl.sigmoid(pre * s0 + tl.load(base_ptr + j)[None, :]) + eps
    tl.store(pre_ptr + rows[:, None] * HC + j[None, :], pre, mask=ok[:, None])
    post = tl.load(m_ptr + rows[:, None] * width + HC + j[None, :], mask=ok[:, None], other=0.0)
    post = 2.0 * tl.sigmoid(post * s1 + tl.load(base_ptr + HC + j)[None, :])
    tl.store(post_ptr + rows[:, None] * HC + j[None, :], post, mask=ok[:, None])
    jk = j[:, None] * HC + j[None, :]                                              # [HC, HC] (source, destination)
    c = tl.load(m_ptr + rows[:, None, None] * width + 2 * HC + jk[None, :, :], mask=ok[:, None, None], other=0.0)
    c = c * s2 + tl.load(base_ptr + 2 * HC + jk)[None, :, :]
    c = tl.exp(c - tl.max(c, axis=2)[:, :, None])
    c = c / tl.sum(c, axis=2)[:, :, None] + eps
    c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
    for _ in range(ITERS - 1):
        c = c / (tl.sum(c, axis=2)[:, :, None] + eps)
        c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
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
