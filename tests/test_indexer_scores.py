"""`ops.indexer_scores`, the lightning indexer's scores (`ops/indexer_scores.py`): the twin is the formula the model
used before the op existed, bit for bit (so the model's CPU results do not change)."""

from __future__ import annotations

import pytest
import torch

from dsv4 import ops
from dsv4.ops.registry import which

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _formula_before_the_op(w, q, keys, visible):
    """`Indexer.weighted_scores` and `select`'s mask as they were written before `ops.indexer_scores`."""
    acc = ops.acc_dtype(q.dtype) if q.dtype == torch.float32 else q.dtype
    dots = torch.einsum("bshd,btd->bsht", q.to(acc), keys.to(acc)).to(q.dtype)
    score = (dots.relu() * w.unsqueeze(-1)).sum(dim=2)
    return score.masked_fill(torch.arange(keys.shape[1]) >= visible.unsqueeze(-1), float("-inf"))


def _inputs(b, s, t, h, d, dtype, seed):
    """Weights of both signs at the model's scale (1/sqrt(h*d)), unit queries and keys."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(b, s, h, generator=g) * (h * d) ** -0.5).to(dtype)
    return w, torch.randn(b, s, h, d, generator=g).to(dtype), torch.randn(b, t, d, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_twin_is_the_formula_bit_for_bit(dtype):
    w, q, keys = _inputs(2, 37, 23, 16, 128, dtype, seed=1)
    visible = torch.arange(5, 5 + 37).unsqueeze(0).expand(2, -1) // 4          # rows with 1..10 of 23 visible
    visible = visible.clone()
    visible[1, :3] = 0                                                           # rows that see nothing
    got = ops.indexer_scores(w, q, keys, visible)
    want = _formula_before_the_op(w, q, keys, visible)
    assert got.dtype == dtype and torch.equal(got, want)
    unmasked = ops.indexer_scores(w, q, keys)
    assert torch.equal(unmasked, _formula_before_the_op(w, q, keys, torch.full((2, 37), 23)))


def test_dispatch_takes_the_twin_on_cpu(monkeypatch):
    monkeypatch.setenv("DSV4_INDEXER_KERNEL", "1")
    w, q, keys = _inputs(1, 4, 8, 16, 128, torch.bfloat16, seed=2)
    assert which("indexer_scores", w, q, keys, None) == "twin"
