"""The parallel context: this process's rank, the tensor-parallel world size and the group of the model's collectives.

World size 1 is plain single-device code: every collective returns its input untouched, no torch.distributed call
is made and nothing needs initialising. Collectives return their result so model code reads `y = tp.all_reduce(y)`.
NOTE: every rank must issue the same collectives in the same order. That holds because every rank runs the same
model code on the same inputs (rank 0 broadcasts them, `dist/worker.py`) and every reduced tensor comes out of the
collective bit-identical on all ranks, so replicated decisions (routing, indexer top-k) agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class TPError(ValueError):
    """A model, checkpoint or launch that cannot run at the requested tensor-parallel size."""


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world: int = 1
    group: Any = None          # process group of the model's collectives (None = the default group)

    def split(self, n: int, what: str) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n items (spec §5.4); n must divide evenly."""
        if n % self.world:
            raise TPError(f"{what}={n} is not divisible by the tensor-parallel size {self.world}")
        size = n // self.world
        return self.rank * size, (self.rank + 1) * size

    def owner(self, index: int, n: int) -> int:
        """The rank holding item `index` of n split contiguously (expert E lives on rank E // (n / world))."""
        return index // (n // self.world)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' tensors concatenated along `dim`, rank order."""
        if self.world == 1:
            return t
        t = t.contiguous()
        out = t.new_empty((self.world * t.shape[0], *t.shape[1:]))           # ranks stacked along dim 0
        _all_gather_single(out, t, group=self.group)
        return torch.cat(out.view(self.world, *t.shape).unbind(0), dim=dim)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world > 1:
            dist.broadcast(t, src, group=self.group)
        return t


SINGLE = ParallelContext()
# torch 2.13 renamed all_gather_into_tensor (same contract); keep older torch working.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def torchrun_world() -> int:
    """WORLD_SIZE when this process was started by torchrun (or another env:// launcher), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str, local_rank: int) -> str:
    """The device of a local rank: cuda -> cuda:{base + local_rank}; cpu stays cpu."""
    d = torch.device(device)
    if d.type != "cuda":
        return str(d)
    return f"cuda:{(d.index or 0) + local_rank}"


def init_group(rank: int, world: int, device: str, init_method: str = "env://") -> ParallelContext:
    """Join the default process group (NCCL on CUDA, gloo on CPU) and return this rank's context."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world)
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise RuntimeError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, not rank {rank} of {world}")
    return ParallelContext(rank, world)
