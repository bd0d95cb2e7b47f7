"""`ops.widened_dense`: the fp32 product of an upcast 16-bit activation, on bf16 tensor cores where it can be.

Precision class (written down here, asserted below): every product of two bf16 values is exact in fp32, so the fast
path differs from the fp32 GEMM only in how the fp32 sums round. Against the float64 product, each element's error
stays within the fp32 summation bound K * 2^-23 * sum_k |x_k w_k| (the recursive-summation bound with a unit of
2^-23, room for a tensor core that truncates its partial sums), and the largest error stays below 2^-16 of the
largest output: an fp32-class result, 2^7 times tighter than a bf16 rounding of the output (2^-9), so a path that
rounded its output or its weights to bf16 fails it.
On the CPU: the split's exactness, the twin, the dispatch rules, the loader's bf16 holding (bit-equal model output
against the same model widened) and training's widening. On the GPU: the bound at Flash's shapes.
"""

from __future__ import annotations

import pytest
import torch

from dsv4 import ops
from dsv4.ops.registry import which
from dsv4.ops.widened_dense import SPLIT_MIN_ROWS, bf16_split


def _weights(gen: torch.Generator, n: int, k: int) -> torch.Tensor:
    """fp32 weights over many binades (exponents -60..+20), signs mixed, some zeros and some bf16-exact values."""
    w = torch.randn(n, k, generator=gen) * torch.exp2(torch.randint(-60, 20, (n, k), generator=gen).float())
    w[0, :7] = 0.0
    w[1] = w[1].bfloat16().float()
    return w


def test_bf16_split_is_exact():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    w = _weights(gen, 64, 256)
    parts = bf16_split(w)
    assert parts.dtype == torch.bfloat16 and parts.shape == (192, 256)
    hi, mid, lo = parts.double().view(3, 64, 256)
    assert torch.equal(hi + mid + lo, w.double())                    # float64 holds the three-term sum exactly
    assert torch.equal(hi, w.bfloat16().double())                    # hi is W rounded: the largest part first
    assert torch.equal(parts[128:192][1], torch.zeros(256, dtype=torch.bfloat16))   # bf16-exact rows: mid = lo = 0


def test_twin_is_dense_of_the_widened_activation():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=gen).bfloat16()
    w32 = torch.randn(24, 64, generator=gen)
    for w in (w32, w32.bfloat16()):
        got = ops.widened_dense(x, w)
        assert got.dtype == torch.float32 and got.shape == (2, 5, 24)
        assert torch.equal(got, ops.dense(x.float(), w, x.dtype))
    x64 = torch.randn(3, 64, generator=gen, dtype=torch.float64)
    assert torch.equal(ops.widened_dense(x64, w32), x64 @ w32.double().t())


def test_dispatch_rules():
    """Tensor cores for bf16 activations on CUDA without autograd: any row count with a bf16 weight, from
    SPLIT_MIN_ROWS rows with an fp32 one; the twin everywhere else."""
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert which("widened_dense", x, torch.zeros(8, 64)) == "twin"                            # CPU
    if not torch.cuda.is_available():
        return
    big = torch.zeros(SPLIT_MIN_ROWS, 64, dtype=torch.bfloat16, device="cuda")
    w16, w32 = torch.zeros(8, 64, dtype=torch.bfloat16, device="cuda"), torch.zeros(8, 64, device="cuda")
    assert which("widened_dense", big[:1], w16) == "tensor_core_widened_dense"
    assert which("widened_dense", big[:-1], w32) == "twin"
    assert which("widened_dense", big, w32) == "tensor_core_widened_dense"
    assert which("widened_dense", big.half(), w16) == "twin"
    with torch.enable_grad():
        assert which("widened_dense", big, w16) == "tensor_core_widened_dense"     # grad on, nothing to train
        assert which("widened_dense", big.requires_grad_(), w16) == "twin"
        assert which("widened_dense", big.detach(), w16.requires_grad_()) == "twin"


def test_bf16_model_holds_the_bf16_matrices_and_computes_the_same_bits(tiny_ckpt):
    """A bf16 model holds the compressors' and routers' matrices as stored; its output equals, bit for bit, the
    same model with them widened to fp32 (what the loader held before): the twin's upcast is exact."""
    from dsv4.loader import load_model
    from dsv4.model.state import fresh_state
    from dsv4.train.params import widen_held_bf16

    held = load_model(tiny_ckpt, dtype=torch.bfloat16, progress=False)
    names = held.held_bf16
    assert names and all(held.get_parameter(n).dtype == torch.bfloat16 for n in names)
    widened = widen_held_bf16(load_model(tiny_ckpt, dtype=torch.bfloat16, progress=False))
    assert widened.held_bf16 == () and all(widened.get_parameter(n).dtype == torch.float32 for n in names)
    ids = torch.randint(0, held.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (held, widened):
        state, batch = fresh_state(model.cfg, 1, 40, model.dtype, ids.device)
        outs.append(model.step(ids, batch, state))
    assert torch.equal(outs[0], outs[1])


def test_prepare_full_trains_the_held_matrices_in_fp32(tiny_ckpt):
    from dsv4.loader import load_model
    from dsv4.train.params import prepare_full

    model = load_model(tiny_ckpt, dtype=torch.bfloat16, progress=False)
    names = model.held_bf16
    prepare_full(model)
    for n in names:
        p = model.get_parameter(n)
        assert p.dtype == torch.float32 and p.requires_grad == (".indexer." not in n), n


@pytest.mark.gpu
@pytest.mark.parametrize("rows, n, k, wdtype", [
    (1, 1024, 4096, torch.bfloat16), (7, 256, 4096, torch.bfloat16), (64, 1024, 4096, torch.bfloat16),
    (2048, 1024, 4096, torch.bfloat16), (1024, 24, 16384, torch.float32), (4096, 256, 4096, torch.float32)])
def test_fp32_class_against_float64_on_cuda(rows, n, k, wdtype):
    """Flash's shapes (compressor wkv 1024 x 4096, router 256 x 4096, mHC's fn 24 x 16384): the fast path's
    error against float64 within the fp32 summation bound, and fp32-class (see the module docstring)."""
    gen = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(rows, k, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).to(wdtype)
    assert which("widened_dense", x, w) == "tensor_core_widened_dense"
    got = ops.widened_dense(x, w)
    exact = x.double() @ w.double().t()
    err = (got.double() - exact).abs()
    bound = k * 2.0 ** -23 * (x.double().abs() @ w.double().abs().t())
    assert got.dtype == torch.float32 and bool((err <= bound).all()), float((err / bound).max())
    assert float(err.max()) <= 2.0 ** -16 * float(exact.abs().max()), float(err.max() / exact.abs().max())
    with ops.reference_only():                                     # the fp32 GEMM it replaces, same class
        plain = ops.widened_dense(x, w)
    assert bool(((plain.double() - exact).abs() <= bound).all())
