"""Checks of the one-pass mHC post kernel (`ops/triton/hc_post.py`, dispatched by `ops.hc_post`), shared by its
interpreter test (a subprocess, tests/test_hc_post.py) and its CUDA test: results are plain numbers, ready for JSON.

Tolerances, per output element, with M = |post_k x| + sum_j |comb[j, k] residual_j| (float64) and u = 2^-24:
* FP32 = (2 hc + 2) u M bounds an fp32 evaluation's distance to the exact value: 2 hc + 1 roundings (hc products,
  hc - 1 adds of the sum, post_k x, the last add), each at most u times a partial sum <= M, +1 for M's growth through
  them. Two evaluations of the same products (the twin; the kernel, where the GPU compiler may contract a product
  and an add into an FMA, one rounding less) are within SLACK = 2 FP32 of each other.
* Against the twin: |kernel - twin| <= one unit in the last place of the output dtype (its spacing at the larger
  magnitude) + SLACK: each is its fp32 value rounded once (to nearest: half a unit each; the interpreter truncates
  fp32 -> bf16: under one unit, and there both fp32 values are the same bits). SLACK matters only where the terms
  cancel (|out| << M): there a one-rounding fp32 difference is several units of a small output.
* Against float64: |kernel - exact| <= unit M + 2 FP32 + tiny: the store's rounding, unit = 2^-8 for bf16 and
  2^-11 for fp16 to nearest (2^-7: the interpreter truncates bf16), 0 for fp32 (FP32 counts its roundings), of a
  value within FP32 of the exact one; tiny = the dtype's subnormal spacing (absolute rounding below its normals).
A check returns the worst ratio |got - bound's centre| / bound: <= 1 passes.
"""

from __future__ import annotations

import torch


def make_inputs(b: int, s: int, dim: int, dtype: torch.dtype, hc: int = 4, device="cpu", seed: int = 0,
                strided: bool = False) -> list[torch.Tensor]:
    """x [b, s, dim], residual [b, s, hc, dim] in `dtype`, post [b, s, hc] in (0, 2) and comb [b, s, hc, hc] > 0
    fp32 (not symmetric: a swapped comb index shows), token magnitudes 1e-3..1e3 (each within its own scale).
    `strided`: every tensor a non-contiguous view holding the same values."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 3, b * s).view(b, s, 1)
    x = (torch.randn(b, s, dim, generator=g) * scale).to(dtype)
    residual = (torch.randn(b, s, hc, dim, generator=g) * scale[..., None]).to(dtype)
    post = 2 * torch.sigmoid(torch.randn(b, s, hc, generator=g))
    comb = torch.rand(b, s, hc, hc, generator=g) + 0.01
    if strided:
        x = torch.stack([x, x], -1)[..., 0]                                    # stride 2 along D
        residual = residual.transpose(-1, -2).contiguous().transpose(-1, -2)   # D-major
        post, comb = torch.stack([post, post], -1)[..., 1], comb.mT.contiguous().mT
        assert not any(t.is_contiguous() for t in (x, residual, post, comb))
    return [t.to(device) for t in (x, residual, post, comb)]


def _spacing(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |v| (float64; below its normals: the subnormals' spacing)."""
    info = torch.finfo(dtype)
    exponent = torch.frexp(v.abs().clamp_min(info.smallest_normal)).exponent - 1     # v in [2^e, 2^(e+1))
    return torch.ldexp(torch.ones_like(v), exponent) * info.eps


def _truncated(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 `v` stored as the Triton interpreter stores it in `dtype` (bf16: the low 16 bits dropped)."""
    if dtype != torch.bfloat16:
        return v.to(dtype)
    return (v.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)


def compare(got: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
            interpreter: bool) -> dict:
    """The kernel's output `got` for these inputs against the twin and against float64 (module docstring)."""
    from dsv4 import ops

    hc = residual.shape[-2]
    twin = ops.hc_post.twin(x, residual, post, comb)
    fp32 = ops.hc_post.twin(x.float(), residual.float(), post, comb)   # the twin's value before its rounding
    terms = comb.double().unsqueeze(-1) * residual.double().unsqueeze(-2)      # [..., j, k, D]
    exact = post.double().unsqueeze(-1) * x.double().unsqueeze(-2) + terms.sum(-3)
    mag = (post.double().unsqueeze(-1) * x.double().unsqueeze(-2)).abs() + terms.abs().sum(-3)
    err32 = (2 * hc + 2) * 2.0 ** -24 * mag
    info = torch.finfo(x.dtype)
    g, t = got.double(), twin.double()
    ulp = _spacing(torch.maximum(g.abs(), t.abs()), x.dtype)
    unit = 0.0 if x.dtype == torch.float32 else info.eps / (1 if interpreter and x.dtype == torch.bfloat16 else 2)
    tiny = info.smallest_normal * info.eps
    store = _truncated if interpreter else (lambda v, dtype: v.to(dtype))
    return {"dtype": str(got.dtype), "shape_ok": got.shape == residual.shape and got.dtype == x.dtype,
            "exact": torch.equal(got, twin), "stored_fp32": torch.equal(got, store(fp32, x.dtype)),
            "ulps": ((g - t).abs() / ulp).max().item(),
            "twin": ((g - t).abs() / (ulp + 2 * err32)).max().item(),
            "f64": ((g - exact).abs() / (unit * mag + 2 * err32 + tiny)).max().item()}
