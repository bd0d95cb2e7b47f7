"""Running a function in several spawned processes of one process group (the multi-process tests' plumbing)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawned_ranks(rank_fn, ckpt, out: Path, world: int = 2) -> list[dict]:
    """Run rank_fn(rank, world, init_url, str(ckpt), str(out)) in `world` spawned processes; each saves its
    results as out/rank{rank}.pt, which are returned in rank order. The process group a rank_fn joins is
    torn down here, so no rank_fn has to remember it."""
    from dsv4.dist.launch import _free_port

    mp.start_processes(_torn_down, args=(rank_fn, world, f"tcp://127.0.0.1:{_free_port()}", str(ckpt), str(out)),
                       nprocs=world, start_method="spawn")
    return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]


def _torn_down(rank: int, rank_fn, *args) -> None:
    """rank_fn, then a barrier and destroy_process_group. Was: a rank that exited with its gloo group alive
    could abort in the group's destructor ("terminate called without an active exception", SIGABRT), now and
    then on the 2-core CI runner, after its results were already saved. The barrier keeps rank 0, which hosts
    the TCP store, alive until every rank is done with it."""
    rank_fn(rank, *args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
