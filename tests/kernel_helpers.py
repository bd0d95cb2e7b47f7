"""Running Triton kernels' CPU checks through the interpreter (the kernel tests' shared plumbing)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])


# The interpreter processes' parent (a "zygote"): one Python with TRITON_INTERPRET=1 that has imported what every
# check imports (~3.5 s of CPU a process, ~27 processes a suite run) and forks a child per script. A child is a
# fresh process as far as the script can tell: its own copy of the imported modules, RNGs seeded afresh (torch,
# numpy, random: as at a process's start), its own stdout and stderr; nothing it does reaches another. The zygote
# never runs a tensor op, so no thread pool exists to be lost in the fork. Requests on its stdin, one JSON line
# each; replies on the pipe whose fd is its argument: "pid" once forked, "rc" once exited (written by a thread
# per child: small pipe writes are atomic).
_ZYGOTE = r"""
import json, os, random, runpy, sys, threading, traceback
import numpy, torch, triton, triton.language, dsv4, dsv4.ops, dsv4.quant
REPLIES = int(sys.argv[1])

def child(req):
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["out"]), (2, req["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.close(REPLIES)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
        torch.seed(), numpy.random.seed(), random.seed()
        sys.argv, sys.path[0] = [req["script"]], os.path.dirname(req["script"])
        runpy.run_path(req["script"], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

def reply(**msg):
    os.write(REPLIES, (json.dumps(msg) + "\n").encode())

def reap(pid, rid):
    reply(id=rid, rc=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

reapers = []
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(req)
    reply(id=req["id"], pid=pid)
    reapers.append(threading.Thread(target=reap, args=(pid, req["id"])))
    reapers[-1].start()
for t in reapers:
    t.join()
"""


class _Zygote:
    """The parent side: `run` sends a script and waits for its exit code (a reader thread sorts the replies)."""

    def __init__(self):
        imports = os.pathsep.join([ROOT, str(Path(ROOT) / "tests"), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": imports}
        read, write = os.pipe()
        self.log = tempfile.TemporaryFile("w+")          # the zygote's own output (an import error, say)
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(write)], stdin=subprocess.PIPE, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True, pass_fds=(write,))
        os.close(write)
        self.replies = os.fdopen(read)
        self.lock = threading.Lock()
        self.next_id = 0
        self.waiting: dict[int, tuple[Future, Future]] = {}       # id -> (pid, exit code)
        threading.Thread(target=self._read, daemon=True, name="zygote-replies").start()
        atexit.register(self.close)

    def close(self) -> None:
        """End of input: the zygote exits once its children have (waited for here, so no process outlives us)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.wait(60)

    def _read(self) -> None:
        for line in self.replies:
            msg = json.loads(line)
            with self.lock:
                pid, rc = self.waiting[msg["id"]] if "pid" in msg else self.waiting.pop(msg["id"])
            if "pid" in msg:
                pid.set_result(msg["pid"])
            else:
                rc.set_result(msg["rc"])
        self.proc.wait()
        self.log.seek(0)
        gone = RuntimeError(f"the interpreter zygote exited: {self.log.read()[-3000:]}")
        with self.lock:                               # nothing more will answer
            for pid, rc in self.waiting.values():
                for f in (pid, rc):
                    if not f.done():
                        f.set_exception(gone)

    def run(self, script: Path, out: Path, err: Path, timeout: int) -> int:
        pid, rc = Future(), Future()
        with self.lock:
            rid, self.next_id = self.next_id, self.next_id + 1
            self.waiting[rid] = (pid, rc)
            self.proc.stdin.write(json.dumps({"id": rid, "script": str(script), "out": str(out),
                                              "err": str(err)}) + "\n")
            self.proc.stdin.flush()
        try:
            return rc.result(timeout)
        except TimeoutError:
            os.kill(pid.result(), signal.SIGKILL)
            raise subprocess.TimeoutExpired(str(script), timeout) from None


_zygote: _Zygote | None = None
_zygote_lock = threading.Lock()


def run_in_interpreter(script: str, where: Path, timeout: int = 600) -> str:
    """Run `script` in a fresh process with TRITON_INTERPRET=1 (read when triton is imported, hence another process:
    a child of the zygote above), importing this checkout's dsv4 first (and this folder's modules: `from
    kernel_helpers import ...`); asserts a zero exit and returns its stdout."""
    global _zygote
    path = where / "check.py"
    path.write_text(script)
    with _zygote_lock:
        if _zygote is None or _zygote.proc.poll() is not None:
            _zygote = _Zygote()
        zygote = _zygote
    rc = zygote.run(path, where / "stdout.txt", where / "stderr.txt", timeout)
    assert rc == 0, (where / "stderr.txt").read_text()[-3000:]
    return (where / "stdout.txt").read_text()


def interpreted_json(script: str, where: Path) -> dict:
    """`run_in_interpreter`, for a script whose last line of output is one JSON document of its results."""
    return json.loads(run_in_interpreter(script, where).strip().splitlines()[-1])


@contextlib.contextmanager
def in_interpreter_at_once(scripts: dict[str, str], where: Path, timeout: int = 600):
    """`run_in_interpreter` for several scripts at once, one process each: Triton's interpreter is single-threaded
    Python, so CI's 2 cores run two in little more than the time of one. Yields {name: Future of its stdout}."""
    with ThreadPoolExecutor(len(scripts)) as pool:
        futures: dict[str, Future] = {}
        for name, script in scripts.items():
            (where / name).mkdir()
            futures[name] = pool.submit(run_in_interpreter, script, where / name, timeout)
        yield futures


def interpreted_json_at_once(scripts: dict[str, str], where: Path, timeout: int = 600) -> dict:
    """`in_interpreter_at_once` for scripts that each end by printing one JSON object of named results (a file's
    checks split over two cores): all their results in one dict. A name reported twice is an error, so no result
    can hide another."""
    with in_interpreter_at_once(scripts, where, timeout) as futures:
        parts = [json.loads(f.result().strip().splitlines()[-1]) for f in futures.values()]
    merged = {name: result for part in parts for name, result in part.items()}
    assert len(merged) == sum(len(part) for part in parts), "two scripts reported the same name"
    return merged


def exact_grouped(x, eid, w, s):
    """The FP4 grouped GEMMs' reference: float64 x @ dequant_fp4(W[eid])^T and sum |x| |W|^T (the magnitude the
    order-of-summation bounds scale with), per expert, on x's device."""
    import torch

    from dsv4.quant import dequant_fp4

    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)
    mag = torch.zeros_like(out)
    for e in eid.unique().tolist():
        rows = (eid == e).nonzero().flatten()
        wd = dequant_fp4(w[e], s[e], torch.float64)
        out[rows], mag[rows] = x[rows].double() @ wd.T, x[rows].double().abs() @ wd.abs().T
    return out, mag


def kernel_spies(monkeypatch, **kernels) -> list:
    """Replace each `name=(module, attribute)` kernel entry point by a spy that records (name, keyword arguments)
    and returns zeros of the grouped GEMM's output shape [x rows, weight N]: dispatch tests on the CPU. Returns the
    record."""
    import torch

    seen = []
    for name, (module, attr) in kernels.items():
        monkeypatch.setattr(module, attr, lambda *args, _name=name, **kw: seen.append((_name, kw))
                            or torch.zeros(args[0].shape[0], args[2].shape[1]))
    return seen
