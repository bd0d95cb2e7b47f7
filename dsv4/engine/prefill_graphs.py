"""Prefill steps without the host bound: the per-token work captured as CUDA graphs per padded token bucket, the
stateful attention cores run eagerly between them.

Why: an eager prefill step issues ~1.3k ops for the 4-layer Flash-width bench model; at 1k tokens the host issues
them slower than the GPU runs them. The whole step captured as one graph replays bit-equal in 29.7 ms against
48.6 ms eager (H100, bench/results/h100_s20/s20b/prefill_graph.json), but a whole-step graph holds for one
prompt length and position only. Most of a step is per-token work that does not care about either.
How: a general step (`StepBatch`) is, per block, `Block.attn_input` + `Attention.project` (per token),
`Attention.core` (per sequence: reads and writes the decode state, its shapes follow the positions) and
`Attention.output` + `Block.after_attn` (per token). The per-token work between two cores is one segment:
segment 0 is the embedding and block 0's input side, segment l block l-1's output side and block l's input side,
segment L the last block's output side. A step of T tokens runs in the smallest bucket of >= T tokens: its ids are
padded with 0 (hash routing reads them) and its positions with 0, which only adds rows of per-token work; each
core reads the first T rows of its segment's projections and writes its output into the bucket's buffer.
With capture off (or on a CPU) the same segments run eagerly on the padded rows: the tests' check of the data
flow, and the reference the GPU test compares the replays with bit for bit.
Exactness: at a bucket's exact size the step is `model.step`'s ops in the same order (bit-equal). Padded, a real
row equals the unpadded step's wherever every per-token kernel is row-invariant; cuBLAS's GEMMs (FP8 linears,
mHC's fp32 mixes) may pick another algorithm for another row count.
The engine's default on CUDA (`EngineConfig.prefill_graphs`); `scripts/bench/prefill_graph.py` measures it.
`compile=`: each segment's two block sides (`output_side`, `input_side`) compiled per block kind and bucket before
the capture (`EngineConfig.compile_prefill`, on where decode steps are compiled), as the decode step's
`compile_scope="block"` (H100, Flash-width bench: 1k / 8k prefill 30.8 / 163.8 -> 25.9 / 122.6 ms).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from dsv4.engine.graphs import BLOCKS_DYNAMO_CONFIG, capture, compiled
from dsv4.model.state import ModelState, StepBatch
from dsv4.ops.moe_pairs import DECODE_KERNEL_MAX_TOKENS
from dsv4.parity.taps import recording


def buckets_up_to(max_tokens: int, smallest: int = DECODE_KERNEL_MAX_TOKENS) -> list[int]:
    """Token buckets for steps of up to `max_tokens` tokens: powers of two from `smallest`, then `max_tokens`.
    The default smallest is the MoE's decode-kernel edge (`check_bucket_edges`)."""
    sizes, n = [], smallest
    while n < max_tokens:
        sizes.append(n)
        n *= 2
    return [*sizes, max_tokens]


# The largest step worth a graph: above it the GPU, not the host, bounds a step, and the segments' output copies
# cost more than the launches they save (Flash-width bench, H100, bench/results/h100_s21: 1k 45.3 eager -> 30.2 ms,
# 2k 56.7 -> 55.9, 8k 164.1 -> 167.4). Longer steps run `model.step` itself (with compile=: `_long_step`).
MAX_GRAPH_TOKENS = 2048
DEFAULT_BUCKETS = tuple(buckets_up_to(MAX_GRAPH_TOKENS))   # 256, 512, 1024, 2048: the engine's default step budget


def check_bucket_edges(sizes) -> None:
    """The MoE chooses its FP4 kernel class by the step's tokens (`ops.moe_pairs.DECODE_KERNEL_MAX_TOKENS`: at most
    that many, the FP8-MMA decode kernel when switched on, which accumulates below fp32). A step padded to its
    bucket must stay on its side of that edge, or the replay and the same step run unpadded would compute its rows
    in two precision classes (the thirty-second session's prefill-graph failures): buckets on both sides of the
    edge must include the edge itself."""
    edge = DECODE_KERNEL_MAX_TOKENS
    if any(n < edge for n in sizes) and any(n > edge for n in sizes) and edge not in sizes:
        raise ValueError(f"prefill buckets {sorted(sizes)} straddle {edge} tokens, where the MoE changes its FP4 "
                         f"kernel class (ops.moe_pairs.DECODE_KERNEL_MAX_TOKENS); include {edge} among them")


def output_side(block, h: torch.Tensor, o: torch.Tensor, cis, post, comb, ids: torch.Tensor) -> torch.Tensor:
    """A block's per-token work after its attention core: the output projection, hc_post and the FFN side."""
    return block.after_attn(h, block.attn.output(o, cis), post, comb, ids)


def input_side(block, h: torch.Tensor, positions: torch.Tensor) -> tuple:
    """A block's per-token work before its attention core: (h, cis, post, comb, projections)."""
    x, cis, post, comb = block.attn_input(h, positions)
    return h, cis, post, comb, block.attn.project(x, cis)


SIDES = (output_side, input_side)


def segment(model, i: int, ids: torch.Tensor, positions: torch.Tensor, prev: tuple | None,
            attn_out: list[torch.Tensor], sides=SIDES) -> tuple:
    """Per-token segment i (0..L) of a step: (h, cis, post, comb, projections) for i < L, (h,) for i = L.
    `prev` is segment i-1's result, `attn_out[i-1]` core i-1's output; `sides`: (output_side, input_side) or
    their compiled versions."""
    layers = model.layers
    if i == 0:
        h = model.embed(ids).unsqueeze(2).repeat(1, 1, model.cfg.hc_mult, 1)
    else:
        h, cis, post, comb, _ = prev
        h = sides[0](layers[i - 1], h, attn_out[i - 1], cis, post, comb, ids)
    if i == len(layers):
        return (h,)
    return sides[1](layers[i], h, positions)


def first_rows(proj, n: int):
    """`Attention.project`'s tensors ([1, T_bucket, ...] each, nested) cut to their first n rows."""
    return tree_map(lambda t: t[:, :n] if isinstance(t, torch.Tensor) else t, proj)


_ALIGN = 256                      # bytes: every view carved from an arena starts on a 256-byte boundary


class _Arena:
    """The memory every bucket's segments and cores exchange data through, shared by all buckets (a step runs in
    one bucket, so they never need it at once): two regions for the segments' outputs (segment i's outputs are
    read by core i and segment i+1 only, so they alternate by parity) and one for the cores' outputs (core i's is
    read by segment i+1 only). Without it each segment's captured outputs and each layer's core output would stay
    alive per bucket: for Flash's 43 layers at a 2k bucket ~6 GB of core outputs alone, ~11 GB over the default
    buckets; with it ~0.6 GB in all. Zeroed once, so the padded rows of a step read finite values (stale ones of
    an earlier step after that: per-token work keeps rows apart, and the padded rows' results are dropped)."""

    def __init__(self, out_bytes: int, attn_shape: tuple, dtype: torch.dtype, device):
        self.parts = [torch.zeros(out_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.attn = torch.zeros(attn_shape, dtype=dtype, device=device)

    def views(self, parity: int, leaves: list) -> list:
        """Views of region `parity` shaped like the tensors among `leaves` (other leaves as they are), packed."""
        part, offset, out = self.parts[parity], 0, []
        for t in leaves:
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                if offset + n > part.numel():
                    raise RuntimeError(f"prefill graphs: a segment's outputs need more than the {part.numel()} "
                                       "bytes measured at the largest bucket")
                t = part[offset:offset + n].view(t.dtype).view(t.shape)
                offset = packed_bytes(offset + n)
            out.append(t)
        return out


def packed_bytes(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def output_bytes(outputs) -> int:
    """Bytes of a segment's outputs packed as `_Arena.views` packs them."""
    total = 0
    for t in tree_flatten(outputs)[0]:
        if isinstance(t, torch.Tensor):
            total = packed_bytes(total + t.numel() * t.element_size())
    return total


class _Bucket:
    """One token bucket: static inputs, and the segments (captured, or run eagerly), which exchange data through
    the shared `_Arena`. Each segment copies its outputs into the arena (~2 x their bytes: ~0.1 ms a layer at 1k
    tokens, Flash width); what a segment allocates inside its capture is freed when the capture ends and reused by
    the next capture in the shared pool (replays never overlap, and no tensor of the pool outlives its segment)."""

    def __init__(self, model, size: int, pool, sides, arena: _Arena):
        dev = next(model.parameters()).device
        self.model, self.sides, self.arena = model, sides, arena
        self.ids = torch.zeros(1, size, dtype=torch.long, device=dev)
        self.positions = torch.zeros(size, dtype=torch.long, device=dev)
        self.attn_out = [arena.attn[:, :size]] * len(model.layers)     # core i writes it, segment i + 1 reads it
        self.views: dict[int, list] = {}
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.outs: list[tuple] = []
        if pool is None:
            return
        self.graphs = []
        with torch.inference_mode():
            prev = None
            for i in range(len(model.layers) + 1):     # in order: each segment reads the previous one's outputs
                graph, prev = capture(lambda i=i, prev=prev: self._segment(i, prev), pool)
                self.graphs.append(graph)
                self.outs.append(prev)

    def _segment(self, i: int, prev: tuple | None) -> tuple:
        with torch._dynamo.config.patch(**BLOCKS_DYNAMO_CONFIG):     # compiled sides: a graph per block kind
            out = segment(self.model, i, self.ids, self.positions, prev, self.attn_out, self.sides)
        leaves, spec = tree_flatten(out)
        if i not in self.views:
            self.views[i] = self.arena.views(i % 2, leaves)
        kept = [v.copy_(t) if isinstance(t, torch.Tensor) else t for v, t in zip(self.views[i], leaves, strict=True)]
        return tree_unflatten(kept, spec)

    def run(self, i: int, prev: tuple | None) -> tuple:
        if self.graphs is None:
            return self._segment(i, prev)
        self.graphs[i].replay()
        return self.outs[i]


class PrefillGraphs:
    """General steps of up to max(sizes) tokens through per-token segment graphs (see the module docstring)."""

    def __init__(self, model, sizes=DEFAULT_BUCKETS, capture: bool = True, compile=None):
        """`compile`: None, or a torch.compile backend ("inductor"; "aot_eager" in the CPU tests) for the
        segments' block sides, compiled per block kind and bucket (static shapes), before their capture: inductor
        fuses the per-token elementwise work (mHC, norms, RoPE, quantisation emulation, routing) that eager runs
        op by op."""
        check_bucket_edges(sizes)
        dev = next(model.parameters()).device
        self.model = model
        sides = SIDES if compile is None else tuple(compiled(f, compile) for f in SIDES)
        # steps longer than every bucket: with `compile`, the same sides compiled with dynamic token counts, run at
        # the step's own length, uncaptured (no padding: a bucket of 8k would pad up to 2x); else `model.step`
        self.long_sides = None if compile is None else tuple(compiled(f, compile, dynamic=True) for f in SIDES)
        capture = capture and dev.type == "cuda"
        pool = torch.cuda.graph_pool_handle() if capture else None
        if capture or compile is not None:     # expert stacks and RoPE tables: nothing created in a capture or trace
            model.prepare_fixed_shape_decode(dev)
        self.buckets = {}
        if sizes:
            arena = self._arena(max(sizes))
            # largest first, so the smaller buckets' captures fit in the memory the first one reserved
            self.buckets = {n: _Bucket(model, n, pool, sides, arena) for n in sorted(sizes, reverse=True)}

    def _arena(self, size: int) -> _Arena:
        """The shared arena, sized by one eager run of the (uncompiled) segments at the largest bucket on zeros
        (the values do not matter, the outputs' sizes do; smaller buckets' outputs are smaller)."""
        model, cfg = self.model, self.model.cfg
        dev = next(model.parameters()).device
        ids, positions = torch.zeros(1, size, dtype=torch.long, device=dev), torch.zeros(size, dtype=torch.long,
                                                                                          device=dev)
        attn = torch.zeros(1, size, cfg.n_heads, cfg.head_dim, dtype=model.dtype, device=dev)
        need, prev = 0, None
        with torch.inference_mode():
            for i in range(len(model.layers) + 1):
                prev = segment(model, i, ids, positions, prev, [attn] * len(model.layers))
                need = max(need, output_bytes(prev))
        return _Arena(need, tuple(attn.shape), model.dtype, dev)

    def step(self, input_ids: torch.Tensor, batch: StepBatch, state: ModelState) -> torch.Tensor:
        """`model.step` for a general step: input_ids [1, T] -> final hc streams [1, T, hc, D] (a copy); reads and
        advances every sequence's decode state. Steps longer than the largest bucket run `model.step` itself, or
        with `compile` the segments at their own length (`_long_step`); steps run while taps are recorded (the
        segments skip the per-block taps) run `model.step`."""
        n = input_ids.shape[1]
        fits = [size for size in self.buckets if size >= n]
        if recording() or not isinstance(batch, StepBatch) or (not fits and self.long_sides is None):
            return self.model.step(input_ids, batch, state)
        if not fits:
            return self._long_step(input_ids, batch, state)
        bucket = self.buckets[min(fits)]
        bucket.ids.zero_()
        bucket.ids[:, :n].copy_(input_ids)
        bucket.positions.zero_()
        bucket.positions[:n].copy_(batch.positions)
        prev = None
        for i, (layer, layer_state) in enumerate(zip(self.model.layers, state.layers, strict=True)):
            prev = bucket.run(i, prev)
            o = layer.attn.core(first_rows(prev[4], n), batch, layer_state, self.model.dtype)
            bucket.attn_out[i][:, :n].copy_(o)
        return bucket.run(len(self.model.layers), prev)[0][:, :n].clone()

    def _long_step(self, input_ids: torch.Tensor, batch: StepBatch, state: ModelState) -> torch.Tensor:
        """A step longer than every bucket: the segments at the step's own length through the dynamic-shape
        compiled sides, eagerly (`model.step`'s ops, fused by the compiler), the cores between them."""
        layers, attn_out, prev = self.model.layers, [], None
        with torch._dynamo.config.patch(**BLOCKS_DYNAMO_CONFIG):
            for i, (layer, layer_state) in enumerate(zip(layers, state.layers, strict=True)):
                prev = segment(self.model, i, input_ids, batch.positions, prev, attn_out, self.long_sides)
                attn_out.append(layer.attn.core(prev[4], batch, layer_state, self.model.dtype))
            return segment(self.model, len(layers), input_ids, batch.positions, prev, attn_out, self.long_sides)[0]
