"""The split vocabulary reductions (`dsv4.ops.rowwise`) against torch's own (their twin): exact equality, integer
results, so no tolerance; ties and non-finite values placed where the two-stage split could go wrong."""

import pytest
import torch

from dsv4.ops.rowwise import all_finite, argmax_rows, chunks_for

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
@pytest.mark.parametrize("shape", [(1, V), (3, V), (2, 5, V), (4, 6144), (2, 1000), (V,)])
def test_argmax_equals_torch_on_random_rows(device, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(device)
    assert torch.equal(argmax_rows(x), x.argmax(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_ties_take_the_first_index_like_torch(device, dtype):
    """The maximum repeated inside one chunk, in two chunks, at a chunk's last and the next chunk's first element:
    the first occurrence wins, as in torch.argmax."""
    width = V // chunks_for(V)
    for places in ([5, 7], [3 * width + 9, 2 * width + 400], [width - 1, width], [V - 1, V - 2], [0, V - 1]):
        x = torch.randn(2, V, generator=torch.Generator().manual_seed(places[0])).to(device, dtype)
        x[0, places] = 10.0
        x[1, places[::-1]] = 10.0
        got = argmax_rows(x)
        assert torch.equal(got, x.argmax(-1))
        assert got.tolist() == [min(places)] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_of_a_row_with_nan_points_at_a_nan(device):
    x = torch.randn(2, V, generator=torch.Generator().manual_seed(1)).to(device)
    x[0, 70000] = float("nan")
    x[1, [5, 90000]] = float("inf")
    got = argmax_rows(x)
    assert torch.isnan(x[0, got[0]]) and got[1].item() == 5
    assert torch.equal(got, x.argmax(-1))


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
