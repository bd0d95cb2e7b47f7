"""The registry behind `dsv4.ops`: per op, a plain twin and optional fast implementations.

A fast implementation is registered with a predicate saying which calls it handles (device, dtype, format); the
first one that accepts a call runs it, else the twin does. `DSV4_FAST_OPS=0` (read at each call, so tests and
benchmarks can flip it) or the `reference_only()` context turns every fast path off.
Under `torch.compile` the switch is read once, when a graph is traced (a compiled graph, like a captured CUDA
graph, keeps the kernels it was built with), and fast implementations must be torch custom ops (opaque nodes:
`custom_op` below), so the compiler fuses the plain PyTorch around them without tracing into kernel launchers.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from contextvars import ContextVar

import torch

_FAST: dict[str, list[tuple[str, Callable[..., bool], Callable]]] = {}
# True: every op runs its twin; a frozenset: those ops do (`reference_only("linear")`, to bisect a difference).
_reference_only: ContextVar[bool | frozenset] = ContextVar("dsv4_reference_only", default=False)


def trace_constant(fn: Callable) -> Callable:
    """`torch._dynamo.assume_constant_result` without importing Dynamo at import time (~1.3 s of start-up for every
    process that never compiles: the server, the CLI, TP ranks). Torch's decorator only sets this mark, which Dynamo
    reads when it traces a call; tests/test_fast_ops.py checks the two mark alike."""
    fn._dynamo_marked_constant = True
    return fn


def fast_enabled(op: str | None = None) -> bool:
    """May `op` (None: any op) take a fast path here?"""
    if torch.compiler.is_compiling():
        return _fast_enabled_at_trace(op)
    return _fast_enabled_now(op)


def _fast_enabled_now(op: str | None) -> bool:
    off = _reference_only.get()
    if off is True or os.environ.get("DSV4_FAST_OPS", "1") == "0":
        return False
    return not (off and op in off)


@trace_constant
def _fast_enabled_at_trace(op: str | None) -> bool:
    return _fast_enabled_now(op)


def custom_op(name: str, fake: Callable):
    """Decorator: make a fast implementation the torch custom op `dsv4::{name}` (type-annotated signature) with
    `fake` computing its output's shape and dtype (for tracing).

    The decorated name calls the op where it matters (under `torch.compile`, and with autograd on: a training
    kernel's backward is registered on the op, `.register_autograd`) and the function itself otherwise: in eager
    inference the op's dispatch adds host time and nothing else (~35 us a call on the H100 machine,
    scripts/bench/fp8_linear_host.py; a 1k prefill makes ~90 such calls, and it is host-bound)."""
    def wrap(fn: Callable):
        op = torch.library.custom_op(f"dsv4::{name}", mutates_args=())(fn)
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            # A dispatch mode on the stack means tracing (fake or functional tensors: a kernel launcher cannot take
            # them), e.g. AOT autograd tracing a backward, where grad is off and torch 2.11's is_compiling() is
            # False: the GPU suite's compiled training step reached a Triton launcher that way.
            if torch.compiler.is_compiling() or torch.is_grad_enabled() or torch._C._len_torch_dispatch_stack():
                return op(*args, **kwargs)
            return fn(*args, **kwargs)
        call.register_autograd = op.register_autograd
        return call
    return wrap


def register(op: str, name: str, applies: Callable[..., bool], impl: Callable) -> None:
    """Add a fast implementation `name` of `op`, used for calls where `applies(*args, **kwargs)` is true."""
    _FAST.setdefault(op, []).append((name, applies, impl))


def register_triton(op: str, name: str, applies: Callable[..., bool], impl: Callable) -> None:
    """`register` a Triton kernel's implementation, only where Triton is installed (CPU-only installs without it
    run the twin)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    register(op, name, applies, impl)


def _selected(op: str, args, kwargs) -> tuple[str, Callable] | None:
    """(name, implementation) of the first fast implementation of `op` that takes this call, or None."""
    if fast_enabled(op):
        for name, applies, impl in _FAST.get(op, ()):
            if applies(*args, **kwargs):
                return name, impl
    return None


def dispatch(op: str, twin: Callable) -> Callable:
    def call(*args, **kwargs):
        fast = _selected(op, args, kwargs)
        return (twin if fast is None else fast[1])(*args, **kwargs)
    call.__name__, call.__doc__, call.twin = op, twin.__doc__, twin
    return call


def which(op: str, *args, **kwargs) -> str:
    """The name of the implementation that `dsv4.ops.<op>(*args, **kwargs)` would run here ("twin" if no fast one
    applies): tests and benchmarks assert it, so a fast path that quietly stopped applying cannot pass as tested."""
    fast = _selected(op, args, kwargs)
    return "twin" if fast is None else fast[0]


@contextlib.contextmanager
def reference_only(*ops: str):
    """Run every op (or only `ops`, e.g. "linear", "moe_grouped") through its plain-PyTorch twin inside the block."""
    outer = _reference_only.get()
    token = _reference_only.set(True if outer is True or not ops else frozenset(ops) | (outer or frozenset()))
    try:
        yield
    finally:
        _reference_only.reset(token)


# Switches removed after their measurement (bench/NOTES.md names each; a few were replaced by a default): set, they
# would do nothing, so an A/B that still sets one would compare the default with itself (`warn_removed_switches`).
REMOVED_SWITCHES = {
    "DSV4_FP8_FUSED_SUM": "thirty-eighth session: no faster", "DSV4_FP8_WIDE_TILES": "thirty-eighth session: no faster",
    "DSV4_MOE_TRANSIENT": "thirty-eighth session: slower",
    "DSV4_PDL": "forty-first session, h100_s41: slower at every decode batch",
    "DSV4_FP4_DECODE_F16": "forty-first session, h100_s41: no gain at any decode batch",
    "DSV4_FP4_F16_PREFILL": "forty-first session: rode on DSV4_FP4_DECODE_F16's kernel",
    "DSV4_FP8_F16_MMA": "forty-first session, h100_s41: slower than prequant alone at bs64, no agreement gain shown",
    "DSV4_FP8_PREQUANT_MAX_M": "forty-first session: prequant is the default from 33 rows; DSV4_FP8_PREQUANT=0 / 1 "
                               "forces it off / on",
}


def warn_removed_switches() -> list[str]:
    """Warn once per removed switch set in the environment (`dsv4.ops` calls this at import); returns their names."""
    import warnings

    found = sorted(name for name in REMOVED_SWITCHES if name in os.environ)
    for name in found:
        warnings.warn(f"{name} is set but has no effect: that switch was removed (bench/NOTES.md, "
                      f"{REMOVED_SWITCHES[name]})", UserWarning, stacklevel=2)
    return found


def env_switch(name: str, default: bool = False) -> bool:
    """An environment switch of a fast path: "1" on, "0" off, unset `default` (opt-in switches: off; opt-out ones:
    on), else an error (a typo must not silently measure the wrong path)."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def fast_op_names() -> list[str]:
    """Every op with a registered fast implementation (plus "moe_grouped", the MoE's grouped-GEMM prefill path,
    "moe_batched", its batched training path, and "attention_recompute", training's checkpointed attention)."""
    return [*_FAST, "moe_grouped", "moe_batched", "attention_recompute"]


def fast_ops_status() -> dict[str, list[str]]:
    """{op: [registered fast implementations]} and whether they are on."""
    return {"enabled": [str(fast_enabled())], **{op: [n for n, _, _ in impls] for op, impls in _FAST.items()}}
