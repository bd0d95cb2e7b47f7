"""The bf16 small-M split-K kernel (`ops/triton/bf16_small_m.py`, `widened_dense`'s decode path with
on by default) against float64, alone and in a batch, eagerly and traced.

Precision class: the fp32 GEMM's. Every bf16 x bf16 product is exact in fp32; what is left is the order of fp32
additions: a 128-term dot per block, K / 128 / split block sums per split, `split` partials: n <= 128 + K / 128 +
split additions per output, |got - exact| <= n * 2^-24 * sum |x w| (plus one rounding of the result).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_helpers import interpreted_json

pytest.importorskip("dsv4.ops.triton.bf16_small_m", reason="needs triton")


def bound(k: int, split: int) -> float:
    return (128 + k // 128 + split + 1) * 2.0**-24


_CHECK = r'''
import json
import torch
from dsv4.ops.triton.bf16_small_m import bf16_small_m
from dsv4.ops.split_sum import sum_splits
gen = torch.Generator().manual_seed(71)
res = {}
for n, k, split in ((64, 384, 1), (128, 512, 2), (192, 1024, 4)):
    w = (torch.randn(n, k, generator=gen) / 8).bfloat16()
    w[3, 5] = 2.0**-130                                   # a bf16 subnormal weight: exact products still
    x = (torch.randn(40, k, generator=gen) * 3).bfloat16()
    exact = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    y = bf16_small_m(x, w, split_k=split)
    res[f"err-{n}x{k}-split{split}"] = ((y.double() - exact).abs() / mag).max().item()
    res[f"dtype-{n}x{k}"] = str(y.dtype)
    part = bf16_small_m(x, w, partials=True, split_k=split)
    res[f"partials-{n}x{k}"] = [list(part.shape), torch.equal(sum_splits(part), y)]
    alone = {i: bf16_small_m(x[i:i + 1], w, split_k=split) for i in (0, 15, 16, 39)}
    res[f"invariant-{n}x{k}"] = all(torch.equal(bf16_small_m(x[:m], w, split_k=split)[i:i + 1], alone[i])
                                    for m in (1, 16, 17, 40) for i in alone if i < m)
res["shape"] = list(bf16_small_m(torch.ones(2, 3, 384).bfloat16(), torch.ones(64, 384).bfloat16()).shape)
print(json.dumps(res))
'''


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return interpreted_json(_CHECK, tmp_path_factory.mktemp("bf16_small_m"))


def test_kernel_is_the_fp32_class_batch_invariant_and_its_partials_sum_to_it(interpreted):
    r = interpreted
    for n, k, split in ((64, 384, 1), (128, 512, 2), (192, 1024, 4)):
        err = r[f"err-{n}x{k}-split{split}"]
        assert err <= bound(k, split), (n, k, err)
        assert r[f"dtype-{n}x{k}"] == "torch.float32"
        assert r[f"partials-{n}x{k}"] == [[split, 40, n], True]       # the traced sum's bits are the kernel's
        assert r[f"invariant-{n}x{k}"]                                 # a row's bits do not depend on its batch
    assert r["shape"] == [2, 3, 64]


def test_bad_input_names_the_offender():
    from dsv4.ops.triton.bf16_small_m import bf16_small_m

    w = torch.zeros(64, 256, dtype=torch.bfloat16)
    for x, weight, words in ((torch.zeros(1, 256), w, "bf16"), (torch.zeros(1, 128, dtype=torch.bfloat16), w, "K"),
                             (torch.zeros(1, 256, dtype=torch.bfloat16), w[:40], "N")):
        with pytest.raises(ValueError, match=words):
            bf16_small_m(x, weight)


def test_dispatch_is_on_by_default_and_for_decode_rows(monkeypatch):
    """`widened_dense` takes the kernel by default (DSV4_BF16_SMALL_M=0 turns it off), on CUDA, for bf16 weights and
    <= 64 rows."""
    wd = importlib.import_module("dsv4.ops.widened_dense")        # (`dsv4.ops.widened_dense` is the op)

    class Cuda(torch.Tensor):                  # the predicate's view of a CUDA tensor, without a GPU
        @property
        def is_cuda(self):
            return True

    w = torch.zeros(256, 4096, dtype=torch.bfloat16).as_subclass(Cuda)
    x = torch.zeros(8, 4096, dtype=torch.bfloat16).as_subclass(Cuda)
    monkeypatch.setenv("DSV4_BF16_SMALL_M", "0")
    with torch.no_grad():
        assert not wd._fits_small_m(x, w)
        monkeypatch.delenv("DSV4_BF16_SMALL_M")
        assert wd._fits_small_m(x, w)
        assert not wd._fits_small_m(torch.zeros(65, 4096, dtype=torch.bfloat16).as_subclass(Cuda), w)
        assert not wd._fits_small_m(x, w.float())                     # mHC's fp32 fn keeps cuBLAS's GEMV
        assert not wd._fits_small_m(torch.zeros(8, 4096, dtype=torch.bfloat16), w.as_subclass(torch.Tensor))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [256, 512, 1024, 2048])
def test_kernel_at_flash_shapes_on_cuda(n, monkeypatch):
    """Flash's router (256) and compressor pairs (512 / 1024 / 2048 rows) at K 4096, M 1 / 8 / 64: within the fp32
    class of float64, a row's bits alone and in the batch, the dispatched op equal to the kernel, and the compiled
    op (partials added in the traced graph) equal to the eager kernel, bit for bit."""
    from dsv4 import ops
    from dsv4.ops.triton.bf16_small_m import bf16_small_m
    from dsv4.ops.triton.fp8_linear import kernel_plan

    monkeypatch.setenv("DSV4_BF16_SMALL_M", "1")
    gen = torch.Generator("cuda").manual_seed(n)
    w = (torch.randn(n, 4096, device="cuda", generator=gen) / 16).bfloat16()
    x = (torch.randn(64, 4096, device="cuda", generator=gen) * 2).bfloat16()
    with torch.inference_mode():
        y = bf16_small_m(x, w)
        exact = x.double() @ w.double().T
        mag = x.double().abs() @ w.double().abs().T
        assert ((y.double() - exact).abs() / mag).max().item() <= bound(4096, kernel_plan(64, n, 4096, x.device)[0])
        for m in (1, 8):
            assert torch.equal(bf16_small_m(x[:m], w), y[:m])
        assert ops.registry.which("widened_dense", x[:8], w) == "bf16_small_m_widened_dense"
        assert torch.equal(ops.widened_dense(x[:8], w), y[:8])
        compiled = torch.compile(lambda a: torch.relu(ops.widened_dense(a, w)), fullgraph=True)
        assert torch.equal(compiled(x[:8]), torch.relu(y[:8]))
