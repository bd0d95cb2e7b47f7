"""The indexer's top-k as a dispatched op: the k best entries of each row in the order of a stable descending sort
(ties towards the earlier entry, -inf last), which is what makes chunked prefill and decode pick what a one-shot
prefill picks (`model/indexer.py`). The twin (`ops.ref.stable_topk`) sorts every row in full: at training
lengths that is the indexer's largest cost ([T, T/4] scores per CSA layer: 1.07 G elements at 64k tokens;
bench/notes/train_speed.md). The fast path selects instead of sorting (a top-k, a comparison, a running count of
ties, a top-k of positions, then a sort of only the k chosen), and returns the same indices bit for bit. Opt-in
(DSV4_STABLE_TOPK=1) until measured on the GPU.
"""

from __future__ import annotations

import torch

from dsv4.ops import ref
from dsv4.ops.registry import dispatch, env_switch, register

MIN_ROW = 1024          # shorter rows: one sort is a single small kernel; selection would launch more


def select_then_sort(score: torch.Tensor, k: int) -> torch.Tensor:
    """Same result as the twin for rows without NaN. Every entry above the k-th largest value is in; of the entries
    equal to it, the earliest ones fill the rest (a running count); the chosen k are listed in position order (a
    top-k of t - position over them: distinct keys) and stably sorted by value, which is the full sort's order."""
    t = score.shape[-1]
    kth = score.topk(k, dim=-1).values[..., -1:]
    above = score > kth
    tied = score == kth
    need = k - above.sum(-1, keepdim=True, dtype=torch.int32)
    take = above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= need))
    key = torch.where(take, t - torch.arange(t, device=score.device, dtype=torch.int32), 0)
    pos = key.topk(k, dim=-1).indices                                  # chosen entries, earliest first
    order = score.gather(-1, pos).sort(dim=-1, descending=True, stable=True).indices
    return pos.gather(-1, order)


stable_topk = dispatch("stable_topk", ref.stable_topk)


def _applies(score: torch.Tensor, k: int) -> bool:
    return score.is_cuda and score.shape[-1] >= MIN_ROW and k < score.shape[-1] and env_switch("DSV4_STABLE_TOPK")


register("stable_topk", "select_then_sort", _applies, select_then_sort)
