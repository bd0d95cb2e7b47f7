"""Taps: named intermediate tensors of one forward step, recorded only while a `Recorder` is active.

Model code calls `tap("attn.q", q)` at every stage. With no recorder active that is one `ContextVar.get()` and
a comparison: no tensor work, no allocation. A `Recorder` (a context manager) makes the calls copy their
tensors to the CPU under the name `{scope}{name}`; `Block.forward` sets the scope to its checkpoint name
(`layers.3.`), `Transformer.step` resets it to the empty scope for the global taps (embed, hc_head, norm, logits).

NOTE: the active recorder lives in a `ContextVar`, not in a mutable module-level global: each thread / task sees
its own recorder, so an engine serving traffic in one thread is never recorded by a dump in another, and
nesting restores the outer recorder on exit.

`SCHEMA` lists every stage in forward order; docs/parity.md explains shapes and positions.
"""

from __future__ import annotations

import fnmatch
from contextvars import ContextVar

import torch

SCHEMA_VERSION = 1

# (stage, layout, dtype) in forward order. Global stages have no `layers.{i}.` prefix. T = the step's new tokens,
# E = compressed entries of the sequence so far, k = top-k width, hc = hc_mult, H heads of head_dim d.
GLOBAL_HEAD = [("embed", "[1, T, D]", "compute")]
LAYER_STAGES = [
    ("hc_attn_pre.weights", "[1, T, hc]", "fp32"),
    ("hc_attn_pre.post", "[1, T, hc]", "fp32"),
    ("hc_attn_pre.comb", "[1, T, hc(src), hc(dst)]", "fp32"),
    ("hc_attn_pre.x", "[1, T, D]", "compute"),
    ("attn.q", "[1, T, H, d]", "compute"),
    ("attn.window_kv", "[1, T, d]", "compute"),
    ("attn.compressed", "[E, d]", "compute"),
    ("attn.indexer.keys", "[E, index_head_dim]", "compute"),
    ("attn.indexer.scores", "[1, T, E]", "compute"),
    ("attn.indexer.topk", "[T, min(k, E)]", "int64"),
    ("attn.out_pre_inverse_rope", "[1, T, H, d]", "compute"),
    ("attn.out", "[1, T, H, d]", "compute"),
    ("attn.wo", "[1, T, D]", "compute"),
    ("hc_ffn_pre.weights", "[1, T, hc]", "fp32"),
    ("hc_ffn_pre.post", "[1, T, hc]", "fp32"),
    ("hc_ffn_pre.comb", "[1, T, hc(src), hc(dst)]", "fp32"),
    ("hc_ffn_pre.x", "[1, T, D]", "compute"),
    ("ffn.routing.ids", "[T, n_activated]", "int64"),
    ("ffn.routing.weights", "[T, n_activated]", "fp32"),
    ("ffn.experts_out", "[T, D]", "fp32"),
    ("block.out", "[1, T, hc, D]", "compute"),
]
GLOBAL_TAIL = [("hc_head", "[1, T, D]", "compute"), ("norm", "[1, T, D]", "compute"),
               ("logits", "[1, T, vocab]", "fp32")]
# Index tensors: compared as sets per row (the last dim), -1 = no entry.
INDEX_STAGES = ("attn.indexer.topk", "ffn.routing.ids")
# A weight tensor whose order follows an index tensor: compared after sorting both rows by the index.
PAIRED_STAGES = {"ffn.routing.weights": "ffn.routing.ids"}

_ACTIVE: ContextVar[Recorder | None] = ContextVar("dsv4_tap_recorder", default=None)


class TapError(RuntimeError):
    """A recording that cannot be trusted (a name recorded twice)."""


class Recorder:
    """Records taps while active: `with Recorder() as rec: model.step(...)`; then `rec.tensors` (insertion order =
    forward order). `include` keeps only names matching one of its glob patterns. Record one sequence per step:
    per-sequence taps of a batch of several sequences would collide (an error)."""

    def __init__(self, include: list[str] | None = None):
        self.include = include
        self.tensors: dict[str, torch.Tensor] = {}
        self.scope = ""
        self._token = None

    def __enter__(self) -> Recorder:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    def record(self, name: str, tensor: torch.Tensor, index_offset: int) -> None:
        key = self.scope + name
        if key in self.tensors:
            raise TapError(f"tap {key!r} recorded twice in one recording (several sequences in one step?)")
        if self.include is not None and not any(fnmatch.fnmatchcase(key, p) for p in self.include):
            return
        t = tensor.detach()
        if index_offset:                                       # KV-row indices -> entry indices
            t = torch.where(t >= 0, t - index_offset, -1)
        self.tensors[key] = t.to("cpu", copy=True).contiguous()


def tap(name: str, tensor: torch.Tensor, index_offset: int = 0) -> None:
    """Record `tensor` as `name` (in the current scope) if a recorder is active; free otherwise.
    `index_offset`: the tensor holds indices + offset (-1 = none); the recording subtracts it.
    NOTE: inside `torch.compile`d code (the compiled decode graphs) taps are compiled out: record eagerly."""
    if torch.compiler.is_compiling():
        return
    rec = _ACTIVE.get()
    if rec is not None:
        rec.record(name, tensor, index_offset)


def tap_scope(prefix: str) -> None:
    """Name the following taps `{prefix}.{name}` ("" = global names) in the active recorder, if any."""
    if torch.compiler.is_compiling():
        return
    rec = _ACTIVE.get()
    if rec is not None:
        rec.scope = f"{prefix}." if prefix else ""


def recording() -> bool:
    return _ACTIVE.get() is not None


def stage_of(name: str) -> tuple[str, str]:
    """`layers.3.attn.q` -> ("layers.3", "attn.q"); `mtp.0.norm` -> ("mtp.0", "norm"); `logits` -> ("", "logits")."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] in ("layers", "mtp") and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}", ".".join(parts[2:])
    return "", name


def stage_order() -> list[str]:
    """Every stage name in forward order (global head, per-layer stages, global tail)."""
    return [s for s, _, _ in GLOBAL_HEAD + LAYER_STAGES + GLOBAL_TAIL]
