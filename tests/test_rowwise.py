"""The split finite-logits check (`dsv4.ops.rowwise.all_finite`) against torch's own (its twin): a boolean, so
no tolerance; non-finite values placed where the two-stage split could go wrong (chunk and row edges)."""

import pytest
import torch

from dsv4.ops.rowwise import all_finite, chunks_for

V = 129280                              # Flash's vocabulary: 128 chunks of 1010
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]       # gpu: skipped without CUDA (conftest)


def test_chunks_divide_the_row_into_long_enough_pieces():
    assert chunks_for(V) == 128
    assert chunks_for(6144) == 8        # the built-in model's vocabulary: 8 chunks of 768
    assert chunks_for(1000) == 1        # no power-of-two split leaves 512-element chunks
    assert chunks_for(1024) == 2
    assert chunks_for(7 * 513) == 1     # odd: no power of two divides it
    assert chunks_for(7 * 512) == 4     # 896-element chunks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, V), (3, V), (4, 6144), (2, 1000)])
def test_all_finite_finds_any_nan_or_inf(device, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device)
    assert all_finite(x) is True
    n = x.numel()
    for flat in (0, n // 2, n - 1, shape[-1] - 1, shape[-1]):
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y.view(-1)[flat % n] = bad
            assert all_finite(y) is False, (flat, bad)
    assert all_finite(torch.tensor(1.0, device=device)) is True
    assert all_finite(torch.tensor(float("nan"), device=device)) is False
