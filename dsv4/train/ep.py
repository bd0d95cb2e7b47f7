"""Expert parallel (EP) training: routed expert e of every main-model MoE layer lives only on rank e // (E / world).

Those experts are outside FSDP and never reduced: every rank runs its experts over EVERY rank's tokens, so their
gradient is complete where it is computed. The token exchange uses only all_gather and all_reduce, which gloo has
(it has neither all_to_all nor reduce_scatter):

  forward   x, routing weights, expert ids of this rank's n_r rows --all_gather--> all N rows (ranks hold
            different token counts: rows are padded to the largest count and cut back) -> the model's own
            `MoE.routed_loop` over the N rows, which skips the experts this rank does not hold -> partial sums
            [N, D] --all_reduce--> keep this rank's rows.
  backward  of "all_reduce, keep own rows": all_gather of the ranks' row gradients (rank s's partial sum feeds
            every rank's rows with weight 1); of "all_gather": all_reduce of the gradients of the gathered rows
            (every rank's experts used this rank's rows), keep own rows.

Cost per MoE layer: each rank holds all N rows and an [N, D] fp32 partial sum, and the all_reduce moves N x D
fp32 where an all_to_all (NCCL) would move only the routed rows' k/E share; recomputation for gradient
checkpointing repeats the forward exchange. The exchange runs on a process group of its own.
NOTE: the MTP blocks keep their experts FSDP-sharded: `mtp_loss_sum` calls them once per document and ranks hold
different numbers of documents, so a collective inside would not pair up across ranks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv4.train.dist import DistContext

# Checkpoint names of the expert-parallel tensors (main-model layers only; `mtp.*` experts are not EP).
EP_NAME = re.compile(r"^layers\.\d+\.ffn\.experts\.\d+\.")


@dataclass(frozen=True, eq=False)
class ExpertExchange:
    """`MoE.exchange`: routed experts of this rank over every rank's rows; returns this rank's rows' sum."""

    group: Any
    rank: int
    world: int

    def __call__(self, routed, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        counts = self.row_counts(x.shape[0], x.device)
        xs, ws = GatherRows.apply(self, counts, x, weights)
        return SumOwnRows.apply(self, counts, routed(xs, ws, self.gather(ids, counts)))

    def row_counts(self, n: int, device) -> list[int]:
        mine = torch.tensor([n], dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        return [int(p) for p in parts]

    def gather(self, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """[counts[rank], ...] on each rank -> [sum(counts), ...], rank order, on every rank."""
        padded = t.new_zeros((max(counts), *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    def sum_own_rows(self, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """[sum(counts), ...] on each rank -> the sum over ranks, this rank's rows only."""
        t = t.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t, group=self.group)
        lo = sum(counts[: self.rank])
        return t[lo: lo + counts[self.rank]]


class GatherRows(torch.autograd.Function):
    """Every rank's rows of each tensor, concatenated in rank order (differentiable)."""

    @staticmethod
    def forward(ctx, ex: ExpertExchange, counts: list[int], *tensors: torch.Tensor):
        ctx.ex, ctx.counts = ex, counts
        return tuple(ex.gather(t, counts) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        return None, None, *(None if g is None else ctx.ex.sum_own_rows(g, ctx.counts) for g in grads)


class SumOwnRows(torch.autograd.Function):
    """The sum over ranks of a per-rank [N, ...] tensor, this rank's rows (differentiable)."""

    @staticmethod
    def forward(ctx, ex: ExpertExchange, counts: list[int], t: torch.Tensor):
        ctx.ex, ctx.counts = ex, counts
        return ex.sum_own_rows(t, counts)

    @staticmethod
    def backward(ctx, grad):
        return None, None, ctx.ex.gather(grad.contiguous(), ctx.counts)


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [layer.ffn for layer in model.layers]


def install(model: nn.Module, ctx: DistContext) -> None:
    """Drop the other ranks' routed experts of every main-model MoE layer and route through the exchange.
    Collective (creates the exchange's process group); nothing to do in one process."""
    if not ctx.enabled:
        return
    n = model.cfg.n_routed_experts
    if n % ctx.world:
        raise ValueError(f"expert parallel: n_routed_experts={n} is not divisible by the {ctx.world} processes")
    ex = ExpertExchange(dist.new_group(list(range(ctx.world))), ctx.rank, ctx.world)
    for moe in moe_layers(model):
        for e in range(n):
            if e // (n // ctx.world) != ctx.rank:
                moe.experts[e] = None
        moe.exchange = ex


def local_expert_params(model: nn.Module) -> set[nn.Parameter]:
    """Parameters of this rank's expert-parallel experts (FSDP must leave them alone)."""
    return {p for moe in moe_layers(model) if moe.exchange is not None
            for ex in moe.experts if ex is not None for p in ex.parameters()}


def enabled(model: nn.Module) -> bool:
    return any(moe.exchange is not None for moe in moe_layers(model))


def gather_experts(values: dict[str, torch.Tensor], model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Checkpoint-name values with the expert-parallel experts of every rank added, on rank 0 (the other ranks
    get their own values back). Collective when expert parallel is on."""
    if not (ctx.enabled and enabled(model)):
        return values
    mine = {n: t.detach().cpu() for n, t in values.items() if EP_NAME.match(n)}
    parts = [None] * ctx.world if ctx.main else None
    dist.gather_object(mine, parts, dst=0)
    if not ctx.main:
        return values
    out = dict(values)
    for rank, part in enumerate(parts):
        clash = sorted(set(part) & set(out)) if rank else []
        if clash:
            raise RuntimeError(f"expert parallel: rank {rank} holds tensors rank 0 holds too: {clash[:5]}")
        out.update(part)
    return out
