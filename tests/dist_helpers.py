"""Running a function in several spawned processes of one process group (the multi-process tests' plumbing)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp


def spawned_ranks(rank_fn, ckpt, out: Path, world: int = 2) -> list[dict]:
    """Run rank_fn(rank, world, init_url, str(ckpt), str(out)) in `world` spawned processes; each saves its
    results as out/rank{rank}.pt, which are returned in rank order."""
    from dsv4.dist.launch import _free_port

    mp.start_processes(rank_fn, args=(world, f"tcp://127.0.0.1:{_free_port()}", str(ckpt), str(out)),
                       nprocs=world, start_method="spawn")
    return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]
