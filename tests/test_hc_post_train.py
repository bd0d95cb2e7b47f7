"""`ops.hc_post` in eager training (`ops/hc_mix.py` `_PostTrain`): the twin's function without its [b, s, hc, hc, D]
products, against autograd through the twin. Not bit-identical (the mix and the backward's sums run as matmuls, in
another order): float64 tight; fp32 and bf16 within their precision class, relative to the magnitude
M = the same sums over absolute values (module-level bounds below).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4 import ops
from dsv4.ops.registry import which

U32 = 2.0 ** -24          # fp32 unit roundoff
BF16_ULP = 2.0 ** -7      # bf16 spacing relative to a value's magnitude (8 significand bits)


def _inputs(dtype, b=2, s=5, hc=4, dim=96, seed=0):
    """x [b, s, D], residual [b, s, hc, D] in `dtype`; post in (0, 2), comb > 0 (not symmetric) fp32 (float64 for
    a float64 test), and the output gradient in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(b, s, dim, generator=g).to(dtype)
    residual = torch.randn(b, s, hc, dim, generator=g).to(dtype)
    post = (2 * torch.sigmoid(torch.randn(b, s, hc, generator=g))).to(weights)
    comb = (torch.rand(b, s, hc, hc, generator=g) + 0.01).to(weights)
    grad = torch.randn(b, s, hc, dim, generator=g).to(dtype)
    return [x, residual, post, comb], grad


def _run(fn, inputs, grad, needs=(True, True, True, True)):
    """fn's output and the gradients of the inputs that require one."""
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip(inputs, needs, strict=True)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad)
    return [out, *grads]


def _magnitudes(inputs, grad):
    """M for the output and each gradient: the twin in float64 on absolute values (every term counted positive)."""
    return _run(ops.hc_post.twin, [t.detach().abs().double() for t in inputs], grad.abs().double())


def test_dispatch_takes_the_training_path_only_under_autograd():
    inputs, _ = _inputs(torch.bfloat16)
    trained = [t.clone().requires_grad_(True) for t in inputs]
    assert which("hc_post", *trained) == "post_train"
    assert which("hc_post", *inputs) == "twin"                      # no input requires grad: inference
    with torch.no_grad():
        assert which("hc_post", *trained) == "twin"
    broadcast = [trained[0][:, :1], *trained[1:]]                  # x broadcast over tokens: the twin
    assert which("hc_post", *broadcast) == "twin"
    with ops.reference_only("hc_post"):
        assert which("hc_post", *trained) == "twin"


def test_float64_matches_autograd_through_the_twin():
    inputs, grad = _inputs(torch.float64)
    for got, want in zip(_run(ops.hc_post, inputs, grad), _run(ops.hc_post.twin, inputs, grad), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)   # float64: summation order only


def test_strided_inputs():
    """Non-contiguous views (D-major streams, a transposed comb, x strided along D) hold the same values."""
    (x, residual, post, comb), grad = _inputs(torch.float64)
    strided = [torch.stack([x, x], -1)[..., 0], residual.mT.contiguous().mT, post, comb.mT.contiguous().mT]
    assert not any(t.is_contiguous() for t in (strided[0], strided[1], strided[3]))
    got, want = _run(ops.hc_post, strided, grad), _run(ops.hc_post.twin, [x, residual, post, comb], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)   # float64: summation order only


def test_gradcheck():
    inputs, _ = _inputs(torch.float64, b=1, s=3, dim=8)
    leaves = [t.requires_grad_(True) for t in inputs]
    assert which("hc_post", *leaves) == "post_train"
    assert torch.autograd.gradcheck(ops.hc_post, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_and_bf16_match_the_twin_within_their_precision(dtype):
    """Both compute in fp32 (exact products of fp32 weights and upcast streams): each sum of n terms is within
    n u M of the exact one (n <= D + hc), so the two are within 2 (D + hc) u M; a result stored in bf16 adds one
    unit of its rounding (each rounds its own fp32 value to nearest)."""
    inputs, grad = _inputs(dtype)
    n = inputs[1].shape[-1] + inputs[1].shape[-2]
    got, want, mags = _run(ops.hc_post, inputs, grad), _run(ops.hc_post.twin, inputs, grad), _magnitudes(inputs, grad)
    for name, a, b, m in zip(("out", "x", "residual", "post", "comb"), got, want, mags, strict=True):
        assert a.dtype == b.dtype, name
        tol = 2 * n * U32 + (BF16_ULP if a.dtype == torch.bfloat16 else 0.0)
        err = (a.double() - b.double()).abs()
        assert (err <= tol * m).all(), f"{name}: worst {(err / (tol * m)).max().item():.3g} of the bound"


def test_only_the_needed_gradients():
    inputs, grad = _inputs(torch.float64)
    for needs in ((True, False, False, False), (False, True, False, True), (False, False, True, False)):
        got, want = _run(ops.hc_post, inputs, grad, needs), _run(ops.hc_post.twin, inputs, grad, needs)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)   # float64: summation order only


class _Largest(TorchDispatchMode):
    """The largest number of elements of any op's output."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_hc_by_hc_by_dim_tensor():
    """Forward and backward write nothing larger than a stream tensor [b, s, hc, D] (the twin: [b, s, hc, hc, D])."""
    inputs, grad = _inputs(torch.bfloat16)
    with _Largest() as fast:
        _run(ops.hc_post, inputs, grad)
    with _Largest() as twin:
        _run(ops.hc_post.twin, inputs, grad)
    assert fast.numel == inputs[1].numel() and twin.numel == inputs[1].numel() * inputs[1].shape[-2]


def test_compiled_graph_keeps_the_twin():
    """Under torch.compile the predicate is false: the traced graph is the twin's (aot_eager: the twin's ATen ops,
    so its bits), for inductor to fuse."""
    inputs, grad = _inputs(torch.bfloat16)
    compiled = torch.compile(lambda *t: ops.hc_post(*t), backend="aot_eager", fullgraph=True)
    for got, want in zip(_run(compiled, inputs, grad), _run(ops.hc_post.twin, inputs, grad), strict=True):
        assert torch.equal(got, want)
