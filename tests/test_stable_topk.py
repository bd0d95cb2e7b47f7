"""`ops.stable_topk` (the indexer's top-k): the selection path returns exactly the indices of the stable
descending sort (the twin), including ties (FP4-quantised scores tie often), -inf (not yet visible entries) and
rows with fewer finite entries than k. Integer indices: compared bit for bit."""

from __future__ import annotations

import pytest
import torch

from dsv4 import ops
from dsv4.ops.ref import stable_topk as _sorted_twin
from dsv4.ops.registry import which
from dsv4.ops.topk import select_then_sort


def _scores(n: int, t: int, levels: int | None, dtype, seed: int) -> torch.Tensor:
    """[1, n, t] scores; `levels` distinct values (heavy ties) or continuous; causal-style -inf masks: query i sees
    the first i // 4 entries, as the indexer's ratio-4 keys."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(1, n, t, generator=gen)
    if levels:
        s = torch.randint(0, levels, (1, n, t), generator=gen).float()
    visible = (torch.arange(n) // 4 + 1).unsqueeze(1)
    return s.to(dtype).masked_fill(torch.arange(t) >= visible, float("-inf"))


@pytest.mark.parametrize("levels", [None, 3, 40], ids=["continuous", "3-levels", "40-levels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_selection_equals_the_stable_sort(levels, dtype, k):
    score = _scores(300, 80, levels, dtype, seed=k)               # rows with 1..75 visible: some fewer than k
    assert torch.equal(select_then_sort(score, k), _sorted_twin(score, k))


def test_selection_equals_the_stable_sort_on_long_rows():
    score = _scores(64, 4096, 7, torch.bfloat16, seed=0)
    score[0, 40:] = score[0, 40:].clamp(max=2)                      # many rows with a full tie at the k-th value
    assert torch.equal(select_then_sort(score, 16), _sorted_twin(score, 16))


def test_dispatch_keeps_the_twin_off_cuda_and_without_the_switch(monkeypatch):
    score = _scores(8, 2048, None, torch.float32, seed=1)
    monkeypatch.setenv("DSV4_STABLE_TOPK", "1")
    assert which("stable_topk", score, 16) == "twin"              # CPU
    assert torch.equal(ops.stable_topk(score, 16), _sorted_twin(score, 16))


@pytest.mark.gpu
def test_selection_on_cuda_at_training_length(monkeypatch):
    """64k tokens: [queries, 16,384 keys] rows; FP4-like ties; the switch routes the indexer's calls here."""
    score = _scores(2048, 16384, 15, torch.bfloat16, seed=2).cuda()
    monkeypatch.setenv("DSV4_STABLE_TOPK", "1")
    assert which("stable_topk", score, 16) == "select_then_sort"
    assert torch.equal(ops.stable_topk(score, 16), _sorted_twin(score, 16))
    monkeypatch.setenv("DSV4_STABLE_TOPK", "0")
    assert which("stable_topk", score, 16) == "twin"
