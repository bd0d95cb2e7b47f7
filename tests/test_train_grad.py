"""Backward of every trained component, checked against finite differences in float64 (torch gradcheck).

The model is the tiny checkpoint loaded in float64 with the QAT emulation off (fake-quant rounding has no
derivative) and its FP8/FP4 linears turned into trainable float64 weights. `fast_mode` checks a random
projection of the Jacobian (v^T J u), so each check costs a few forwards whatever the input size.
Tolerances: gradcheck's float64 defaults (atol 1e-5, rtol 1e-3) with eps 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import dsv4
from dsv4.model.hyper import hc_post, hc_pre
from dsv4.model.state import StepBatch
from dsv4.train.forward import layer_state
from dsv4.train.params import prepare_full


@pytest.fixture(scope="module")
def model64(tiny_ckpt):
    m = dsv4.load_model(tiny_ckpt, dtype=torch.float64, quant_emulation=False, progress=False)
    return prepare_full(m).double()


def _check(module, fn, x, param_names):
    """gradcheck of fn(module with the named params as inputs, x) w.r.t. x and those params."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters() if n in param_names}
    assert len(params) == len(param_names), sorted(set(param_names) - set(params))

    def f(x, *ps):
        return fn(lambda *a: functional_call(module, dict(zip(params, ps, strict=True)), a), x)

    inputs = (x.detach().clone().requires_grad_(True), *params.values())
    # Every input must actually receive a gradient, or the check would pass vacuously (0 == 0).
    grads = torch.autograd.grad(f(*inputs).square().sum(), inputs, allow_unused=True)
    dead = [n for n, g in zip(["x", *params], grads, strict=True) if g is None or not g.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    assert gradcheck(f, inputs, fast_mode=True, eps=1e-6)


def _x(n, dim, seed=0):
    return torch.randn(1, n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("layer_id,n", [(0, 24), (1, 24), (2, 131)], ids=["sliding", "csa", "hca"])
def test_attention_gradcheck(model64, layer_id, n):
    attn = model64.layers[layer_id].attn
    batch = StepBatch.build([(0, 0, n, [0])], "cpu")
    cis = attn.rotary.cis(batch.positions).unsqueeze(0)

    def fn(call, x):
        return call(x, cis, batch, layer_state(model64, layer_id, batch))

    names = ["attn_sink", "wkv.weight", "wo_b.weight"] + (["compressor.ape", "compressor.wkv.weight"]
                                                            if layer_id else [])
    _check(attn, fn, _x(n, model64.cfg.dim), names)


@pytest.mark.parametrize("layer_id", [1, 2], ids=["ratio4-overlap", "ratio128"])
def test_compressor_gradcheck(model64, layer_id):
    comp = model64.layers[layer_id].attn.compressor
    n = 2 * comp.ratio + 1
    _check(comp, lambda call, x: call(x), _x(n, model64.cfg.dim, 1), ["ape", "wkv.weight", "wgate.weight"])


def test_mhc_gradcheck(model64):
    """hc_pre (RMS over the streams, Sinkhorn split) then hc_post, w.r.t. streams and all mHC parameters."""
    block, cfg = model64.layers[0], model64.cfg
    h = torch.randn(1, 3, cfg.hc_mult, cfg.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def f(h, fn, scale, base):
        x, post, comb = hc_pre(h, fn, scale, base, cfg)
        return hc_post(torch.tanh(x), h, post, comb)

    args = [t.detach().clone().requires_grad_(True) for t in (h, block.hc_attn_fn, block.hc_attn_scale,
                                                               block.hc_attn_base)]
    assert gradcheck(f, args, fast_mode=True, eps=1e-6)


@pytest.mark.parametrize("layer_id", [0, 2], ids=["hash", "topk"])
def test_moe_gradcheck(model64, layer_id):
    moe = model64.layers[layer_id].ffn
    ids = torch.randint(0, model64.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    names = ["gate.weight", "experts.0.w1.weight", "shared_experts.w2.weight"]
    _check(moe, lambda call, x: call(x, ids), _x(6, model64.cfg.dim, 4), names)


def test_swiglu_clamp_gradcheck(model64):
    """Inputs scaled so that many gate and up values sit beyond the clamp (limit 10) on both sides."""
    expert = model64.layers[0].ffn.shared_experts
    x = _x(8, model64.cfg.dim, 5) * 12
    with torch.no_grad():
        up = expert.w3(x)
        gate = expert.w1(x)
    assert (up.abs() > expert.swiglu_limit).any() and (gate > expert.swiglu_limit).any()
    weights = torch.rand(1, 8, 1, dtype=torch.float64)
    _check(expert, lambda call, x: call(x, weights), x, ["w1.weight", "w3.weight"])


def test_fake_quant_gradients_are_straight_through():
    """The QAT emulation's roundings pass gradients unchanged, however small (autograd through the float8 cast
    would round them to e4m3 and flush everything below 2**-9 to zero)."""
    from dsv4 import ops
    from dsv4.quant import fake_quant_fp4, fake_quant_fp8

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 256, generator=gen, requires_grad=True)
    g = torch.randn(3, 256, generator=gen) * 1e-6
    for fq in (lambda t: fake_quant_fp8(t, 64), lambda t: fake_quant_fp4(t, 32)):
        y = fq(x)
        assert torch.equal(y, fq(x.detach()))                              # forward value untouched
        assert torch.equal(torch.autograd.grad(y, x, g)[0], g)
    w = torch.randn(16, 256, generator=gen, dtype=torch.float64)
    y = ops.linear(x, w, None, "fp8", True, dequantized=w)
    g = torch.randn(3, 16, generator=gen) * 1e-6
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], (g.double() @ w).float())
