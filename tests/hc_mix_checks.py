"""Checks of the fused mHC pre / head kernel (`ops/triton/hc_mix.py`), shared by its interpreter test (a
subprocess, tests/test_hc_mix.py) and its CUDA test: results are plain numbers, ready for JSON.

Tolerance: fp32 class, `torch.testing.assert_close`'s fp32 defaults (rtol 1.3e-6, atol 1e-5) against float64, with
atol taken relative to the values' scale (pre, post, comb are O(1); y is scaled per token by its largest value). Why it
holds: the mixes are fp32 dot products over hc*D <= 16384 terms (random-walk error ~sqrt(K) 2^-24 ~ 8e-6 of
|x| |fn| = O(1) here), damped by the sigmoid / softmax (slope <= scale <= 1); y sums 4 products of exact bf16 values.
A check returns the worst ratio |got - want| / (atol + rtol |want|): <= 1 passes.
"""

from __future__ import annotations

import torch

RTOL, ATOL = 1.3e-6, 1e-5


def make_inputs(tokens: int, dim: int, hc: int, head: bool, dtype=torch.bfloat16, device="cpu", seed=0):
    """Streams h [1, tokens, hc, dim] whose token RMS spans 1e-3..10 (so norm_eps matters for the smallest) and
    fp32 parameters fn [n, hc*dim], scale, base at the checkpoint's shapes."""
    g = torch.Generator().manual_seed(seed)
    n, k = (hc if head else (2 + hc) * hc), hc * dim
    rms = torch.logspace(-3, 1, tokens) if tokens > 1 else torch.tensor([1e-3])
    h = (torch.randn(1, tokens, hc, dim, generator=g) * rms[None, :, None, None]).to(dtype)
    fn = torch.randn(n, k, generator=g) * k ** -0.5
    scale = torch.rand(1 if head else 3, generator=g) * 0.5 + 0.5
    base = torch.randn(n, generator=g)
    return [t.to(device) for t in (h, fn, scale, base)]


def reference(h, fn, scale, base, hc: int, iters: int, norm_eps: float, hc_eps: float, head: bool,
              terms: bool = False):
    """hc_pre / hc_head in float64: [y, pre, post, comb] or [y]; `terms`: then also sum_i |w_i h_i| (the scale of
    y's fp32 rounding error)."""
    from dsv4 import ops

    x = h.double().flatten(-2)
    mixes = (x @ fn.double().T) * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)
    if head:
        weights = [torch.sigmoid(mixes * scale.double() + base.double()) + hc_eps]
    else:
        weights = list(ops.ref.hc_split_sinkhorn(mixes, scale.double(), base.double(), hc, iters, hc_eps))
    y = (weights[0].unsqueeze(-1) * h.double()).sum(-2)
    out = [y] if head else [y, *weights]
    return [*out, (weights[0].unsqueeze(-1) * h.double()).abs().sum(-2)] if terms else out


def worst_ratio(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | float = 1.0) -> float:
    return ((got.double() - want).abs() / (ATOL * scale + RTOL * want.abs())).max().item()


def kernel(h, fn, scale, base, hc, iters, norm_eps, hc_eps, head, out_dtype=None) -> list[torch.Tensor]:
    from dsv4.ops.triton.hc_mix import hc_mix

    out = hc_mix(h, fn, scale, base, hc, iters, norm_eps, hc_eps, head=head, out_dtype=out_dtype)
    return [out] if head else list(out)


def custom_op(h, fn, scale, base, hc, iters, norm_eps, hc_eps, head) -> list[torch.Tensor]:
    """The registered torch custom op (what dispatch and torch.compile call)."""
    import dsv4.ops  # noqa: F401  (registers the ops)

    if head:
        return [torch.ops.dsv4.hc_head_mix(h, fn, scale, base, norm_eps, hc_eps)]
    return list(torch.ops.dsv4.hc_pre_mix(h, fn, scale, base, hc, iters, norm_eps, hc_eps))


def against_float64(tokens, dim, hc=4, iters=3, norm_eps=1e-6, hc_eps=1e-3, head=False, dtype=torch.bfloat16,
                    device="cpu") -> dict:
    """Worst ratios of the kernel's fp32 outputs (y before its rounding) to the float64 reference; how far (in
    units of the output's last place) the custom op's y in h's dtype is from that fp32 y, and whether it is exactly
    its round-to-nearest-even (on the GPU; Triton's interpreter truncates fp32 -> bf16); whether its weights are
    the same."""
    args = (*make_inputs(tokens, dim, hc, head, dtype, device), hc, iters, norm_eps, hc_eps, head)
    *want, absum = reference(*args, terms=True)
    got = kernel(*args, out_dtype=torch.float32)
    rounded = custom_op(*args)
    ratios = [worst_ratio(got[0], want[0], want[0].abs().amax(-1, keepdim=True))]     # per token
    ratios += [worst_ratio(g, w) for g, w in zip(got[1:], want[1:], strict=True)]
    info = torch.finfo(dtype)                                         # its spacing at y (subnormals: the least)
    ulp = torch.ldexp(torch.ones_like(got[0]), torch.frexp(got[0]).exponent - 1).mul(info.eps)
    ulp = ulp.clamp_min(info.smallest_normal * info.eps)
    # The op's bf16 y comes from a separately compiled variant whose fp32 sum of hc products may differ from this
    # fp32 y by the compiler's FMA contraction (a few fp32 roundings of the terms: <= 2 hc 2^-24 sum|w_i h_i|, a
    # visible fraction of a bf16 unit only where the terms cancel). Round-to-nearest-even of some fp32 sum within
    # that slack = a value between the roundings of the slack interval's ends (rounding is monotonic); a truncating
    # or double-rounding store falls outside it wherever y is not within the slack of a tie.
    slack = (2 * hc * 2.0 ** -24 * absum).float()
    lo, hi = (got[0] - slack).to(dtype), (got[0] + slack).to(dtype)
    return {"ratios": ratios, "ulps": ((rounded[0].float() - got[0]).abs() / ulp).max().item(),
            "rtne": bool(((rounded[0] >= lo) & (rounded[0] <= hi)).all()),
            "rtne_exact": torch.equal(rounded[0], got[0].to(dtype)),
            "weights": all(map(torch.equal, rounded[1:], got[1:])),
            "shapes": [list(t.shape) for t in rounded] == [list(t.shape) for t in want],
            "dtype": str(rounded[0].dtype)}


def batch_invariant(tokens, dim, picks, hc=4, iters=3, head=False, device="cpu") -> bool:
    """Each token in `picks`, computed alone and as a 3-token slice, gives outputs bit-identical to the same token
    computed inside the whole batch (fp32 y, so a difference below the output rounding shows too)."""
    h, *params = make_inputs(tokens, dim, hc, head, device=device)
    run = lambda x: kernel(x, *params, hc, iters, 1e-6, 1e-3, head, out_dtype=torch.float32)   # noqa: E731
    full = run(h)
    same = True
    for t in picks:
        for lo in sorted({t, max(t - 2, 0)}):          # token 0 has no 3-token slice ending at it
            part = run(h[:, lo:t + 1].clone())
            same &= all(torch.equal(a[:, -1], b[:, t]) for a, b in zip(part, full, strict=True))
    return same
