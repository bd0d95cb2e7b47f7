"""Golden precision variants of the attention and q-norm paths, and how far each is from a float64 reference.

A kernel never computes exactly what `ops.ref` writes: FlashAttention-style kernels run an online softmax over
tiles of KV rows and round the probabilities to bf16 before the PV product; a q-norm may use the hardware
rsqrt or 1/sqrt. These variants compute the same maths in those orders, so the distance a real kernel shows
against the reference can be compared with the distance its *precision class* explains (`precision_report`,
`dsv4 parity precision`). A kernel far outside its variant's band has a bug, not noise.

Attention variants (same signature as `ops.sparse_attention`):
  "fp32"  scores, softmax and PV in fp32 (probabilities never rounded), one pass;
  "ref"   `ops.ref.sparse_attention`: one pass, probabilities rounded to kv's dtype before PV;
  "tiled" online softmax over tiles of `tile` rows: running max / sum in fp32, each tile's probabilities
          rounded to kv's dtype before its PV product, the sink added to the denominator at the end.
q-norm variants (weightless per-head RMS norm of q): "compute" (the model: every step in q's dtype),
"rsqrt" / "recip_sqrt" (fp32 statistics, x * rsqrt(ms + eps) or x * (1 / sqrt(ms + eps)), rounded once).
"""

from __future__ import annotations

import contextlib

import torch

from dsv4.ops import ref

ATTENTION_VARIANTS = ("fp32", "ref", "tiled")
QNORM_VARIANTS = ("compute", "rsqrt", "recip_sqrt")


def _gather(kv: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kv [b, n, d], idx [b, s, k] -> (rows [b, s, k, d], valid [b, s, k])."""
    b, s, _ = idx.shape
    d = kv.shape[-1]
    rows = idx.clamp_min(0).long().unsqueeze(-1).expand(-1, -1, -1, d)
    rows = torch.gather(kv.unsqueeze(1).expand(b, s, -1, d), 2, rows)
    return rows, idx >= 0


def attention_fp32(q, kv, sink, idx, scale, acc=torch.float32) -> torch.Tensor:
    """One-pass attention with sink, every step in `acc` (float64 = the golden reference)."""
    rows, valid = _gather(kv, idx)
    s = torch.einsum("bshd,bskd->bshk", q.to(acc), rows.to(acc)) * scale
    s = s.masked_fill(~valid.unsqueeze(2), float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(acc).min)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True) + torch.exp(sink.to(acc).view(1, 1, -1, 1) - m)
    return (torch.einsum("bshk,bskd->bshd", p, rows.to(acc)) / denom).to(q.dtype)


def attention_tiled(q, kv, sink, idx, scale, tile: int = 64) -> torch.Tensor:
    """Online softmax over tiles of `tile` index columns (fp32 statistics, probabilities in kv's dtype for PV)."""
    if tile <= 0:
        raise ValueError(f"tile must be > 0, got {tile}")
    b, s, h, d = q.shape
    m = torch.full((b, s, h, 1), float("-inf"))
    l = torch.zeros(b, s, h, 1)                          # noqa: E741 - the kernels' name for the running sum
    acc = torch.zeros(b, s, h, d)
    for j in range(0, idx.shape[-1], tile):
        rows, valid = _gather(kv, idx[..., j:j + tile])
        sc = torch.einsum("bshd,bskd->bshk", q.float(), rows.float()) * scale
        sc = sc.masked_fill(~valid.unsqueeze(2), float("-inf"))
        m_new = torch.maximum(m, sc.amax(-1, keepdim=True))
        safe = m_new.clamp_min(torch.finfo(torch.float32).min)          # a tile with nothing visible yet
        p = torch.exp(sc - safe)
        alpha = torch.exp(m - safe)
        l = l * alpha + p.sum(-1, keepdim=True)           # noqa: E741
        acc = acc * alpha + torch.einsum("bshk,bskd->bshd", p.to(kv.dtype).float(), rows.float())
        m = m_new
    l = l + torch.exp(sink.float().view(1, 1, h, 1) - m.clamp_min(torch.finfo(torch.float32).min))  # noqa: E741
    return (acc / l).to(q.dtype)


def attention(q, kv, sink, idx, scale, variant: str = "ref", tile: int = 64) -> torch.Tensor:
    if variant == "fp32":
        return attention_fp32(q, kv, sink, idx, scale)
    if variant == "ref":
        return ref.sparse_attention(q, kv, sink, idx, scale)
    if variant == "tiled":
        return attention_tiled(q, kv, sink, idx, scale, tile)
    raise ValueError(f"unknown attention variant {variant!r}; known: {', '.join(ATTENTION_VARIANTS)}")


def q_norm(q: torch.Tensor, eps: float, variant: str = "compute") -> torch.Tensor:
    """Weightless RMS norm over the last dim (the per-head q normalisation after wq_b)."""
    if variant == "compute":
        return q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)
    ms = q.float().square().mean(-1, keepdim=True) + eps
    if variant == "rsqrt":
        return (q.float() * torch.rsqrt(ms)).to(q.dtype)
    if variant == "recip_sqrt":
        return (q.float() * (1.0 / torch.sqrt(ms))).to(q.dtype)
    raise ValueError(f"unknown q-norm variant {variant!r}; known: {', '.join(QNORM_VARIANTS)}")


def q_norm_reference(q: torch.Tensor, eps: float) -> torch.Tensor:
    x = q.double()
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)


@contextlib.contextmanager
def use_attention(variant: str, tile: int = 64):
    """Make the model's `ops.sparse_attention` calls use `variant` for the duration (dumps of a kernel's
    precision class: `with use_attention("tiled"): dump(...)`)."""
    import dsv4.ops as ops

    if variant not in ATTENTION_VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; known: {', '.join(ATTENTION_VARIANTS)}")
    original = ops.sparse_attention
    ops.sparse_attention = lambda q, kv, sink, idx, scale: attention(q, kv, sink, idx, scale, variant, tile)
    try:
        yield
    finally:
        ops.sparse_attention = original


# ------------------------------------------------------------------------------------------------- the report
def distance(got: torch.Tensor, want: torch.Tensor) -> dict:
    """max |d|, relative error ||d|| / ||want||, worst-row 1 - cosine, % of elements != the reference rounded
    to got's dtype (0% = correctly rounded everywhere)."""
    g, w = got.double(), want.double()
    d = g - w
    rows_g, rows_w = g.reshape(-1, g.shape[-1]), w.reshape(-1, w.shape[-1])
    cos = (rows_g * rows_w).sum(-1) / (rows_g.norm(dim=-1) * rows_w.norm(dim=-1))
    rounded = want.to(got.dtype).double()
    return {"max_abs": d.abs().max().item(), "rel_err": (d.norm() / w.norm()).item(),
            "one_minus_cos": (1 - cos.min()).item(), "not_rounded_pct": 100 * (g != rounded).double().mean().item()}


def realistic_attention_inputs(seed: int, tokens: int, heads: int = 64, head_dim: int = 512, rows: int = 640,
                               dtype=torch.bfloat16):
    """Flash-sized inputs: unit-RMS q and kv (both are RMS-normalised), 128 window + 512 picked rows per query,
    a quarter of the picks masked (-1), sinks around 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, tokens, heads, head_dim, generator=g).to(dtype)
    kv = torch.randn(1, rows + 128, head_dim, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(rows + 128, generator=g)[:rows] for _ in range(tokens)]).unsqueeze(0)
    idx = torch.where(torch.rand(idx.shape, generator=g) < 0.25, -1, idx)
    sink = torch.randn(heads, generator=g)
    return q, kv, sink, idx, head_dim ** -0.5


def precision_report(seed: int = 0, tokens: int = 64, tiles: tuple[int, ...] = (64, 128)) -> list[dict]:
    """Each variant's distance to the float64 reference on realistic bf16 inputs (attention: Flash's 64 heads of
    512, 640 rows; q-norm: 64 heads of 512)."""
    q, kv, sink, idx, scale = realistic_attention_inputs(seed, tokens)
    want = attention_fp32(q.double(), kv.double(), sink.double(), idx, scale, acc=torch.float64)
    out = [{"op": "attention", "variant": v, **distance(attention(q, kv, sink, idx, scale, v), want)}
           for v in ("fp32", "ref")]
    out += [{"op": "attention", "variant": f"tiled/{t}", **distance(attention_tiled(q, kv, sink, idx, scale, t), want)}
            for t in tiles]
    x = (torch.randn(tokens, 64, 512, generator=torch.Generator().manual_seed(seed + 1)) * 3).to(torch.bfloat16)
    want = q_norm_reference(x, 1e-6)
    out += [{"op": "q_norm", "variant": v, **distance(q_norm(x, 1e-6, v), want)} for v in QNORM_VARIANTS]
    return out


def render_precision(rows: list[dict]) -> str:
    lines = [f"{'op':<10} {'variant':<11} {'max|d|':>9} {'rel err':>9} {'1-cos(worst)':>12} {'not rounded%':>12}"]
    for r in rows:
        lines.append(f"{r['op']:<10} {r['variant']:<11} {r['max_abs']:>9.2e} {r['rel_err']:>9.2e} "
                     f"{r['one_minus_cos']:>12.2e} {r['not_rounded_pct']:>12.2f}")
    lines.append("distance to float64 on the same bf16 inputs; 'not rounded%' = outputs that differ from the "
                 "correctly rounded bf16 result")
    return "\n".join(lines)

