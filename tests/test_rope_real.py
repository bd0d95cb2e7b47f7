"""RoPE's two forms (dsv4/model/rope.py): the complex rotation (the reference's, used eagerly) and the real
(cos, sin) form used inside torch.compile traces, which inductor can fuse.
No tolerance: both read torch.polar's table, and the real form's products are the same fp32 operations in the
same order as torch's complex multiply, so the two are equal bit for bit on the CPU (a GPU may contract a*c - b*d
into an FMA in either kernel: the fp32 class there)."""

import pytest
import torch

from dsv4.config import tiny_config
from dsv4.model.rope import Rotary, _rotate_complex, _rotate_real


def _rotary(compressed: bool) -> Rotary:
    return Rotary(tiny_config(), compressed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("heads", [False, True])
def test_real_form_equals_complex_form_bit_for_bit_given_the_same_table(dtype, inverse, heads):
    rot = _rotary(compressed=True)
    g = torch.Generator().manual_seed(int(inverse) + 2 * int(heads))
    pos = torch.randint(0, 1 << 20, (2, 5), generator=g)
    cis = rot.cis(pos)                                                        # complex [2, 5, dim/2]
    shape = (2, 5, 3, rot.dim) if heads else (2, 5, rot.dim)
    pairs = torch.randn(shape, generator=g, dtype=dtype).unflatten(-1, (-1, 2))
    want = _rotate_complex(pairs, cis, inverse)
    got = _rotate_real(pairs, torch.view_as_real(cis), inverse)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


def test_inverse_undoes_the_rotation_in_the_real_form():
    rot = _rotary(compressed=False)
    pos = torch.arange(7)
    pairs = torch.randn(7, rot.dim, dtype=torch.float64).unflatten(-1, (-1, 2))
    cs = torch.view_as_real(rot.cis(pos)).double()
    back = _rotate_real(_rotate_real(pairs, cs, False).unflatten(-1, (-1, 2)), cs, True)
    # the fp32 table's cos^2 + sin^2 is 1 only to ~2^-24: that, not the float64 arithmetic, bounds the round trip
    torch.testing.assert_close(back, pairs.flatten(-2), rtol=0, atol=1e-6)
    assert (back - pairs.flatten(-2)).abs().max() > 0                       # (not vacuous: the table is fp32)


@pytest.mark.parametrize("compressed", [False, True])
def test_compiled_rotation_takes_the_real_form_and_equals_eager(compressed):
    """Inside a torch.compile trace `cis` returns (cos, sin) pairs (no complex multiply reaches the graph) and the
    rotation (forward and inverse; fp32 and bf16 in and out, as in the model) equals the eager complex one."""
    rot = _rotary(compressed)
    g = torch.Generator().manual_seed(3)
    pos = torch.randint(0, 1 << 20, (1, 9), generator=g)
    x = torch.randn(1, 9, 4, 2 * rot.dim, generator=g)
    forms = []

    def run(x, pos):
        cis = rot.cis(pos)
        forms.append(cis.is_complex())
        y = rot(x, cis)
        return y, rot(y, cis, inverse=True)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager", dynamic=True)
    for xs in (x, x.bfloat16()):
        got, want = compiled(xs, pos), run(xs, pos)
        for g_, w_ in zip(got, want, strict=True):
            assert g_.dtype == w_.dtype == xs.dtype
            assert torch.equal(g_, w_)
    assert forms == [False, True] * 2           # per dtype: traced (real form), then eager (complex)


def test_compiled_table_is_polars_table():
    rot = _rotary(compressed=True)
    pos = torch.randint(0, 1 << 20, (4096,), generator=torch.Generator().manual_seed(5))
    real = torch.compile(lambda p: rot.cis(p), fullgraph=True, backend="aot_eager")(pos)
    assert real.shape == (4096, rot.dim // 2, 2) and not real.is_complex()
    assert torch.equal(real, torch.view_as_real(rot.cis(pos)))
