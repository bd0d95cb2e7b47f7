"""Checks of the indexer-scores kernel (`ops/triton/indexer_scores.py`), shared by its interpreter test (a
subprocess, tests/test_indexer_scores.py) and its CUDA test: results are plain numbers, ready for JSON.

The reference is the twin's arithmetic in float64 with its roundings emulated: r_h = rnd(q_h . k) from the exact
dot, p_h = rnd(relu(r_h) w_h), out = rnd(sum_h p_h) from the exact sum (rnd: to the input dtype, nearest even).

Precision class (eps = the dtype's spacing at 1: 2^-10 fp16, 2^-7 bf16, 2^-23 fp32; E = sum_h |p_h|):
* the kernel's fp32 dot d~ is within ~sqrt(d) 2^-24 sum_i |q_i k_i| of the exact d (summation order), so its
  rounding r~ is r or, when d lies that close to a rounding boundary, the neighbouring value: |r~ - r| <= eps |r|;
* the products are exact in fp32 before rounding, so |p~_h - p_h| <= |w_h| eps |r_h| + one spacing <= 2 eps |p_h|;
* the fp32 sum over h heads adds at most h 2^-24 E, and the final rounding one spacing of the output, <= eps E.
Hence |out~ - out| <= (3 eps + h 2^-24) E, which `TOL_UNITS` = 4 covers with one eps of slack for the
second-order terms, plus 2 h spacings of the dtype's subnormals (fp16 products can be subnormal). That bound holds
however many heads move; it cannot see a missing rounding (<= eps E too), so a second check asks that almost every
output equal the emulation bit for bit: a head moves only when its dot lies within fp32 noise of a rounding
boundary (~1e-3 of dots in fp16), while without either rounding most outputs differ.
The GPU compares the kernel with the twin (bf16 on CUDA): both are in the class, so they are within 2x the bound.
"""

from __future__ import annotations

import torch

TOL_UNITS = 4


def make_inputs(b, s, t, h, d, dtype, seed=0, device="cpu", fp4=False):
    """w of both signs at the model's scale (1/sqrt(h d)), unit-variance q [b, s, h, d] and keys [b, t, d]; `fp4`:
    q and keys FP4 fake-quantised as with the QAT emulation (exact ties are then common)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(b, s, h, generator=g) * (h * d) ** -0.5
    q, keys = torch.randn(b, s, h, d, generator=g), torch.randn(b, t, d, generator=g)
    if fp4:
        from dsv4.quant import fake_quant_fp4

        q, keys = fake_quant_fp4(q, 32), fake_quant_fp4(keys, 32)
    return [x.to(dtype).to(device) for x in (w, q, keys)]


def causal_visible(b, s, start, device="cpu"):
    """[b, s] entries visible to queries at positions start.. (ratio 4, `Indexer.select`)."""
    return (torch.arange(start + 1, start + s + 1, device=device) // 4).unsqueeze(0).expand(b, s).contiguous()


def emulated(w, q, keys, visible):
    """(float64 out with the twin's roundings emulated, E = sum_h |p_h|) [b, s, t]."""
    dt = q.dtype
    r = torch.einsum("bshd,btd->bsht", q.double(), keys.double()).to(dt).double()
    p = (r.relu() * w.double().unsqueeze(-1)).to(dt).double()
    out = p.sum(2).to(dt).double()
    if visible is not None:
        out = out.masked_fill(torch.arange(keys.shape[1], device=out.device) >= visible.unsqueeze(-1), float("-inf"))
    return out, p.abs().sum(2)


def tolerance(absum: torch.Tensor, dtype: torch.dtype, heads: int) -> torch.Tensor:
    info = torch.finfo(dtype)
    return (TOL_UNITS * info.eps + heads * 2.0 ** -24) * absum + 2 * heads * info.smallest_normal * info.eps


def compare(got, want, absum, dtype, heads, k=8, units=1) -> dict:
    """got vs the emulation: the -inf pattern, the worst |diff| / (units x tolerance), the fraction bit-equal, and
    top-k agreement: entries picked by one side only must lie within the tolerance of the k-th best (near-ties)."""
    from dsv4.ops.ref import stable_topk

    got = got.double()
    fin = torch.isfinite(want)
    tol = units * tolerance(absum, dtype, heads)
    diff = (got - want).abs()[fin]
    k = min(k, want.shape[-1])
    mine, theirs = stable_topk(got, k), stable_topk(want, k)
    kth = want.gather(-1, theirs[..., -1:])                                   # [b, s, 1]
    odd = torch.zeros_like(want, dtype=torch.bool)
    odd.scatter_(-1, mine, True)
    odd ^= torch.zeros_like(odd).scatter_(-1, theirs, True)                   # picked by exactly one side
    near = ((want - kth).abs() <= 2 * tol) | (~fin & torch.isinf(kth))        # a tie at -inf (rows seeing < k)
    return {"same_inf": bool(torch.equal(torch.isinf(got), ~fin) and (got[~fin] < 0).all()),
            "worst": (diff / tol[fin]).max().item() if diff.numel() else 0.0,
            "equal": (got[fin] == want[fin]).double().mean().item() if diff.numel() else 1.0,
            "topk_same": bool(torch.equal(mine, theirs)), "topk_near_ties_only": bool(near[odd].all()),
            "finite": int(fin.sum())}


def against_emulation(b, s, t, h, d, dtype, start=None, seed=0, fp4=False, **blocks) -> dict:
    """The launcher on CPU (the interpreter) or CUDA (inputs' device: blocks' `device`) against the emulation;
    `start`: visibility of queries at positions start.. (None: unmasked)."""
    from dsv4.ops.triton.indexer_scores import indexer_scores

    device = blocks.pop("device", "cpu")
    w, q, keys = make_inputs(b, s, t, h, d, dtype, seed, device, fp4)
    visible = None if start is None else causal_visible(b, s, start, device)
    want, absum = emulated(w, q, keys, visible)
    got = indexer_scores(w, q, keys, visible, **blocks)
    assert got.dtype == dtype and got.shape == (b, s, t)
    return compare(got, want, absum, dtype, h)
