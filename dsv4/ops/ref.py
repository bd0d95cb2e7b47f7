"""Plain-PyTorch definitions of the hot ops (the twins every fast kernel is tested against).

Each function reproduces the numerics of DeepSeek's reference kernels as spec §2-§3 describes them: which
values are rounded to bf16 and where fp32 accumulation happens. They run on any device and in any float
dtype; in fp32 every intermediate rounding to the compute dtype is a no-op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.quant import act_quant, dequant_fp4, dequant_fp8
from dsv4.quant.act import straight_through


def dequant_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """The fp32 value of a stored weight (`fmt` is "fp8", "fp4" or "plain")."""
    if fmt == "fp8":
        return dequant_fp8(weight, scale, torch.float32)
    if fmt == "fp4":
        return dequant_fp4(weight, scale, torch.float32)
    return weight.float()


def acc_dtype(compute: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the plain ops for a model computing in `compute`: fp32 for 16-bit models (what the
    kernels do), float64 for fp32 (and float64) models.

    NOTE: fp32 GEMMs change their summation order with the number of rows (measured on CPU: every row of a
    640-row product differs from the same row computed alone), so in fp32 a token's result would depend on its
    batch companions and chunking, and the QAT rounding steps amplify such 1e-7 differences into different
    indexer / router choices. Accumulating in float64 and rounding once makes the fp32 model batch-invariant.
    """
    return torch.float64 if compute in (torch.float32, torch.float64) else torch.float32


def dense(x: torch.Tensor, weight: torch.Tensor, model_dtype: torch.dtype,
          out: torch.dtype | None = None) -> torch.Tensor:
    """x @ weight^T inside a model computing in `model_dtype`. In a 16-bit model the product runs in x's dtype
    (bf16 operands, or fp32 where the reference upcasts: mHC, gate, head, compressor, act-quant GEMMs); in an
    fp32 model it accumulates in float64 (batch-invariant, see `acc_dtype`). Result in `out` (default x's)."""
    out = out or x.dtype
    if acc_dtype(model_dtype) == torch.float64:
        return F.linear(x.double(), weight.double()).to(out)
    return F.linear(x, weight.to(x.dtype)).to(out)


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, fmt: str,
           act_quant_on: bool, dequantized: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W^T` for a plain, FP8-block or FP4 weight; output in x's dtype.

    With `act_quant_on`, x is first quantised to FP8 e4m3 per 128 with power-of-two scales, as every FP8/FP4
    GEMM of the reference does. The product of FP8 values and power-of-two scales is exact in fp32, so
    dequantise-then-matmul in fp32 equals the kernel's blockwise fp32 accumulation up to summation order.
    """
    if fmt == "plain":
        return dense(x, weight, x.dtype)
    w = dequantized if dequantized is not None else dequant_weight(weight, scale, fmt)
    if act_quant_on:
        with torch.no_grad():       # the rounding has no gradient: autograd need not record (nor save) it
            q, s = act_quant(x, 128)
            rounded = (q.float().unflatten(-1, (-1, 128)) * s.unsqueeze(-1)).flatten(-2)
        xf = straight_through(x, rounded)
        return dense(xf, w, x.dtype, x.dtype)
    return dense(x, w, x.dtype)


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of each query over its own list of KV rows, plus a per-head sink logit.

    q [b, s, h, d]; kv [b, n, d] (one shared head, used as key and value); sink [h] fp32;
    idx [b, s, k] int rows of kv, -1 = masked. Returns [b, s, h, d] in q's dtype.
    Scores and softmax statistics are fp32 (float64 for float64 inputs, the golden reference); the max excludes
    the sink (it only enters the denominator); the un-normalised probabilities are rounded to kv's dtype before
    the PV product, like the kernel.
    """
    b, s, h, d = q.shape
    acc = acc_dtype(q.dtype)
    valid = idx >= 0                                                    # [b, s, k]
    rows = idx.clamp_min(0).long()
    # index_select, not gather over kv expanded to [b, s, n, d]: gather's backward allocates that whole
    # expanded gradient (quadratic: 80 GiB for one 16k-token training sequence); index_select's is [b, n, d]
    # (and, unlike advanced indexing's, accumulates in a fixed order on a CPU: resumes stay bit-exact).
    flat = (rows + kv.shape[1] * torch.arange(b, device=kv.device).view(b, 1, 1)).flatten()
    kv_sel = kv.reshape(-1, d).index_select(0, flat).view(b, s, -1, d)     # [b, s, k, d]
    scores = torch.einsum("bshd,bskd->bshk", q.to(acc), kv_sel.to(acc)) * scale
    scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)                               # [b, s, h, 1]
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True) + torch.exp(sink.to(acc).view(1, 1, h, 1) - m)
    o = torch.einsum("bshk,bskd->bshd", p.to(kv.dtype).to(acc), kv_sel.to(acc)) / denom
    return o.to(q.dtype)


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split mHC mixes [..., (2+hc)*hc] into pre [.., hc], post [.., hc] and comb [.., hc(src), hc(dst)].

    pre = sigmoid + eps; post = 2*sigmoid; comb = row softmax + eps, then Sinkhorn starting and ending
    with a column normalisation (1 softmax, iters-1 row steps, iters column steps). All fp32.
    """
    pre = torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = mixes[..., 2 * hc:].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc:].view(hc, hc)
    comb = comb.softmax(dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb
