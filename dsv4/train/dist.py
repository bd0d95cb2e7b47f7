"""Data parallel training with FSDP2 (`torch.distributed.fsdp.fully_shard`) under `torchrun`.

Every block is its own FSDP unit; the `TrainStep` wrapper is the root unit and owns the rest (embedding, head,
final norm, MTP blocks: those are used outside their own `__call__`, so they must be unsharded with the root).
Gradients are SUMMED across ranks (divide factor 1): each rank's loss is already divided by the GLOBAL number
of target tokens, so the sum is the gradient of the one global loss, identical to a single-process run.
Backend: NCCL on CUDA, gloo on CPU (the CI test).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_from_env(device: torch.device) -> DistContext:
    """A DistContext from torchrun's environment (WORLD_SIZE > 1), else the single-process one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())


def shard(step_module: nn.Module, ctx: DistContext, local_experts: set[nn.Parameter] = frozenset()) -> nn.Module:
    """Apply FSDP2 to the model's blocks and the root; integer / frozen-by-design tensors stay replicated, and
    `local_experts` (expert parallel, `train/ep.py`) stay this rank's own: never sharded, never reduced."""
    from torch.distributed.fsdp import fully_shard

    if not ctx.enabled:
        return step_module
    ignored = {p for p in step_module.parameters() if not p.is_floating_point()} | set(local_experts)
    for layer in step_module.model.layers:
        fully_shard(layer, ignored_params={p for p in layer.parameters() if p in ignored})
    fully_shard(step_module, ignored_params=ignored)
    for m in step_module.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)     # gloo has no PREMUL_SUM
    return step_module
