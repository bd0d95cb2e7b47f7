"""Starting the ranks of a tensor-parallel model: spawned by dsv4 itself, or already started by torchrun.

* Under torchrun (WORLD_SIZE set): this process is one rank. Rank 0 gets the `Driver` back; every other rank
  loads its share, follows rank 0 until it closes, then leaves the process (`SystemExit(0)`): code after
  `LLM(...)` runs on rank 0 only.
* Otherwise: this process becomes rank 0 and starts N-1 follower processes (torch.multiprocessing, spawn) that join a
  process group on a free localhost port. Followers are daemons and also watch their parent, so they never outlive
  it.
Process groups: NCCL on CUDA (rank r on cuda:r), gloo on CPU; plus a gloo control group for rank 0's commands.
NOTE: on CPU every rank gets cpu_count // N threads (this process included), so the ranks do not oversubscribe.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv4.dist.context import TPError, init_group, rank_device, torchrun_world
from dsv4.dist.worker import Driver, control_group, follow


def start_model(path, device: str, dtype: torch.dtype, quant_emulation: bool, tp_size: int,
                progress: bool = False) -> Driver:
    """Rank 0's `Driver` of the checkpoint at `path` sharded over `tp_size` ranks (checked before any start)."""
    from dsv4.checkpoint import open_checkpoint
    from dsv4.dist.sharding import check_tp
    from dsv4.loader import load_model

    world = torchrun_world()
    if world > 1 and tp_size != world:
        raise TPError(f"started by torchrun with WORLD_SIZE={world} but tensor_parallel_size={tp_size}; "
                         f"they must be equal")
    check_tp(open_checkpoint(path)[0], tp_size)
    load = functools.partial(load_model, path, dtype=dtype, quant_emulation=quant_emulation, progress=False)
    if world > 1:
        return _join_torchrun(load, device, world)
    return _spawn(load, device, tp_size, progress)


def _join_torchrun(load, device: str, world: int) -> Driver:
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    dev = rank_device(device, local)
    _cpu_threads(dev, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    tp = init_group(rank, world, dev)
    control = control_group()
    model = load(device=dev, parallel=tp)
    dist.barrier(group=control)
    if rank != 0:
        follow(model, tp, control)
        dist.destroy_process_group()
        raise SystemExit(0)
    return Driver(model, tp, control, on_close=dist.destroy_process_group)


def _spawn(load, device: str, world: int, progress: bool) -> Driver:
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_follower_main, args=(r, world, init_method, device, load, os.getpid()),
                         daemon=True, name=f"dsv4-tp-rank{r}") for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        dev = rank_device(device, 0)
        _cpu_threads(dev, world)
        tp = init_group(0, world, dev, init_method)
        control = control_group()
        model = load(device=dev, parallel=tp, progress=progress)
        dist.barrier(group=control)
    except BaseException:
        _stop(procs, timeout=0)
        raise
    return Driver(model, tp, control, on_close=functools.partial(_stop, procs))


def _follower_main(rank: int, world: int, init_method: str, device: str, load, parent: int) -> None:
    _watch_parent(parent)
    dev = rank_device(device, rank)
    _cpu_threads(dev, world)
    tp = init_group(rank, world, dev, init_method)
    control = control_group()
    model = load(device=dev, parallel=tp)
    dist.barrier(group=control)
    follow(model, tp, control)
    dist.destroy_process_group()


def _stop(procs, timeout: float = 30.0) -> None:
    """Wait for the followers to leave (after "stop"), then tear down this rank's groups."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.terminate()
            p.join(5)
    if dist.is_initialized():
        dist.destroy_process_group()


def _watch_parent(parent: int) -> None:
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)                                    # the driver is gone: nobody will ever send "stop"
    threading.Thread(target=watch, daemon=True, name="dsv4-parent-watch").start()


def _cpu_threads(device: str, ranks: int) -> None:
    if torch.device(device).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
