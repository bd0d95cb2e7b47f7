"""CUDA graphs of decode steps: one captured `model.step` + logits per batch-size bucket, replayed with new inputs.

A decode step through a `DecodeBatch` has fixed shapes and no host synchronisation, so it can be captured once
per bucket (1, 2, 4, 8, ... up to `max_batch`) and replayed: the launch overhead of thousands of small kernels
becomes one graph launch. Batches are padded up to their bucket with rows that write only to a scratch slot and
a scratch page, which the caller reserves in the `ModelState` (the last slot and the last page).
With `compile=True` the step is first compiled by `torch.compile` (inductor; one graph, no breaks), which fuses
the thousands of small element-wise kernels between the GEMMs and the fast ops (custom ops, opaque to it); the
compiled step is what gets captured. Compilation happens per bucket at construction (warm-up), never in a replay.
`compile_scope="block"` compiles each block instead (one graph per block kind and bucket, `compiled_blocks`): the
whole-step graph grows with depth (v8: 157 s a bucket at 20 layers), the per-kind graphs do not.
A `DecodeGraphs` of `tokens_per_seq=T > 1` steps T consecutive tokens per sequence (speculative verification of
k = T - 1 drafts, `forward=verify_forward`): the graphs are then keyed by (bucket, T), T fixed per instance.
NOTE: the finite-logits check runs after the replay (it synchronises, which a capture cannot).
"""

from __future__ import annotations

import torch

from dsv4.model.state import DecodeBatch, ModelState
from dsv4.ops.rowwise import NON_FINITE, all_finite

COMPILE_SCOPES = ("step", "block")


def buckets_up_to(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


def decode_logits(model, tokens: torch.Tensor, batch: DecodeBatch, state: ModelState, layer_fn=None) -> torch.Tensor:
    """The function a bucket runs: one decode step -> main-head fp32 logits [B*T, V]."""
    h = model.step(tokens, batch, state, layer_fn)
    return model.logits(h, model.norm, model.hc_head_fn, model.hc_head_scale, model.hc_head_base)[0]


def verify_forward(model, tokens: torch.Tensor, batch: DecodeBatch, state: ModelState, layer_fn=None):
    """Speculative verification (engine/speculative.py): (final hc streams [1, B*T, hc, D], the MTP block's input;
    main-head fp32 logits [B*T, V])."""
    h = model.step(tokens, batch, state, layer_fn)
    return h, model.logits(h, model.norm, model.hc_head_fn, model.hc_head_scale, model.hc_head_base)[0]


def _call_block(layer, h, input_ids, batch, layer_state):
    return layer(h, input_ids, batch, layer_state)


# recompile_limit: every block shares one compiled function (one cache entry per block kind and bucket);
# fail_on_recompile_limit_hit turns a silent fall-back to eager into an error.
BLOCKS_DYNAMO_CONFIG = dict(recompile_limit=256, fail_on_recompile_limit_hit=True)


def compiled_blocks(forward, backend: str = "inductor"):
    """`forward` (decode_logits or verify_forward) with each block compiled on its own instead of the whole step:
    one function for every block, so Dynamo keeps one graph per block KIND (attention ratio, hash or top-k routing)
    and bucket, the weights being graph inputs: a Flash step of 43 layers compiles ~5 block graphs per bucket
    instead of one graph of 43 blocks (v8: 157 s a bucket at 20 layers). What is lost: fusion across a block's
    boundary and over the embedding and head (a few ops a step)."""
    block = compiled(_call_block, backend)

    def run(model, tokens, batch, state):
        with torch._dynamo.config.patch(**BLOCKS_DYNAMO_CONFIG):
            return forward(model, tokens, batch, state, block)
    return run


def compiled(fn, backend: str = "inductor", dynamic: bool = False):
    """`fn` through torch.compile: static shapes (one compilation per bucket; `dynamic=True`: sizes symbolic, one
    compilation for every token count), the whole step one graph, and bf16 roundings kept where eager rounds
    (inductor would otherwise keep some fused intermediates in fp32).
    `backend="aot_eager"` traces and functionalises the same graph but runs it eagerly: the CPU tests' check of
    the tracing (inductor's CPU code generator fails on this graph in torch 2.13; GPUs generate Triton)."""
    options = {"emulate_precision_casts": True} if backend == "inductor" else None     # inductor-only options
    return torch.compile(fn, dynamic=dynamic, fullgraph=True, backend=backend, options=options)


def capture(fn, pool):
    """(CUDA graph, fn's output) of `fn` captured into `pool` after two eager warm-up calls (caches such as bf16
    weights and expert stacks, kernel autotuning: nothing may be created or tuned inside a capture)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class _Graph:
    """One bucket: static inputs, and the captured step (or, with capture off, the same step run eagerly)."""

    def __init__(self, model, state: ModelState, size: int, max_pages: int, scratch: tuple[int, int], pool,
                 forward=decode_logits, tokens_per_seq: int = 1):
        dev = state.device
        slot, page = scratch
        self.model, self.state, self.forward = model, state, forward
        # The step's inputs in one buffer: ids [B*T], then the batch (`DecodeBatch.values`' layout), so a replay's
        # new inputs arrive in one host-to-device copy (`DecodeGraphs.run`).
        n_ids = size * tokens_per_seq
        self.inputs = torch.zeros(n_ids + size * (1 + tokens_per_seq + max_pages), dtype=torch.long, device=dev)
        self.inputs[n_ids:] = torch.tensor(DecodeBatch.values([(slot, 0, [page])] * size, max_pages, tokens_per_seq))
        self.tokens = self.inputs[:n_ids].view(1, n_ids)
        self.batch = DecodeBatch.view(self.inputs[n_ids:], size, max_pages, tokens_per_seq)
        self.graph = None
        if pool is None:
            return
        with torch.inference_mode():
            self.graph, self.logits = capture(lambda: self._forward(model, state), pool)

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
                 sizes: list[int] | None = None, compile: bool | str = False, tokens_per_seq: int = 1,
                 forward=decode_logits, compile_scope: str = "step"):
        """compile: False, True (inductor), a backend name or a Dynamo backend callable; compile_scope "step"
        (the whole step one graph) or "block" (`compiled_blocks`: a graph per block kind, less to compile at
        depth)."""
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
        self.model, self.state, self.max_pages, self.tokens_per_seq = model, state, max_pages, tokens_per_seq
        self.scratch = (state.slots - 1, state.pages - 1)
        capture = capture and state.device.type == "cuda"          # capture off (or CPU): same path, run eagerly
        pool = torch.cuda.graph_pool_handle() if capture else None
        if compile:
            model.prepare_fixed_shape_decode(state.device)
            backend = "inductor" if compile is True else compile          # a name, or a Dynamo backend callable
            forward = compiled(forward, backend) if compile_scope == "step" else compiled_blocks(forward, backend)
        # Largest first, so later (smaller) captures fit in the memory pool the first one reserved.
        order = sorted(sizes or buckets_up_to(max_batch), reverse=True)
        if compile:                      # ~35 s per bucket at Flash width: show it
            from tqdm import tqdm

            order = tqdm(order, desc="compiling + capturing decode steps (batch buckets)", unit="bucket")
        self.graphs = {b: _Graph(model, state, b, max_pages, self.scratch, pool, forward, tokens_per_seq)
                       for b in order}

    def run(self, tokens: list[int] | torch.Tensor, rows: list[tuple[int, int, list[int]]], check: bool = True):
        """Logits [B*T, V] fp32 for T new tokens per sequence (ids as a list or a device tensor [B*T], sequence by
        sequence): rows are (slot, first position, pages). With `forward=verify_forward`: (h [1, B*T, hc, D],
        logits); both are the graph's output buffers, overwritten by the next replay.
        `check`: raise FloatingPointError on NaN/inf logits, which reads the device (a sync). check=False leaves
        the check to the caller, who must make it before any result is used (`ModelRunner._decode` reads it with
        the sampled ids: one sync a step, and the sampler's launches queue behind the replay instead of after
        the GPU went idle)."""
        n, t = len(rows), self.tokens_per_seq
        size = min(b for b in self.graphs if b >= n)
        g = self.graphs[size]
        pad = size - n
        values = DecodeBatch.values(rows + [(self.scratch[0], 0, [self.scratch[1]])] * pad, self.max_pages, t)
        on_device = isinstance(tokens, torch.Tensor)
        if not on_device:
            values = tokens + [0] * pad * t + values
        # pinned: the copy is a DMA that queues on the stream (from pageable memory the driver may wait for the
        # stream first); the caching host allocator keeps the block until the copy has run
        host = torch.tensor(values, dtype=torch.long, pin_memory=g.inputs.is_cuda)
        g.inputs[-len(values):].copy_(host, non_blocking=True)
        if on_device:
            g.tokens.zero_()
            g.tokens[0, :n * t].copy_(tokens.view(-1))
        out = g.replay()
        h, logits = out if isinstance(out, tuple) else (None, out)
        logits = logits[:n * t]
        if check and not all_finite(logits):
            raise FloatingPointError(NON_FINITE)
        return logits if h is None else (h[:, :n * t], logits)
