"""`dsv4 serve` loads the model off the main thread (dsv4/serve/launch.py `off_main_thread`): libgomp keeps an
OpenMP worker pool per thread that ever ran a parallel CPU op, and with two pools alive (main's from loading, the
engine thread's from stepping) it throttles their spin-waits: the built-in model decoded 2.2x slower in the
engine thread on 2 cores. These check the helper and the mechanism (the loader's pool goes away with it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from dsv4.serve.launch import off_main_thread


def test_off_main_thread_returns_the_value_and_reraises():
    import threading

    assert off_main_thread(lambda: threading.current_thread().name) == "dsv4-load"
    with pytest.raises(ValueError, match="bad page size"):
        off_main_thread(lambda: (_ for _ in ()).throw(ValueError("bad page size")))


_COUNT = textwrap.dedent("""
    import os, sys, time, torch
    from dsv4.serve.launch import off_main_thread
    torch.set_num_threads(2)
    before = len(os.listdir("/proc/self/task"))
    work = lambda: torch.randn(4_000_000).mul(2).sum()
    work() if sys.argv[1] == "main" else off_main_thread(work)
    for _ in range(30):              # exiting threads leave /proc/self/task a moment after join() returns
        extra = len(os.listdir("/proc/self/task")) - before
        if extra == 0:
            break
        time.sleep(0.1)
    print(extra)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
def test_a_parallel_op_off_the_main_thread_leaves_no_worker_pool_behind():
    def extra_threads(where: str) -> int:
        out = subprocess.run([sys.executable, "-c", _COUNT, where], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    # Both processes at once: each counts only its own threads, and "main" mostly sleeps (its 3 s wait).
    with ThreadPoolExecutor(2) as pool:
        main, thread = pool.map(extra_threads, ["main", "thread"])
    assert main >= 1          # the main thread's OpenMP pool stays for the life of the process
    assert thread == 0        # the loader's pool ended with it
