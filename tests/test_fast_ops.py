"""Fast ops against their plain twins (the definition) and a float64 reference.

Tolerances by precision class: the cached-bf16 linear is exact in its inputs (FP8/FP4 weights and FP8
activations are bf16 numbers), so against the twin only the summation order and the final bf16 rounding differ:
relative error <= 2**-7 (two bf16 ulps) per element after the output rounding, and the same result as a float64
product of the same operands rounded once (cosine >= 0.99999).
"""

from __future__ import annotations

import pytest
import torch

from dsv4 import ops
from dsv4.ops.cached_linear import cached_linear
from dsv4.quant import fake_quant_fp8, quant_fp4, quant_fp8


def _weights(fmt, out_f, in_f, gen):
    w = torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5
    return quant_fp8(w) if fmt == "fp8" else quant_fp4(w)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("act_quant_on", [True, False])
def test_cached_linear_equals_the_twin(fmt, act_quant_on):
    gen = torch.Generator().manual_seed(hash((fmt, act_quant_on)) % 2**31)
    weight, scale = _weights(fmt, 384, 512, gen)
    x = (torch.randn(7, 512, generator=gen) * 3).bfloat16()
    got = cached_linear(x, weight, scale, fmt, act_quant_on)
    want = ops.linear.twin(x, weight, scale, fmt, act_quant_on)
    xq = fake_quant_fp8(x, 128) if act_quant_on else x
    exact = (xq.double() @ ops.dequant_weight(weight, scale, fmt).double().T).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    rel = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-2)).max().item()
    assert rel <= 2**-7, rel
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(), exact.double().flatten(), dim=0).item()
    assert cos >= 0.99999


def test_cached_weight_follows_writes():
    gen = torch.Generator().manual_seed(5)
    weight, scale = _weights("fp8", 128, 128, gen)
    x = torch.randn(2, 128, generator=gen).bfloat16()
    first = cached_linear(x, weight, scale, "fp8", False)
    with torch.no_grad():
        scale.copy_(scale.float().mul(2).to(scale.dtype))           # every block scale doubles
    assert torch.equal(cached_linear(x, weight, scale, "fp8", False), (first.float() * 2).bfloat16())


def test_dispatch_uses_the_twin_on_cpu_and_inside_reference_only(monkeypatch):
    calls = []
    ops.registry.register("linear", "spy", lambda *a, **k: True, lambda *a, **k: calls.append(1) or "fast")
    try:
        gen = torch.Generator().manual_seed(6)
        weight, scale = _weights("fp8", 128, 128, gen)
        x = torch.randn(1, 128, generator=gen).bfloat16()
        assert ops.linear(x, weight, scale, "fp8", True) == "fast"
        with ops.reference_only():
            assert isinstance(ops.linear(x, weight, scale, "fp8", True), torch.Tensor)
        monkeypatch.setenv("DSV4_FAST_OPS", "0")
        assert isinstance(ops.linear(x, weight, scale, "fp8", True), torch.Tensor)
        assert len(calls) == 1
    finally:
        ops.registry._FAST["linear"] = [f for f in ops.registry._FAST["linear"] if f[0] != "spy"]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_cached_linear_on_cuda_at_flash_dims(fmt):
    gen = torch.Generator().manual_seed(7)
    weight, scale = _weights(fmt, 2048, 4096, gen)
    x = torch.randn(64, 4096, generator=gen).bfloat16()
    got = ops.linear(x.cuda(), weight.cuda(), scale.cuda(), fmt, True).cpu()
    want = ops.linear.twin(x, weight, scale, fmt, True)
    rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert rel <= 1e-2, rel                                         # bf16 output class
