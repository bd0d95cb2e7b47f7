"""CUDA graphs of decode steps: one captured `model.step` + logits per batch-size bucket, replayed with new inputs.

A decode step through a `DecodeBatch` has fixed shapes and no host synchronisation, so it can be captured once
per bucket (1, 2, 4, 8, ... up to `max_batch`) and replayed: the launch overhead of thousands of small kernels
becomes one graph launch. Batches are padded up to their bucket with rows that write only to a scratch slot and
a scratch page, which the caller reserves in the `ModelState` (the last slot and the last page).
With `compile=True` the step is first compiled by `torch.compile` (inductor; one graph, no breaks), which fuses
the thousands of small element-wise kernels between the GEMMs and the fast ops (custom ops, opaque to it); the
compiled step is what gets captured. Compilation happens per bucket at construction (warm-up), never in a replay.
NOTE: the finite-logits check runs after the replay (it synchronises, which a capture cannot).
"""

from __future__ import annotations

import torch

from dsv4.model.state import DecodeBatch, ModelState


def buckets_up_to(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


def decode_logits(model, tokens: torch.Tensor, batch: DecodeBatch, state: ModelState) -> torch.Tensor:
    """The function a bucket runs: one decode step -> main-head fp32 logits [B, V]."""
    h = model.step(tokens, batch, state)
    return model.logits(h, model.norm, model.hc_head_fn, model.hc_head_scale, model.hc_head_base)[0]


def compiled(fn, backend: str = "inductor"):
    """`fn` through torch.compile: static shapes (one compilation per bucket), the whole step one graph, and bf16
    roundings kept where eager rounds (inductor would otherwise keep some fused intermediates in fp32).
    `backend="aot_eager"` traces and functionalises the same graph but runs it eagerly: the CPU tests' check of
    the tracing (inductor's CPU code generator fails on this graph in torch 2.13; GPUs generate Triton)."""
    options = {"emulate_precision_casts": True} if backend == "inductor" else None     # inductor-only options
    return torch.compile(fn, dynamic=False, fullgraph=True, backend=backend, options=options)


class _Graph:
    """One bucket: static inputs, and the captured step (or, with capture off, the same step run eagerly)."""

    def __init__(self, model, state: ModelState, size: int, max_pages: int, scratch: tuple[int, int], pool,
                 forward=decode_logits):
        dev = state.device
        slot, page = scratch
        self.model, self.state, self.forward = model, state, forward
        self.tokens = torch.zeros(1, size, dtype=torch.long, device=dev)
        self.batch = DecodeBatch.build([(slot, 0, [page])] * size, max_pages, dev)
        self.graph = None
        if pool is None:
            return
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode():
            for _ in range(2):                       # warm-up: caches (bf16 weights, expert stacks), kernel autotune
                self._forward(model, state)
            torch.cuda.synchronize()
            with torch.cuda.graph(self.graph, pool=pool):
                self.logits = self._forward(model, state)

    def replay(self) -> torch.Tensor:
        if self.graph is None:
            with torch.inference_mode():
                return self._forward(self.model, self.state)
        self.graph.replay()
        return self.logits

    def _forward(self, model, state) -> torch.Tensor:
        return self.forward(model, self.tokens, self.batch, state)


class DecodeGraphs:
    """Captured decode steps for batch sizes up to `max_batch` over `state`, whose last slot and last page are
    scratch space for padding rows (never given to a sequence)."""

    def __init__(self, model, state: ModelState, max_batch: int, max_pages: int, capture: bool = True,
                 sizes: list[int] | None = None, compile: bool | str = False):
        self.model, self.state, self.max_pages = model, state, max_pages
        self.scratch = (state.slots - 1, state.pages - 1)
        capture = capture and state.device.type == "cuda"          # capture off (or CPU): same path, run eagerly
        pool = torch.cuda.graph_pool_handle() if capture else None
        forward = decode_logits
        if compile:
            model.prepare_fixed_shape_decode(state.device)
            forward = compiled(decode_logits, compile if isinstance(compile, str) else "inductor")
        # Largest first, so later (smaller) captures fit in the memory pool the first one reserved.
        order = sorted(sizes or buckets_up_to(max_batch), reverse=True)
        if compile:                      # ~35 s per bucket at Flash width: show it
            from tqdm import tqdm

            order = tqdm(order, desc="compiling + capturing decode steps (batch buckets)", unit="bucket")
        self.graphs = {b: _Graph(model, state, b, max_pages, self.scratch, pool, forward) for b in order}

    def run(self, tokens: list[int] | torch.Tensor, rows: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """Logits [B, V] fp32 for one new token per sequence (ids as a list or a device tensor [B]): rows are
        (slot, position, pages)."""
        n = len(rows)
        size = min(b for b in self.graphs if b >= n)
        g = self.graphs[size]
        pad = size - n
        batch = DecodeBatch.build(rows + [(self.scratch[0], 0, [self.scratch[1]])] * pad, self.max_pages, "cpu")
        if isinstance(tokens, torch.Tensor):
            g.tokens.zero_()
            g.tokens[0, :n].copy_(tokens.view(-1))
        else:
            g.tokens.copy_(torch.tensor([tokens + [0] * pad]), non_blocking=True)
        g.batch.copy_(batch)
        logits = g.replay()[:n]
        if not torch.isfinite(logits).all():
            raise FloatingPointError("non-finite logits (NaN/inf): the weights or inputs are broken")
        return logits
