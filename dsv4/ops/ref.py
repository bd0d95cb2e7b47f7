"""Plain-PyTorch definitions of the hot ops (the twins every fast kernel is tested against).

Each function reproduces the numerics of DeepSeek's reference kernels as spec §2-§3 describes them: which
values are rounded to bf16 and where fp32 accumulation happens. They run on any device and in any float
dtype; in fp32 every intermediate rounding to the compute dtype is a no-op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from dsv4.ops.fp4_layout import to_rows
from dsv4.quant import act_quant, dequant_fp4, dequant_fp8
from dsv4.quant.act import dequantize_blocks, straight_through


def dequant_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """The fp32 value of a stored weight (`fmt` is "fp8", "fp4" or "plain")."""
    if fmt == "fp8":
        return dequant_fp8(weight, scale, torch.float32)
    if fmt == "fp4":
        return dequant_fp4(to_rows(weight), scale, torch.float32)     # either layout (`ops.fp4_layout`)
    return weight.float()


def widen(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 (where the reference upcasts), but float64 stays float64 so gradient checks keep precision."""
    return x if x.dtype == torch.float64 else x.float()


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """`x.square().mean(-1, keepdim=True)` (RMS norms), with its backward in one product: autograd's writes four
    x-sized tensors (g / n expanded, x^1, 2 x^1, their product), this writes x * (2 (g / n)), which is the same
    value bit for bit: g / n is the same division, and scaling by 2 is exact on either factor (no overflow;
    tests/test_train_mean_square.py)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.square().mean(-1, keepdim=True)
    return _MeanSquare.apply(x)


class _MeanSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.square().mean(-1, keepdim=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return x * (2 * (grad / x.shape[-1]))


def stable_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of score [..., t]: the first k of a stable descending sort (ties towards the earlier entry,
    -inf last), the indexer's selection order."""
    return score.sort(dim=-1, descending=True, stable=True).indices[..., :k]


# NOTE: the keys are padded (zeros, scores dropped) to a multiple of this: the general step scores a sequence's
# visible keys, the fixed-shape decode step its page table's; on a GPU the GEMM and the sum over heads take their
# kernel and thread layout from the number of keys, and padded alike the same keys score the same bits.
KEYS_ALIGN = 128


def indexer_scores(w: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                   visible: torch.Tensor | None = None) -> torch.Tensor:
    """The lightning indexer's scores [b, s, t] = sum_h relu(q[b, s, h] . keys[b, t]) * w[b, s, h] (w [b, s, h],
    q [b, s, h, d], keys [b, t, d]); -inf where t >= visible[b, s] (entries not yet complete at the query) if given.
    In a 16-bit model like the reference: each dot rounded to q's dtype, the product with w rounded, the sum over
    heads accumulated in fp32 and rounded once (torch's 16-bit sum). In fp32 the dots accumulate in float64
    (batch-invariant, see `acc_dtype`). NOTE: materialises [b, s, h, t] (quadratic), the cost the kernel avoids."""
    acc = acc_dtype(q.dtype) if q.dtype == torch.float32 else q.dtype
    t = keys.shape[1]
    padded = F.pad(keys, (0, 0, 0, -t % KEYS_ALIGN)) if t % KEYS_ALIGN else keys          # see KEYS_ALIGN
    dots = torch.einsum("bshd,btd->bsht", q.to(acc), padded.to(acc)).to(q.dtype)
    score = (dots.relu() * w.unsqueeze(-1)).sum(dim=2)[..., :t].contiguous()
    if visible is None:
        return score
    return score.masked_fill(torch.arange(keys.shape[1], device=score.device) >= visible.unsqueeze(-1),
                             float("-inf"))


def acc_dtype(compute: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the plain ops for a model computing in `compute`: fp32 for 16-bit models (what the
    kernels do), float64 for fp32 (and float64) models.

    NOTE: fp32 GEMMs change their summation order with the number of rows (measured on CPU: every row of a
    640-row product differs from the same row computed alone), so in fp32 a token's result would depend on its
    batch companions and chunking, and the QAT rounding steps amplify such 1e-7 differences into different
    indexer / router choices. Accumulating in float64 and rounding once makes the fp32 model batch-invariant.
    """
    return torch.float64 if compute in (torch.float32, torch.float64) else torch.float32


def upcast_pair(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x.to(dtype), x.to(dtype))` for two products, from ONE copy (views of it); under autograd the gradient is
    what two casts give, bit for bit: each product's gradient rounded to x's dtype, then the two summed there.
    NOTE: one plain cast used twice would sum the two in `dtype` and round once, other bits (tests/
    test_train_attention_copies.py)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        y = x.to(dtype)
        return y, y
    return _UpcastPair.apply(x, dtype)


class _UpcastPair(torch.autograd.Function):
    # Two outputs, so the backward gets each product's gradient apart; the second is a view (Dynamo rejects a
    # function returning one tensor twice).
    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype):
        ctx.dtype = x.dtype
        y = x.to(dtype)
        return y, y.view_as(y)

    @staticmethod
    def backward(ctx, grad_a: torch.Tensor, grad_b: torch.Tensor):
        # NOTE: the second's first: the sum takes its memory layout, as autograd's sum of two casts took that of
        # the gradient arriving first (the later product's). With the other layout the backward of the attention's
        # row view copied the sum (a clone of the gathered rows' gradient).
        return grad_b.to(ctx.dtype) + grad_a.to(ctx.dtype), None


# fp32 CPU weight -> ((version, data_ptr, shape, stride), its float64 copy); entries die with their weight
_FLOAT64_COPIES = WeakIdKeyDictionary()


def float64_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight.double()` (the float64 operand of `dense` in an fp32 model), kept between calls for an fp32 CPU
    weight when autograd does not record it: converting each call was ~40 % of an fp32 built-in model's serve step
    (the 129k x 256 head alone ~94 ms a call on a 2-core CPU, most of it the fresh 265 MB allocation), and the
    copy is the same bits, so the product is too.

    MEMORY: a float64 copy (twice the fp32 bytes) of every fp32 CPU weight multiplied here outside autograd, i.e.
    an fp32 CPU model's dense weights (its head 265 MB for the 129k vocabulary) are held three times over (fp32 +
    float64) while they live; the copy is freed with its weight (weak keys) or replaced when the weight changes.
    Staleness: the key is the weight's `_version` (every in-place write through the tensor or a view of it: an
    optimizer step, `load_state_dict`, `copy_` under no_grad), its data pointer (`.data = ...` assignment),
    shape and strides. NOTE: a write through `weight.data` (`p.data.add_(...)`) bypasses the version counter and
    would not be seen, as with `Linear`'s dequantised cache; torch's own optimizers and loaders do not write so.
    Not cached: while autograd records the weight (training: `double()` must stay in the graph), under
    torch.compile (the graph converts; no Python state), inference tensors (no version counter), other dtypes
    and devices (accelerator memory is not spent on it). The copy is made outside inference mode, so one kept by
    an engine step can later be saved for backward (a frozen weight under a recorded input)."""
    if (torch.compiler.is_compiling() or weight.dtype != torch.float32 or weight.device.type != "cpu"
            or weight.is_inference() or (torch.is_grad_enabled() and weight.requires_grad)):
        return weight.double()
    key = (weight._version, weight.data_ptr(), weight.shape, weight.stride())
    hit = _FLOAT64_COPIES.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():     # a normal tensor: autograd may save it (frozen weight)
        wide = weight.double()
    _FLOAT64_COPIES[weight] = (key, wide)
    return wide


def dense(x: torch.Tensor, weight: torch.Tensor, model_dtype: torch.dtype,
          out: torch.dtype | None = None) -> torch.Tensor:
    """x @ weight^T inside a model computing in `model_dtype`. In a 16-bit model the product runs in x's dtype
    (bf16 operands, or fp32 where the reference upcasts: mHC, gate, head, compressor, act-quant GEMMs); in an
    fp32 model it accumulates in float64 (batch-invariant, see `acc_dtype`). Result in `out` (default x's)."""
    out = out or x.dtype
    if acc_dtype(model_dtype) == torch.float64:
        return F.linear(x.double(), float64_weight(weight)).to(out)
    return F.linear(x, weight.to(x.dtype)).to(out)


def widened_dense(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`dense(widen(x), weight, x.dtype)`: the fp32 product where the reference upcasts a 16-bit activation (mHC's
    mixes, the router, the compressors' projections), float64-accumulated for an fp32 or float64 x. Result fp32 (or
    float64). `ops.widened_dense` is the dispatched op (a bf16 tensor-core GEMM on CUDA)."""
    return dense(widen(x), weight, x.dtype)


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
        # training: straight_through rounds the value to x's dtype, so it is made there (`dequantize_blocks`: the
        # same bits without an fp32 copy); inference multiplies the fp32 value
        trained = torch.is_grad_enabled() and x.requires_grad
        with torch.no_grad():       # the rounding has no gradient: autograd need not record (nor save) it
            q, s = act_quant(x, 128)
            rounded = dequantize_blocks(q, s, 128, x.dtype if trained else torch.float32)
        xf = straight_through(x, rounded)
        return dense(xf, w, x.dtype, x.dtype)
    return dense(x, w, x.dtype)


def block_diag_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, fmt: str,
                      dequantized: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., G, K] -> [..., G, R]: group g's inputs times block g of W [G*R, K] (a block-diagonal linear:
    attention's `wo_a`, spec §3.4), output in x's dtype. Never act-quantised (the reference runs wo_a as a bf16
    einsum on the dequantised weight). The weight is decoded (FP8: exact in bf16, a power-of-two scale times an
    e4m3 value), cast to x's dtype and multiplied in x's dtype (16-bit models, like the reference) or accumulated in
    float64 (fp32 models: batch-invariant, see `acc_dtype`). `dequantized`: the decoded weight, if the caller has
    it (a CPU cache, a trainable weight)."""
    if dequantized is not None:
        w = dequantized
    else:
        w = weight if fmt == "plain" else dequant_weight(weight, scale, fmt)     # plain: float64 stays float64
    w = w.view(x.shape[-2], -1, x.shape[-1]).to(x.dtype)
    acc = acc_dtype(x.dtype) if x.dtype == torch.float32 else x.dtype
    return torch.einsum("...gd,grd->...gr", x.to(acc), w.to(acc)).to(x.dtype)


# NOTE: index lists are padded with masked entries to a multiple of this. Two lists with the same entries in the
# same places but different numbers of masked ones at the end (the fixed-shape decode step sizes its lists by the
# page table, the general step by the sequence) add the same terms, but a GPU reduction picks its thread layout
# and vector width from the row length, so their sums could round differently; padded alike, they sum alike.
LIST_ALIGN = 64


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
    if idx.shape[-1] % LIST_ALIGN:
        idx = F.pad(idx, (0, -idx.shape[-1] % LIST_ALIGN), value=-1)
    valid = idx >= 0                                                    # [b, s, k]
    rows = idx.clamp_min(0).long()
    # index_select, not gather over kv expanded to [b, s, n, d]: gather's backward allocates that whole
    # expanded gradient (quadratic: 80 GiB for one 16k-token training sequence); index_select's is [b, n, d]
    # (and, unlike advanced indexing's, accumulates in a fixed order on a CPU: resumes stay bit-exact).
    flat = (rows + kv.shape[1] * torch.arange(b, device=kv.device).view(b, 1, 1)).flatten()
    kv_sel = kv.reshape(-1, d).index_select(0, flat).view(b, s, -1, d)     # [b, s, k, d]
    kv_scores, kv_values = upcast_pair(kv_sel, acc)                     # one upcast copy for both products
    scores = torch.einsum("bshd,bskd->bshk", q.to(acc), kv_scores) * scale
    scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)                               # [b, s, h, 1]
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True) + torch.exp(sink.to(acc).view(1, 1, h, 1) - m)
    o = torch.einsum("bshk,bskd->bshd", p.to(kv.dtype).to(acc), kv_values) / denom
    return o.to(q.dtype)


def sparse_attention_dense_tail(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                                tail: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """`sparse_attention` over each query's rows of kv picked by idx, followed by the first visible[b, s] rows of
    `tail` [b, e, d] (HCA: a query reads every compressed entry whose block is complete at its position).
    The definition: the tail appended to kv and its visible rows to the index lists (`dense_tail_lists`)."""
    rows, lists = dense_tail_lists(kv, idx, tail, visible)
    return sparse_attention(q, rows, sink, lists, scale)


def dense_tail_lists(kv: torch.Tensor, idx: torch.Tensor, tail: torch.Tensor,
                     visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense tail as plain sparse attention's inputs: rows [kv | tail] and index lists [idx | the query's
    visible tail rows, -1 after], so the twin and the kernel (`ops.attention`) attend over the same layout."""
    n, e = kv.shape[1], tail.shape[1]
    j = torch.arange(e, device=idx.device)
    tail_idx = torch.where(j < visible.unsqueeze(-1), n + j, -1).to(idx.dtype)         # [b, s, e]
    return torch.cat([kv, tail], dim=1), torch.cat([idx, tail_idx], dim=-1)


def sparse_attention_split_tail(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                                tail: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """`sparse_attention_dense_tail` without gathering the tail per query: its scores are one product with every
    tail row, masked, and share the softmax (max, denominator with the sink) with the gathered rows'. The gather
    is [b, s, k + e, d] (quadratic in the sequence: 4 bytes x T x T/128 x 128 per fp32 copy, 17 GB at T = 64k);
    this keeps [b, s, h, e] scores instead (h = 8 heads, not d = 128 dims). Same terms as the definition: the
    scores, the max and the probabilities (rounded to kv's dtype before the PV product) are equal, the two sums
    (denominator, PV) are summed in two parts, so they differ by the accumulation dtype's rounding."""
    if tail.shape[1] == 0:                                     # no complete block yet (a short sequence)
        return sparse_attention(q, kv, sink, idx, scale)
    b, s, h, d = q.shape
    acc = acc_dtype(q.dtype)
    rows = (idx.clamp_min(0).long() + kv.shape[1] * torch.arange(b, device=kv.device).view(b, 1, 1)).flatten()
    kv_sel = kv.reshape(-1, d).index_select(0, rows).view(b, s, -1, d).to(acc)         # [b, s, k, d]
    qa = q.to(acc)
    near = torch.einsum("bshd,bskd->bshk", qa, kv_sel) * scale
    near = near.masked_fill((idx < 0).unsqueeze(2), float("-inf"))
    tail_scores, tail_values = upcast_pair(tail, acc)
    far = torch.einsum("bshd,bed->bshe", qa, tail_scores) * scale
    j = torch.arange(tail.shape[1], device=q.device)
    far = far.masked_fill((j >= visible.unsqueeze(-1)).unsqueeze(2), float("-inf"))  # [b, s, h, e]
    m = torch.maximum(near.amax(dim=-1, keepdim=True), far.amax(dim=-1, keepdim=True))
    p_near, p_far = torch.exp(near - m), torch.exp(far - m)
    denom = p_near.sum(dim=-1, keepdim=True) + p_far.sum(dim=-1, keepdim=True) + torch.exp(
        sink.to(acc).view(1, 1, h, 1) - m)
    o = (torch.einsum("bshk,bskd->bshd", p_near.to(kv.dtype).to(acc), kv_sel)
         + torch.einsum("bshe,bed->bshd", p_far.to(tail.dtype).to(acc), tail_values))
    return (o / denom).to(q.dtype)


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split mHC mixes [..., (2+hc)*hc] into pre [.., hc], post [.., hc] and comb [.., hc(src), hc(dst)].

    pre = sigmoid + eps; post = 2*sigmoid; comb = row softmax + eps, then Sinkhorn starting and ending
    with a column normalisation (1 softmax, iters-1 row steps, iters column steps). All fp32.
    """
    pre, post, comb = hc_split(mixes, scale, base, hc, eps)
    return pre, post, sinkhorn(comb, iters, eps)


def hc_split(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first part of `hc_split_sinkhorn`: pre, post and comb before the Sinkhorn normalisation."""
    pre = torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = mixes[..., 2 * hc:].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc:].view(hc, hc)
    return pre, post, comb.softmax(dim=-1) + eps


def sinkhorn_dims(iters: int) -> list[int]:
    """The sums of the Sinkhorn normalisation, in order: a column step, then iters-1 (row, column) pairs."""
    return [-2] + [-1, -2] * (iters - 1)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """comb [.., hc, hc] divided by its column / row sums (+ eps) alternately (`sinkhorn_dims`)."""
    for dim in sinkhorn_dims(iters):
        comb = comb / (comb.sum(dim=dim, keepdim=True) + eps)
    return comb
