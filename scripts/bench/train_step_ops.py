"""Ops, saved activations and time of one training step of the built-in model v2, on any device (CPU included).

The GPU step is launch-bound, so the number of dispatched ATen ops per step is the figure to cut; the bytes that
autograd saves for the backward are the activation memory (what grows with the sequence length). This script
builds `builtin_config(2)` from random weights exactly as `scripts/train_builtin_gpu.py` does (QAT emulation on,
`prepare_full(qat=True)`), runs `Trainer.train_step` on one pack of T tokens and prints:
* ops per step: forward ops by Python call site (innermost dsv4 frame), backward ops by the call site of the
  forward op that created the autograd node (anomaly mode records it);
* saved-tensor bytes (unique storages, via saved_tensors_hooks) and bytes per token;
* host reads per step (`SyncCounter`: what makes the host wait for the GPU queue on CUDA) by call site;
* the step time without the counters (median of --repeat steps after one warm-up).
Usage: PYTHONPATH=. python3 scripts/bench/train_step_ops.py --tokens 1024 [--dtype bf16] [--grad-ckpt] [--top 30]
       [--syncs-only]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import tempfile
import time
import traceback
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = str(Path(__file__).resolve().parents[2])
SKIP = ("_ops.py", "_python_dispatch", "train_step_ops.py")


def site(stack) -> str:
    """The innermost frame inside dsv4/ (file:line function) of a stack (list of FrameSummary)."""
    for f in reversed(stack):
        if "/dsv4/" in f.filename and not any(s in f.filename for s in SKIP):
            return f"{f.filename.split('/dsv4/')[-1]}:{f.lineno} {f.name}"
    return "(outside dsv4)"


class OpCounter(TorchDispatchMode):
    """Counts every dispatched ATen op; forward ops by call site, backward ops by `self.current` (the forward
    site of the autograd node being run, set by node pre-hooks)."""

    def __init__(self):
        super().__init__()
        self.forward, self.backward, self.current = Counter(), Counter(), None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.current is None:
            self.forward[site(traceback.extract_stack())] += 1
        else:
            self.backward[self.current] += 1
        return func(*args, **(kwargs or {}))


def node_sites(root) -> dict:
    """{autograd node: forward call site} for every node reachable from `root` (anomaly-mode tracebacks)."""
    out, todo = {}, [root]
    while todo:
        node = todo.pop()
        if node is None or node in out:
            continue
        tb = node.metadata.get("traceback_") if hasattr(node, "metadata") else None
        out[node] = site(traceback.extract_stack()[:0]) if not tb else _site_from_text(tb)
        todo += [n for n, _ in node.next_functions]
    return out


def _site_from_text(tb) -> str:
    lines = tb if isinstance(tb, list) else [tb]
    text = "".join(lines)
    frames = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("File ")]
    for f in reversed(frames):
        if "/dsv4/" in f and not any(s in f for s in SKIP):
            path, line, name = f.split('"')[1], f.split("line ")[1].split(",")[0], f.split(" in ")[-1]
            return f"{path.split('/dsv4/')[-1]}:{line} {name}"
    return "(outside dsv4)"


class SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward and still holds when the forward ends (the
    activation memory): a tensor saved by a graph that was dropped during the forward (a detached rounding) is
    gone by then. Parameters are not activations and are left out."""

    def __init__(self):
        self.saved = {}          # storage pointer -> (weak reference to a tensor on it, bytes, call site)
        self.live = None

    def pack(self, t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            if st.data_ptr() not in self.saved or self.saved[st.data_ptr()][0]() is None:
                self.saved[st.data_ptr()] = (weakref.ref(t), st.nbytes(), site(traceback.extract_stack()))
        return t

    def freeze(self) -> None:
        """Keep what is alive now (call at the end of the forward)."""
        self.live = [(n, s) for ref, n, s in self.saved.values() if ref() is not None]

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.live)

    def by_site(self) -> Counter:
        out = Counter()
        for n, s in self.live:
            out[s] += n
        return out


aten = torch.ops.aten
# ATen ops whose CUDA kernels read device values on the host: an output size that depends on the data (or a bool).
SYNC_OPS = {aten.nonzero, aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.masked_select,
            aten.bincount, aten.histc, aten.equal}
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}     # a bool mask runs nonzero
FACTORIES = ("zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "randperm", "from_numpy")


class SyncCounter(TorchDispatchMode):
    """Counts the host reads of device data in a training step by call site (innermost dsv4 frame): each waits
    for the GPU's launch queue to drain on CUDA, so host and GPU time add up instead of overlapping. Runs on any
    device; on the CPU it counts what would read the GPU on CUDA:
    * `.item()` and `bool/int/float/index(t)` (ATen `_local_scalar_dense`), `.tolist()`, `.numpy()`, `.cpu()`,
      `.to("cpu")`;
    * ATen ops whose output size depends on values (`SYNC_OPS`, `repeat_interleave` without output_size, indexing
      with a bool mask);
    * host->device copies: `torch.tensor/as_tensor(data, device=...)` and `.to(device)`/`.cuda()` of a host
      tensor (a pageable copy synchronises the stream first); a `non_blocking=True` copy is taken as asynchronous
      (the caller pins the host tensor on CUDA).
    Host tensors (factories called without a device or with the literal string "cpu", and every op whose tensor
    inputs are all host tensors) are told apart, so reading them is not counted; a `torch.device` object (the
    model's device: the CPU in a CPU run) is taken as the training device. Tensors made before the counter starts
    are device tensors unless given in `host` (`host_tensors`). Use as a context manager."""

    def __init__(self, host=()):
        super().__init__()
        self.sites, self.host, self.quiet = Counter(), {}, 0
        self.mark_host(list(host))

    # ---- host tensors
    def is_host(self, t) -> bool:
        ref = self.host.get(id(t))
        return ref is not None and ref() is t

    def mark_host(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.host[id(t)] = weakref.ref(t)

    def count(self, kind: str) -> None:
        if not self.quiet:
            self.sites[f"{site(traceback.extract_stack())} [{kind}]"] += 1

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    # ---- ATen level
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_host = bool(tensors) and all(self.is_host(t) for t in tensors)
        if not on_host:
            kind = self._sync_kind(func, args, kwargs)
            if kind:
                self.count(kind)
        out = func(*args, **kwargs)
        if on_host:
            self.mark_host(out)
        return out

    @staticmethod
    def _sync_kind(func, args, kwargs) -> str | None:
        packet = func.overloadpacket
        if packet is aten._local_scalar_dense:
            return "item"
        if packet in SYNC_OPS:
            return packet.__name__
        if packet is aten.repeat_interleave and kwargs.get("output_size") is None and isinstance(
                args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor)):
            return "repeat_interleave"
        if packet in INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                       for i in (args[1] or ())):
            return "bool index"
        return None

    # ---- Python level
    def __enter__(self):
        self._stack = contextlib.ExitStack()
        for name in ("tolist", "numpy", "cpu"):
            self._stack.enter_context(_patched(torch.Tensor, name, functools.partial(self._read, name)))
        self._stack.enter_context(_patched(torch.Tensor, "to", self._to))
        self._stack.enter_context(_patched(torch.Tensor, "cuda", functools.partial(self._to_device, "cuda()")))
        for name in ("tensor", "as_tensor"):
            self._stack.enter_context(_patched(torch, name, self._from_data))
        for name in FACTORIES:
            self._stack.enter_context(_patched(torch, name, self._factory))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()

    def _quietly(self, orig, *args, **kwargs):
        self.quiet += 1
        try:
            return orig(*args, **kwargs)
        finally:
            self.quiet -= 1

    def _read(self, name, orig, t, *args, **kwargs):
        if not self.is_host(t):
            self.count(name)
        out = self._quietly(orig, t, *args, **kwargs)
        if name in ("cpu", "to cpu") and out is not t:       # on the CPU, t itself: it stays a device tensor
            self.mark_host(out)
        return out

    def _to(self, orig, t, *args, **kwargs):
        target = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if target is None:
            return self._quietly(orig, t, *args, **kwargs)
        if target == "cpu":                                # literally "cpu": a read (a device variable is not)
            return orig(t, *args, **kwargs) if self.is_host(t) else self._read("to cpu", orig, t, *args, **kwargs)
        return self._to_device("to device", orig, t, *args, **kwargs)

    def _to_device(self, name, orig, t, *args, **kwargs):
        if self.is_host(t) and not kwargs.get("non_blocking", False):
            self.count(name)
        out = self._quietly(orig, t, *args, **kwargs)
        self.host.pop(id(out), None)                       # on the device now (on the CPU: maybe the same tensor)
        return out

    def _from_data(self, orig, data, *args, **kwargs):
        out = orig(data, *args, **kwargs)
        if kwargs.get("device") in (None, "cpu"):
            self.mark_host(out)
        elif not isinstance(data, torch.Tensor):
            self.count("tensor(list, device=)")
        return out

    def _factory(self, orig, *args, **kwargs):
        out = orig(*args, **kwargs)
        if kwargs.get("device") in (None, "cpu") and not any(isinstance(a, torch.Tensor) for a in args):
            self.mark_host(out)
        return out

    def report(self, top: int) -> None:
        print(f"host reads per step: {self.total}")
        for s, n in self.sites.most_common(top):
            print(f"  {n:5d}  {s}")


@contextlib.contextmanager
def _patched(owner, name: str, wrapper):
    """owner.name replaced by wrapper(original, ...) while the context is open."""
    orig = getattr(owner, name)

    @functools.wraps(orig)
    def patched(*args, **kwargs):                      # a function, so that it binds as a method
        return wrapper(orig, *args, **kwargs)

    setattr(owner, name, patched)
    try:
        yield
    finally:
        setattr(owner, name, orig)


def build(tokens: int, dtype: torch.dtype, grad_ckpt: bool, device: str, tmp: Path):
    sys.path.insert(0, str(Path(ROOT) / "scripts"))
    from dsv4.builtin import builtin_config
    from dsv4.checkpoint import synthesize
    from dsv4.loader import load_model
    from dsv4.train.data import Document, PackStream
    from dsv4.train.loop import TrainConfig, Trainer
    from dsv4.train.params import prepare_full

    cfg = builtin_config(2)
    base = synthesize(cfg, tmp / "base", seed=0, progress=False)
    net = prepare_full(load_model(base, device=device, dtype=dtype, quant_emulation=True, progress=False), qat=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (tokens,), generator=g).tolist()
    packs = [[Document(ids, [True] * tokens)]]
    train = TrainConfig(max_steps=10**6, lr=1e-4, warmup_steps=1, seq_len=tokens, grad_ckpt=grad_ckpt,
                        mtp_weight=0.3, bias_update_rate=1e-3)
    return Trainer(net, PackStream(packs, 1, 0), train, tmp / "out", progress=False)


def count(trainer, top: int) -> dict:
    """One step under the counters; prints the top call sites."""
    ops, saved = OpCounter(), SavedBytes()
    step = trainer.step_module
    orig = step.forward

    def forward(pb):
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), torch.autograd.detect_anomaly(
                check_nan=False):
            out = orig(pb)
        saved.freeze()
        sites = {}
        for o in out:
            if isinstance(o, torch.Tensor) and o.grad_fn is not None:
                sites.update(node_sites(o.grad_fn))
        for node, s in sites.items():
            node.register_prehook(lambda grads, s=s: setattr(ops, "current", s))
        return out

    step.forward = forward
    after = trainer.master.grads_to_masters

    def grads_to_masters():             # the backward is over: what follows is the optimizer's, by its own site
        ops.current = None
        after()

    trainer.master.grads_to_masters = grads_to_masters
    try:
        with ops:
            trainer.train_step()
    finally:
        step.forward, trainer.master.grads_to_masters = orig, after
    fwd, bwd = sum(ops.forward.values()), sum(ops.backward.values())
    both = ops.forward + ops.backward
    optim = sum(n for s, n in ops.forward.items() if s.startswith("train/optim.py") or s.startswith("train/loop.py"))
    print(f"ops per step: {fwd + bwd} (forward incl. optimizer {fwd}, backward {bwd}; optimizer and master weights "
          f"{optim}: per-tensor AdamW on CPU, foreach kernels on CUDA)")
    print(f"saved for backward: {saved.total / 2**20:.1f} MiB")
    print(f"top {top} call sites (forward + backward ops):")
    for s, n in both.most_common(top):
        print(f"  {n:7d}  (fwd {ops.forward[s]:6d}, bwd {ops.backward[s]:6d})  {s}")
    print(f"top {top} call sites by saved bytes:")
    for s, n in saved.by_site().most_common(top):
        print(f"  {n / 2**20:9.1f} MiB  {s}")
    return {"ops": fwd + bwd, "forward_ops": fwd, "backward_ops": bwd, "optimizer_ops": optim,
            "saved_bytes": saved.total}


def host_tensors(trainer) -> list[torch.Tensor]:
    """The trainer's tensors that live on the host on CUDA too: AdamW's step counts (kept on the CPU unless the
    optimizer is capturable or fused; reading them is no sync)."""
    return [s["step"] for s in trainer.opt.state.values() if isinstance(s.get("step"), torch.Tensor)
            and not s["step"].is_cuda]


def step_syncs(trainer) -> SyncCounter:
    """One `trainer.train_step()` under `SyncCounter`."""
    with SyncCounter(host_tensors(trainer)) as syncs:
        trainer.train_step()
    return syncs


def count_syncs(trainer, top: int) -> SyncCounter:
    """One step under `SyncCounter`; prints the host reads by call site."""
    syncs = step_syncs(trainer)
    syncs.report(top)
    return syncs


def timed(trainer, repeat: int, device: str) -> float:
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        trainer.train_step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=2, help="timed steps (0: no timing)")
    ap.add_argument("--no-count", action="store_true", help="only time the step")
    ap.add_argument("--syncs-only", action="store_true", help="only count the host reads of one step")
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(args.tokens, dtype, args.grad_ckpt, args.device, Path(tmp))
        result = {"tokens": args.tokens, "dtype": args.dtype, "grad_ckpt": args.grad_ckpt}
        if args.syncs_only:
            result["host_reads"] = count_syncs(trainer, args.top).total
            return result
        if not args.no_count:
            result.update(count(trainer, args.top))
            result["saved_bytes_per_token"] = result["saved_bytes"] / args.tokens
            print(f"saved bytes per token: {result['saved_bytes_per_token']:.0f}")
            result["host_reads"] = count_syncs(trainer, args.top).total
        if args.repeat:
            with contextlib.suppress(KeyboardInterrupt):
                result["step_s"] = timed(trainer, args.repeat, args.device)
                print(f"step time: {result['step_s']:.3f} s ({args.tokens / result['step_s']:.0f} tokens/s)")
    return result


if __name__ == "__main__":
    main()
