"""Sparse attention with the per-head sink as a dispatched op: the twin `ops.ref.sparse_attention` and, for
prefill chunks on CUDA, the fused Triton kernel (`ops/triton/sparse_attention.py`).

The twin gathers every query's KV rows into a [b, s, k, d] tensor and upcasts it once for both products
(`ref.upcast_pair`: 1.3 GB fp32 per layer at a 1k-token chunk, 10.7 GB at 8k); the kernel gathers each tile of rows
in the program with an online softmax.
Measured on an H200 at Flash dims (`scripts/bench/sparse_attention.py`, bench/results/h200_sparse_attention.log):
an 8k prefill chunk 41.4 ms (twin) -> 3.66 ms (64 heads per program, 32-row tiles, 8 warps). Numerics: golden's
"tiled" class (probabilities rounded per tile, relative to the running max), rel. error vs float64 2.1e-3 like
the twin's. Decode (one query per sequence) takes the kernel too, since the seventh session: the twin's GEMMs
are not batch-invariant on CUDA (cuBLAS picks by shape: batch 1 in the general step, B in the fixed step), which
moved one output element by a bf16 ulp and, through the FP8 act-quant emulation, the greedy trajectory
(tests/test_graphs_gpu.py, 1-token case; the 3-token case already ran the kernel and passed). The kernel computes
each (query, head block) in its own program over the same tiles, with a split count from the sequence alone
(`default_splits`; decode tiles run unsplit: `kernel_config`), so a query's bits do not depend on the batch.
On the H200 (ninth session) the prefill tiles at decode cost bs1 1.64 -> 1.87 ms against the inductor-fused twin;
the decode tiles are the micro-benchmark's best (0.094 vs 0.185 ms a call at bs1), GPU-unmeasured in the step.
The index list comes from the model (window + picked entries, checked by the model's tests), so the kernel's
own index range check, a host synchronisation, is skipped.
Training (autograd on) runs the twin recomputed in the backward, and HCA layers' compressed entries as a dense tail
(`sparse_attention_dense_tail`): activation memory linear in the sequence (bench/notes/train_speed.md). In
inference the dense tail runs the kernel over its definition's layout (rows [kv | tail], lists [idx | tail rows]).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dsv4.ops import ref
from dsv4.ops.registry import custom_op, dispatch, env_switch, fast_enabled, register, register_triton, trace_constant

sparse_attention = dispatch("sparse_attention", ref.sparse_attention)


def _training(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _recompute(fn, *args):
    """fn(*args) under activation checkpointing (training; pseudo-op "attention_recompute" switches it off):
    autograd keeps only the inputs and recomputes the rest in the backward. Otherwise it keeps the gathered rows
    [b, s, k, d] upcast (one copy for both products, `ref.upcast_pair`; twice before) plus the [b, s, h, k] scores
    and probabilities: ~0.6 MB per token over the built-in v2's 7 layers (with two copies), half of a training
    step's activations. The recomputation repeats the same ops on the same inputs: bit-identical."""
    if not fast_enabled("attention_recompute"):
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


@trace_constant
def train_kernel_enabled() -> bool:
    """Training's sparse attention on the fused op below, on by default on CUDA (DSV4_SPARSE_ATTN_TRAIN=0: the
    twin, recomputed). Measured on the H200 (eighteenth session, bench/results/h200_s18/): a layer's forward +
    backward at 32k tokens 29.7 -> 1.63 ms, the built-in model's 32k-token step 0.566 -> 0.407 s. Read once per
    traced graph under torch.compile."""
    return env_switch("DSV4_SPARSE_ATTN_TRAIN", default=True)


def _train_kernel_fits(q, kv, sink, *tails) -> bool:
    return (train_kernel_enabled() and _training(q, kv, sink, *tails) and q.is_cuda
            and q.dtype == kv.dtype == torch.bfloat16 and sink.dtype == torch.float32
            and all(t.dtype == q.dtype for t in tails))


@custom_op("sparse_attention_train", lambda q, kv, sink, idx, scale: (
    torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)))
def _train_forward(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from dsv4.ops.triton.sparse_attention_train import forward

    return forward(q.contiguous(), kv.contiguous(), sink.contiguous(), idx.contiguous(), scale)


@custom_op("sparse_attention_train_backward", lambda do, q, kv, sink, idx, out, lse, scale: (
    torch.empty_like(q), torch.empty_like(kv), torch.empty_like(sink)))
def _train_backward(do: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dsv4.ops.triton.sparse_attention_train import backward

    return backward(do, q.contiguous(), kv.contiguous(), sink.contiguous(), idx.contiguous(), out, lse, scale)


def _train_setup(ctx, inputs, output):
    q, kv, sink, idx, scale = inputs
    ctx.save_for_backward(q, kv, sink, idx, *output)
    ctx.scale = scale


def _train_grad(ctx, grad_out, grad_lse):
    q, kv, sink, idx, out, lse = ctx.saved_tensors
    return (*_train_backward(grad_out, q, kv, sink, idx, out, lse, ctx.scale), None, None)


_train_forward.register_autograd(_train_grad, setup_context=_train_setup)


def sparse_attention_train(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """`ref.sparse_attention` with its gradients (q, kv, sink) from the fused Triton pair (the interpreter on CPU):
    nothing [b, s, k, *] in memory, no recomputation (bench/notes/train_speed.md). The lists come from the model,
    so there is no index range check (a host sync)."""
    return _train_forward(q, kv, sink, idx, float(scale))[0]


def _dense_tail_train(q, kv, sink, idx, tail, visible, scale):
    """The dense tail through the definition's layout (`ref.dense_tail_lists`: tail rows appended to kv, their
    visible indices to each list); autograd splits the rows' gradient back into kv and tail."""
    rows, lists = ref.dense_tail_lists(kv, idx, tail, visible)
    return sparse_attention_train(q, rows, sink, lists, scale)


# Training, first the fused op (default on CUDA), else the twin recomputed in the backward.
register_triton("sparse_attention", "triton_sparse_attention_train",
                lambda q, kv, sink, idx, scale: _train_kernel_fits(q, kv, sink), sparse_attention_train)
register("sparse_attention", "sparse_attention_recompute", lambda q, kv, sink, idx, scale: _training(q, kv, sink),
         lambda *args: _recompute(ref.sparse_attention, *args))

# HCA layers: the window rows by index, every visible compressed entry as a dense tail. The definition (appended
# rows, no grad) keeps the fused kernel in inference; training takes the split form (no quadratic gather).
sparse_attention_dense_tail = dispatch("sparse_attention_dense_tail", ref.sparse_attention_dense_tail)
register_triton("sparse_attention_dense_tail", "triton_dense_tail_train",
                lambda q, kv, sink, idx, tail, visible, scale: _train_kernel_fits(q, kv, sink, tail), _dense_tail_train)
register("sparse_attention_dense_tail", "split_tail",
         lambda q, kv, sink, idx, tail, visible, scale: _training(q, kv, sink, tail),
         lambda *args: _recompute(ref.sparse_attention_split_tail, *args))


def _applies(q, kv, sink, idx, scale) -> bool:
    return (q.is_cuda and q.dtype == kv.dtype == torch.bfloat16 and sink.dtype == torch.float32
            and not torch.is_grad_enabled())


def _kernel(q, kv, sink, idx, scale):
    return _fused_sparse_attention(q, kv, sink, idx, float(scale))


@custom_op("sparse_attention", lambda q, kv, sink, idx, scale: torch.empty_like(q))
def _fused_sparse_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                            scale: float) -> torch.Tensor:
    from dsv4.ops.triton.sparse_attention import sparse_attention as kernel

    return kernel(q, kv, sink, idx, scale, **kernel_config(q.shape[1], q.shape[2]), check=False)


DECODE_QUERIES = 4      # at most this many queries per sequence: decode, speculative verification, short chunks


def kernel_config(s: int, h: int) -> dict:
    """Tiles for s queries per sequence of h heads: a function of the sequence's shape only, never of the batch, so
    a query gets the same bits alone (general step) and batched (fixed decode step). Decode: 16 heads per program,
    64-row tiles, 4 warps, no split (one program per head block walks the whole list: no merge kernel, no fp32
    partials); measured best at Flash dims for bs 1 / 8 / 64 on the H200 (bench/results/h200_sparse_attention.log:
    0.094 / 0.095 / 0.085 ms a call against 0.185 / 0.184 / 0.185 for the prefill tiles with splits). Prefill: 64
    heads per program (one read of each KV tile per query for all heads), 32-row tiles, 8 warps."""
    if s <= DECODE_QUERIES:
        return {"block_h": 16, "block_k": 64, "num_warps": 4, "num_stages": 2, "splits": 1}
    return {"block_h": 64 if h >= 64 else 16, "block_k": 32, "num_warps": 8, "num_stages": 2, "splits": None}


register_triton("sparse_attention", "triton_sparse_attention", _applies, _kernel)


def _dense_tail_applies(q, kv, sink, idx, tail, visible, scale) -> bool:
    return _applies(q, kv, sink, idx, scale) and tail.dtype == kv.dtype


def _dense_tail_kernel(q, kv, sink, idx, tail, visible, scale):
    """HCA in inference: the definition's rows and index lists (`ref.dense_tail_lists`) through the kernel. Until
    the thirteenth session this op had no inference path of its own: its definition called the twin, so on CUDA
    every HCA layer's prefill ran the gathered twin (41 ms against the kernel's 3.7 ms for an 8k chunk of a CSA
    layer) and the general decode step the twin where the fixed step ran the kernel (graph_divergence.py: the
    one-element difference at layer 2, step 19 of tests/test_graphs_gpu.py's 1-token case)."""
    rows, lists = ref.dense_tail_lists(kv, idx, tail, visible)
    return _fused_sparse_attention(q, rows, sink, lists, float(scale))


register_triton("sparse_attention_dense_tail", "triton_sparse_attention_dense_tail", _dense_tail_applies,
                _dense_tail_kernel)
