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
* with --bytes, the memory traffic of every op that moves data (bytes of its tensor inputs read and outputs
  written; views and other aliasing ops skipped; backward ops by their forward site) by call site, ATen op and
  category (GEMM, elementwise, reduction, copy/cast/index, other), the GEMMs' FLOPs, and the GPU time they predict
  at --predict-tokens (bytes / --bandwidth, FLOPs / --gemm-rate; the optimizer's part not scaled).
Usage: PYTHONPATH=. python3 scripts/bench/train_step_ops.py --tokens 1024 [--dtype bf16] [--grad-ckpt] [--top 30]
       [--syncs-only] [--row-len 256] [--bytes]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
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
from torch.utils.flop_counter import flop_registry

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
    site of the autograd node being run, set by node pre-hooks). With a `Traffic`, also its memory traffic."""

    def __init__(self, traffic: Traffic | None = None):
        super().__init__()
        self.forward, self.backward, self.current = Counter(), Counter(), None
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        where = site(traceback.extract_stack()) if self.current is None else self.current
        (self.forward if self.current is None else self.backward)[where] += 1
        out = func(*args, **kwargs)
        if self.traffic is not None:
            self.traffic.add(where, func, args, kwargs, out)
        return out


# ---- memory traffic per op (--bytes)
aten = torch.ops.aten


def _ops(*names) -> set:
    return {getattr(aten, n) for n in names if hasattr(aten, n)}


GEMM = _ops("mm", "bmm", "addmm", "baddbmm", "addbmm", "_grouped_mm", "_scaled_mm", "_scaled_grouped_mm", "linear",
            "matmul")
GATHERS = _ops("index", "index_select", "gather", "embedding", "take", "_unsafe_index")
SCATTERS = _ops("index_put_", "_index_put_impl_", "index_add_", "scatter_", "scatter_add_", "scatter_reduce_",
                "index_copy_", "index_fill_", "index_reduce_", "masked_scatter_")
ACCUMULATE = _ops("index_add_", "scatter_add_", "scatter_reduce_", "index_reduce_")    # read-modify-write
COPIES = GATHERS | SCATTERS | _ops("_to_copy", "copy_", "clone", "cat", "stack", "index_put", "index_add", "scatter",
                                   "scatter_add", "index_copy", "embedding_dense_backward", "constant_pad_nd",
                                   "repeat", "masked_scatter", "_unsafe_index_put", "slice_scatter",
                                   "select_scatter", "as_strided_scatter", "diagonal_scatter", "flip", "roll")
WRITE_ONLY = _ops("copy_", "zero_", "fill_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_")
NO_TRAFFIC = _ops("_unsafe_view", "_reshape_alias", "empty", "empty_strided", "empty_like", "new_empty",
                  "new_empty_strided", "lift_fresh", "set_", "resize_", "_local_scalar_dense", "sym_size",
                  "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type")
FILLS = _ops("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
             "zero_", "fill_", "arange", "scalar_tensor")
REDUCTIONS = _ops("_softmax", "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data", "norm",
                  "linalg_vector_norm", "cumsum", "logsumexp", "_foreach_norm")
CATEGORIES = ("GEMM", "elementwise", "reduction", "copy/cast/index", "other")


def moves_no_data(func) -> bool:
    """A view or other aliasing op (its output shares storage with an input and nothing is written), a shape
    query, or an allocation without a fill: no memory traffic (and on CUDA no kernel)."""
    if func.overloadpacket in NO_TRAFFIC or torch.Tag.inplace_view in func.tags:
        return True
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def category(func) -> str:
    packet = func.overloadpacket
    if packet in GEMM:
        return "GEMM"
    if packet in COPIES:
        return "copy/cast/index"
    if torch.Tag.pointwise in func.tags or packet in FILLS:
        return "elementwise"
    if torch.Tag.reduction in func.tags or packet in REDUCTIONS:
        return "reduction"
    return "other"


def nbytes(t: torch.Tensor) -> int:
    """Bytes of memory a tensor covers: its elements, a broadcast (stride 0) dimension counted once."""
    n = t.element_size()
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride:
            n *= size
    return n if t.numel() else 0


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def op_bytes(func, args, kwargs, out) -> tuple[int, int]:
    """(bytes read, bytes written) of one ATen op: every tensor output is written, every tensor input read once
    (the same tensor twice counts once; an `out=` tensor and a write-only op's destination are not read). A
    gather reads only the gathered elements of its source; an in-place scatter touches only the indexed elements
    of its destination (at most the size of its values or indices), read too where it accumulates."""
    packet = func.overloadpacket
    outs = _tensors(out)
    ins = _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
    self_ = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if packet in WRITE_ONLY and self_ is not None:
        ins = ins[1:]
    seen, unique = set(), []
    for t in ins:
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            unique.append(t)
    if packet in GATHERS and self_ is not None and outs:
        touched = min(self_.numel(), sum(o.numel() for o in outs)) * self_.element_size()
        return touched + sum(nbytes(t) for t in unique[1:]), sum(nbytes(o) for o in outs)
    if packet in SCATTERS and self_ is not None:
        others = unique[1:]
        touched = min(self_.numel(), max((t.numel() for t in others), default=0)) * self_.element_size()
        accumulate = packet in ACCUMULATE or bool(kwargs.get("accumulate", len(args) > 3 and args[3] is True))
        return sum(nbytes(t) for t in others) + (touched if accumulate else 0), touched
    return sum(nbytes(t) for t in unique), sum(nbytes(o) for o in outs)


def gemm_flops(func, args, kwargs, out) -> int:
    f = flop_registry.get(func.overloadpacket)
    return int(f(*args, **kwargs, out_val=out)) if f is not None else 0


class Traffic:
    """Bytes read and written, FLOPs and data-moving ops (each a kernel launch on CUDA) by (call site, ATen op);
    views and aliasing ops are skipped. Fed by `OpCounter`."""

    def __init__(self):
        self.read, self.written, self.flops, self.ops = Counter(), Counter(), Counter(), Counter()
        self.fp32_flops = Counter()             # GEMMs with fp32 operands: CUDA cores, not bf16 tensor cores

    def add(self, where: str, func, args, kwargs, out) -> None:
        if moves_no_data(func):
            return
        key = (where, func.overloadpacket.__name__, category(func))
        r, w = op_bytes(func, args, kwargs, out)
        self.read[key] += r
        self.written[key] += w
        self.ops[key] += 1
        if func.overloadpacket in GEMM:
            fl = gemm_flops(func, args, kwargs, out)
            self.flops[key] += fl
            if any(t.dtype == torch.float32 for t in _tensors(args)):
                self.fp32_flops[key] += fl

    def bytes(self) -> Counter:
        return Counter({k: self.read[k] + self.written[k] for k in self.ops})

    def fitted(self, tokens: int, per_step, fit=None) -> dict:
        """{name: {key: (per step, per token)}} for bytes, flops and fp32 flops: with `fit` = (tokens2, Traffic
        of a step of tokens2), the line through both steps per key; else the optimizer's keys (`per_step(site)`)
        all per step, every other all per token."""
        out = {}
        for name in ("bytes", "flops", "fp32_flops"):
            mine = self.bytes() if name == "bytes" else getattr(self, name)
            theirs = None if fit is None else (fit[1].bytes() if name == "bytes" else getattr(fit[1], name))
            line = {}
            for k in set(mine) | set(theirs or ()):
                v = mine[k]
                if theirs is not None:
                    slope = (v - theirs[k]) / (tokens - fit[0])
                    line[k] = (v - slope * tokens, slope)
                else:
                    line[k] = (v, 0.0) if per_step(k[0]) else (0.0, v / tokens)
            out[name] = line
        return out

    def report(self, tokens: int, top: int, predict_tokens: int, bandwidth: float, gemm_rate: float,
               fp32_rate: float, per_step=lambda s: False, fit=None) -> dict:
        """Prints the traffic by category, ATen op and call site and the GPU time it predicts at `predict_tokens`:
        each (site, op) as a part per step plus a part per token (`fitted`)."""
        lines = self.fitted(tokens, per_step, fit)
        P = predict_tokens

        def at(name, keep=lambda k: True) -> float:
            return sum(max(0.0, c + t * P) for k, (c, t) in lines[name].items() if keep(k))

        def split(name, keep) -> tuple[float, float]:
            parts = [v for k, v in lines[name].items() if keep(k)]
            return sum(c for c, _ in parts), sum(t for _, t in parts)

        total, data_ops = sum(self.bytes().values()), sum(self.ops.values())
        flops, fp32 = sum(self.flops.values()), sum(self.fp32_flops.values())
        const, per_tok = split("bytes", lambda k: True)
        how = f"fitted through a step of {fit[0]} tokens" if fit else "optimizer per step, the rest per token"
        print(f"memory traffic per step ({tokens} tokens; views skipped): {sum(self.read.values()) / 1e9:.2f} GB "
              f"read + {sum(self.written.values()) / 1e9:.2f} GB written in {data_ops} data-moving ops; "
              f"GEMM {flops / tokens / 1e6:.1f} MFLOP a token ({fp32 / max(flops, 1):.0%} with fp32 operands)")
        print(f"as a line ({how}): {const / 1e9:.2f} GB per step + {per_tok / 1e6:.2f} MB per token; "
              f"at {P} tokens {at('bytes') / 1e9:.0f} GB")
        print(f"by category at {P} tokens; predicted GPU ms = bytes / {bandwidth:.0e} B/s (GEMM also FLOPs / "
              f"{gemm_rate:.0e}; [fp32-operand GEMMs at {fp32_rate:.0e}]):")
        pred, at_total = {}, at("bytes")
        print(f"  {'category':16s} {'ops':>6s} {'MB/step':>9s} {'KB/token':>9s} {'share':>6s} {'ms':>7s}")
        for cat in CATEGORIES:
            c, t = split("bytes", lambda k, cat=cat: k[2] == cat)
            b = at("bytes", lambda k, cat=cat: k[2] == cat)
            pred[cat] = b / bandwidth * 1e3
            extra = ""
            if cat == "GEMM":
                fl, fl32 = at("flops"), at("fp32_flops")
                pred["GEMM_flops"] = fl / gemm_rate * 1e3
                pred["GEMM_flops_fp32_aware"] = ((fl - fl32) / gemm_rate + fl32 / fp32_rate) * 1e3
                extra = f"  (FLOPs: {pred['GEMM_flops']:.1f} ms [{pred['GEMM_flops_fp32_aware']:.1f} ms])"
            n = sum(v for k, v in self.ops.items() if k[2] == cat)
            print(f"  {cat:16s} {n:6d} {c / 1e6:9.0f} {t / 1e3:9.1f} {b / at_total:6.1%} {pred[cat]:7.1f}{extra}")
        pred["bytes_total"] = sum(pred[c] for c in CATEGORIES)
        print(f"  {'total':16s} {data_ops:6d} {const / 1e6:9.0f} {per_tok / 1e3:9.1f} {1:6.1%} "
              f"{pred['bytes_total']:7.1f} (bytes only)")

        def one(name, k) -> float:
            c, t = lines[name].get(k, (0.0, 0.0))
            return max(0.0, c + t * P)

        def table(part, title, n):
            groups = {}
            for k in self.ops:
                groups.setdefault(k[part], []).append(k)
            rows = sorted(((sum(one("bytes", k) for k in keys), g, keys) for g, keys in groups.items()),
                          key=lambda r: -r[0])
            print(f"top {n} {title} by bytes at {P} tokens (MB per step + KB per token; share; ops; main ATen ops):")
            for b, g, keys in rows[:n]:
                c, t = split("bytes", lambda k, keys=set(keys): k in keys)
                keys.sort(key=lambda k: -one("bytes", k))
                mix = ", ".join(f"{k[1]} {one('bytes', k) / max(b, 1):.0%}" for k in keys[:3]) if part == 0 \
                    else keys[0][2]
                print(f"  {c / 1e6:7.0f} + {t / 1e3:7.1f}  {b / at_total:6.1%}  {sum(self.ops[k] for k in keys):5d}  "
                      f"{g}  [{mix}]")

        table(1, "ATen ops", top)
        table(0, "call sites (backward ops by their forward site)", top)
        gemm = Counter()
        for k in lines["flops"]:
            gemm[k[0]] += one("flops", k)
        print(f"top GEMM call sites by FLOPs at {P} tokens (GFLOP; share with fp32 operands):")
        for g, fl in gemm.most_common(min(top, 12)):
            f32 = sum(one("fp32_flops", k) for k in lines["fp32_flops"] if k[0] == g)
            print(f"  {fl / 1e9:9.1f}  {f32 / max(fl, 1):5.0%}  {g}")
        return {"bytes": total, "bytes_per_step_const": const, "bytes_per_token": per_tok, "data_ops": data_ops,
                "gemm_flops": flops, "gemm_flops_fp32": fp32, "predicted_ms": pred, "predict_tokens": P}


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


def build(tokens: int, dtype: torch.dtype, grad_ckpt: bool, device: str, tmp: Path, row_len: int = 0):
    """The trainer of `scripts/train_builtin_gpu.py` on one pack of `tokens` random tokens: one sequence, or with
    `row_len` a rows pack of tokens / row_len full rows (`--row-len`: one [rows, row_len] batch, each row from
    position 0, as the GPU script's `row_packs`; one document a row, no padding)."""
    sys.path.insert(0, str(Path(ROOT) / "scripts"))
    from dsv4.builtin import builtin_config
    from dsv4.checkpoint import synthesize
    from dsv4.loader import load_model
    from dsv4.train.data import Document, PackStream, row_packs
    from dsv4.train.loop import TrainConfig, Trainer
    from dsv4.train.params import prepare_full

    cfg = builtin_config(2)
    base = synthesize(cfg, tmp / "base", seed=0, progress=False)
    net = prepare_full(load_model(base, device=device, dtype=dtype, quant_emulation=True, progress=False), qat=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (tokens,), generator=g).tolist()
    if row_len:
        if tokens % row_len:
            raise ValueError(f"--row-len {row_len} must divide --tokens {tokens}")
        ids[::row_len] = [cfg.bos_token_id] * (tokens // row_len)          # each row starts a document
        docs = [Document(ids[i:i + row_len], [False] + [True] * (row_len - 1)) for i in range(0, tokens, row_len)]
        packs = row_packs(docs, row_len, tokens // row_len)               # one pack: one document a row
    else:
        packs = [[Document(ids, [True] * tokens)]]
    train = TrainConfig(max_steps=10**6, lr=1e-4, warmup_steps=1, seq_len=tokens, grad_ckpt=grad_ckpt,
                        mtp_weight=0.3, bias_update_rate=1e-3, rows=bool(row_len))
    return Trainer(net, PackStream(packs, 1, 0), train, tmp / "out", progress=False)


def is_optimizer(s: str) -> bool:
    """The call sites of the optimizer step and the master-weight copies (per step, not per token)."""
    return s.startswith("train/optim.py") or s.startswith("train/loop.py")


def count(trainer, top: int, traffic: Traffic | None = None) -> dict:
    """One step under the counters; prints the top call sites."""
    ops, saved = OpCounter(traffic), SavedBytes()
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
    optim = sum(n for s, n in ops.forward.items() if is_optimizer(s))
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
    ap.add_argument("--row-len", type=int, default=0,
                    help="the pack as rows of ROW_LEN tokens run as one batch (scripts/train_builtin_gpu.py "
                         "--row-len; its default is 1024, the GPU runs 256); 0: one sequence of --tokens")
    ap.add_argument("--bytes", action="store_true",
                    help="also the memory traffic of every op (bytes read + written, views skipped) by call site "
                         "and category, and the GPU time it predicts at --predict-tokens")
    ap.add_argument("--predict-tokens", type=int, default=32768)
    ap.add_argument("--fit-tokens", type=int, default=0,
                    help="with --bytes, also count a step of this many tokens and predict each (site, op) by the "
                         "line through both steps (per step + per token: the weights' QAT roundings and the "
                         "optimizer do not grow with the tokens); else the optimizer per step, the rest per token")
    ap.add_argument("--bandwidth", type=float, default=3e12, help="effective HBM bytes/s (H200: ~3e12)")
    ap.add_argument("--gemm-rate", type=float, default=400e12, help="effective bf16 GEMM FLOP/s")
    ap.add_argument("--fp32-gemm-rate", type=float, default=50e12,
                    help="effective FLOP/s of GEMMs with fp32 operands (no TF32: CUDA cores)")
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(args.tokens, dtype, args.grad_ckpt, args.device, Path(tmp), args.row_len)
        result = {"tokens": args.tokens, "dtype": args.dtype, "grad_ckpt": args.grad_ckpt, "row_len": args.row_len}
        if args.syncs_only:
            result["host_reads"] = count_syncs(trainer, args.top).total
            return result
        if not args.no_count:
            traffic = Traffic() if args.bytes else None
            result.update(count(trainer, args.top, traffic))
            result["saved_bytes_per_token"] = result["saved_bytes"] / args.tokens
            print(f"saved bytes per token: {result['saved_bytes_per_token']:.0f}")
            if traffic is not None:
                fit = None
                if args.fit_tokens:
                    del trainer
                    fit = (args.fit_tokens, Traffic())
                    with contextlib.redirect_stdout(io.StringIO()):
                        count(build(args.fit_tokens, dtype, args.grad_ckpt, args.device, Path(tmp) / "fit",
                                    args.row_len), args.top, fit[1])
                    trainer = build(args.tokens, dtype, args.grad_ckpt, args.device, Path(tmp) / "again", args.row_len)
                result["traffic"] = traffic.report(args.tokens, args.top, args.predict_tokens, args.bandwidth,
                                                   args.gemm_rate, args.fp32_gemm_rate, is_optimizer, fit)
            result["host_reads"] = count_syncs(trainer, args.top).total
        if args.repeat:
            with contextlib.suppress(KeyboardInterrupt):
                result["step_s"] = timed(trainer, args.repeat, args.device)
                print(f"step time: {result['step_s']:.3f} s ({args.tokens / result['step_s']:.0f} tokens/s)")
    return result


if __name__ == "__main__":
    main()
