"""The compiled training forward (issue 17): every block's `forward` through `torch.compile`, packs padded to one
fixed length so that the graphs compiled at the first step serve every step.

Why: the eager training step of the built-in v2 issues ~14.6k small ATen ops (mHC mixing in fp32, RMSNorms, the QAT
fake-quant chain of every linear input, RoPE, clamped SwiGLU, casts); on an H200 the step is launch-bound. Inductor
fuses those elementwise chains into a few Triton kernels per graph. `backend="aot_eager"` runs exactly the graphs
inductor would get (Dynamo capture + AOTAutograd's joint forward/backward) with eager ATen ops: the CPU tests use
it to check tracing and numerics; "inductor" is the GPU setting.

What compiles: `Block.forward` of every layer and of the MTP block (the module's own `forward` is replaced on the
instance, so every caller, `hidden` and `mtp_forward` alike, gets the compiled one), attention, indexer top-k and
MoE included. Two Dynamo switches make that possible (set per call, not globally):
`capture_scalar_outputs` and `capture_dynamic_output_shape_ops` trace the MoE's expert grouping (`bincount` and the
largest group, `int(counts.max())`, the one host sync per MoE layer) as an unbacked size instead of breaking the
graph there. The one graph break left is the expert-load counter's hook (`LoadCounter`, not traced): 4 graphs per
block, pinned in tests/test_train_compile.py; bench/notes/train_speed.md lists what was removed and what is left.
Not compiled: the embedding, the head's loss and the MTP input mix and head (a few dozen ops a step), the optimizer.

Fixed shapes: `pad_batch` extends a one-sequence pack with padding tokens after the real ones (masked out of the
loss: targets IGNORE). Attention is causal and compressed entries are visible only once their block is complete,
so the real tokens' forward is unchanged (tests check loss and gradients against the unpadded step). The MTP block
runs over the same length (`mtp_loss_sum`), and every block is compiled with `dynamic=False`: one static graph set
per block kind, compiled at the first step; the trainer logs any graph compiled after it (`compiled_graphs`).
NOTE: the padding tokens pass through the routers; `LoadCounter.real_tokens` keeps them out of the expert load.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from dsv4.train.data import Document, Row
from dsv4.train.forward import PackedBatch, packed_batch

BACKENDS = ("aot_eager", "inductor")
PAD_ID = 0
# Per call of a compiled block. recompile_limit: all blocks share one code object (Block.forward), one cache entry
# each; fail_on_recompile_limit_hit turns a silent fall-back to eager into an error.
DYNAMO_CONFIG = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True, recompile_limit=64,
                     fail_on_recompile_limit_hit=True)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [*model.layers, *model.mtp]


class CompiledForward:
    """A block's `forward`, compiled (torch.compile of the bound method) and called under `DYNAMO_CONFIG`."""

    def __init__(self, block: nn.Module, backend):
        """backend: one of BACKENDS, or a Dynamo backend callable (tests count the graphs with one)."""
        if not callable(backend) and backend not in BACKENDS:
            raise ValueError(f"unknown compile backend {backend!r}; choose from {BACKENDS}")
        self.backend = backend
        self.eager = False                      # `eager_blocks`: the plain forward for a while
        self.plain = type(block).forward.__get__(block)
        # dynamic=False: a size that differs from a cached graph's compiles another static graph. Left to Dynamo's
        # default (automatic dynamic shapes) it compiled the block again with symbolic sizes, for every kind sharing
        # the code object (Block.forward): slower to compile and to run. Sizes are fixed by padding instead.
        self.fn = torch.compile(self.plain, backend=backend, dynamic=False)

    def __call__(self, *args, **kwargs):
        if self.eager:
            return self.plain(*args, **kwargs)
        with torch._dynamo.config.patch(**DYNAMO_CONFIG):
            return self.fn(*args, **kwargs)


def compile_blocks(model: nn.Module, backend) -> nn.Module:
    """Make every block (layers and MTP) run its compiled forward; `uncompile_blocks` undoes it.
    The RoPE tables are put on the device first: `Rotary.cis` fills its per-device cache on first use, and a cache
    filled during the first trace fails that trace's guard on the next step (one recompilation per block)."""
    device = next(model.parameters()).device
    for block in _blocks(model):
        block.attn.rotary.cis(torch.zeros(1, dtype=torch.long, device=device))
        block.forward = CompiledForward(block, backend)
    return model


def uncompile_blocks(model: nn.Module) -> nn.Module:
    for block in _blocks(model):
        if isinstance(block.__dict__.get("forward"), CompiledForward):
            del block.forward
    return model


@contextmanager
def eager_blocks(model: nn.Module):
    """Inside, compiled blocks run their plain forward: for the greedy probe, whose sequences grow a token at a time
    (each length would compile a graph set), while the packs, all of one padded shape, keep the compiled one."""
    compiled = [f for b in _blocks(model) if isinstance(f := b.__dict__.get("forward"), CompiledForward)]
    for f in compiled:
        f.eager = True
    try:
        yield
    finally:
        for f in compiled:
            f.eager = False


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process (all backends); the trainer logs any compiled after its first
    step (a guard failed: a shape or a Python value changed), each a compilation and possibly a slower graph."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_cache_counts() -> dict[str, int]:
    """Hits, misses and bypasses of inductor's FX graph cache and AOTAutograd's cache in this process. Both persist
    on disk (default /tmp/torchinductor_$USER), so a second run on the same machine (the probe's graphs, then the
    training run's) should hit instead of compiling its kernels again."""
    from torch._dynamo.utils import counters

    return {f"{group}.{k}": v for group in ("inductor", "aot_autograd") for k, v in counters[group].items()
            if "cache" in k}


def pad_document(doc: Document, length: int, pad_id: int = PAD_ID) -> Document:
    """doc followed by padding tokens up to `length` tokens; padding is never a target (mask False)."""
    if len(doc) > length:
        raise ValueError(f"a document of {len(doc)} tokens does not fit a padded length of {length}")
    n = length - len(doc)
    return Document(doc.ids + [pad_id] * n, doc.mask + [False] * n)


def pad_pack(docs: list[Document], length: int) -> list[Document]:
    """A one-sequence pack padded to `length` tokens. Packs of several documents are separate sequences whose
    lengths vary anyway: they are an error here, not a silent recompile."""
    if len(docs) != 1:
        raise ValueError(f"padding needs one sequence per pack (concatenated documents), got {len(docs)}")
    return [pad_document(docs[0], length)]


def pad_rows(rows: list[Row], n_rows: int, pad_id: int = PAD_ID) -> list[Row]:
    """A rows pack (`data.row_packs`) extended to `n_rows` rows with empty ones (padding only: no target, no expert
    load). The last pack of an epoch holds fewer rows, which would be another shape for the compiled blocks. Rows
    are separate sequences of one batch, so the real rows' forward is unchanged."""
    if len(rows) > n_rows:
        raise ValueError(f"a rows pack of {len(rows)} rows does not fit a padded pack of {n_rows} rows")
    n = len(rows[0])
    return rows + [Row([pad_id] * n, [False] * n, 0) for _ in range(n_rows - len(rows))]


def pad_batch(pb: PackedBatch, length: int) -> PackedBatch:
    """`pad_pack` of a built batch (the same batch when it has that length)."""
    if len(pb.docs) == 1 and len(pb.docs[0]) == length:
        return pb
    return packed_batch(pad_pack(pb.docs, length), pb.input_ids.device)
