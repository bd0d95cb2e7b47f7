"""`ops.ref.mean_square` (the RMS norms' mean of squares, with a one-product backward) gives the values and
gradients of `x.square().mean(-1, keepdim=True)` under autograd bit for bit: alone, inside an RMS norm whose input
has several consumers (the order in which autograd sums them must not change), and for a whole training step."""

from __future__ import annotations

import random

import pytest
import torch

import dsv4
from dsv4.model import attention, primitives
from dsv4.ops import hc_mix
from dsv4.ops.ref import mean_square
from dsv4.train.data import Document
from dsv4.train.forward import TrainStep, packed_batch
from dsv4.train.params import prepare_full


def _plain(x):
    return x.square().mean(-1, keepdim=True)


def _norm_and_more(ms, x, w):
    """An RMS norm whose input also feeds two other products (4 gradient contributions to x)."""
    y = x * torch.rsqrt(ms(x) + 1e-6) * w
    return y, (x * w).sum(-1), x.exp().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_values_and_gradients_bit_identical(dtype):
    g = torch.Generator().manual_seed(0)
    # magnitudes 1e-20..1e5 across rows (tiny squares and tiny gradients included), 96 and 128 wide
    for width in (96, 128):
        x = (torch.randn(6, 7, width, generator=g) * torch.logspace(-20, 5, 7).view(1, 7, 1)).to(dtype)
        w = torch.randn(width, generator=g).to(dtype)
        grads = [torch.randn(6, 7, width, generator=g).to(dtype), torch.randn(6, 7, generator=g).to(dtype)]
        results = []
        for ms in (_plain, mean_square):
            leaf = x.clone().requires_grad_(True)
            y, s, e = _norm_and_more(ms, leaf, w)
            loss = (y * grads[0]).sum() + (s * grads[1]).sum() + e
            results.append((ms(leaf), y, *torch.autograd.grad(loss, leaf)))
        for a, b in zip(*results, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_no_autograd_runs_the_plain_expression():
    x = torch.randn(3, 8, requires_grad=True)
    with torch.no_grad():
        assert mean_square(x).grad_fn is None and torch.equal(mean_square(x), _plain(x))
    assert type(mean_square(x).grad_fn).__name__ == "_MeanSquareBackward"


def _loss_and_grads(model, docs):
    model.zero_grad(set_to_none=True)
    ce, mtp, _, _ = TrainStep(model, False, mtp_weight=1.0)(packed_batch(docs, "cpu"))
    (ce + mtp).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return torch.stack([ce.detach(), mtp.detach()]), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_bit_identical(tiny_ckpt, monkeypatch, dtype):
    """QAT and MTP on: loss and every gradient as with autograd's backward of the plain expression (the RMSNorms,
    the mHC mixes' RMS and the query norm), except gradients that two plain runs do not reproduce either (sums in
    thread order: compared at the plain runs' own difference)."""
    model = prepare_full(dsv4.load_model(tiny_ckpt, dtype=dtype, quant_emulation=True, progress=False), qat=True)
    rng = random.Random(5)
    docs = [Document([rng.randrange(512) for _ in range(n)], [True] * n) for n in (60, 37)]
    fast = _loss_and_grads(model, docs)
    for module in (primitives, hc_mix, attention):
        monkeypatch.setattr(module, "mean_square", _plain)
    plain, again = _loss_and_grads(model, docs), _loss_and_grads(model, docs)
    assert torch.equal(fast[0], plain[0])
    unordered = {n for n in plain[1] if not torch.equal(plain[1][n], again[1][n])}
    assert len(unordered) < len(plain[1]) // 4 and fast[1].keys() == plain[1].keys()
    for name, grad in fast[1].items():
        if name in unordered:
            spread = (plain[1][name] - again[1][name]).abs().max()
            torch.testing.assert_close(grad, plain[1][name], rtol=0, atol=2 * spread.item(), msg=name)
        else:
            assert torch.equal(grad, plain[1][name]), name
