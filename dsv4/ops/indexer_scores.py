"""The lightning indexer's scores as a dispatched op (`model/indexer.py`: prefill / training `select`, and decode).

The twin (`ops.ref.indexer_scores`) is the reference's formula: it materialises the [n, heads, t] per-head dots
and makes several broadcasting passes over them (at 32k training tokens, 16 heads and 8k keys: 4.3 G elements,
8.6 GB of bf16 per CSA layer). Its visibility mask (-inf for entries not yet complete at a query) is part of the
op so that the kernel can skip the key blocks no query of a block sees (half the work of causal prefill/training).
On CUDA, for bf16 / fp16 calls without autograd, `ops/triton/indexer_scores.py` computes the same roundings tile
by tile in registers; opt-in (DSV4_INDEXER_KERNEL=1). Measured on the H200: ~9x faster than the twin per
prefill-sized call (scores bit-equal to the twin's but ~1 in 10^7, the same top-k picks), but the 1k-prefill
bench was 7 ms slower with it (unexplained, bench/NOTES.md "Sixth session"), so it stays opt-in until that is
understood; decode calls keep the twin.
"""

from __future__ import annotations

import torch

from dsv4.ops import ref
from dsv4.ops.registry import custom_op, dispatch, env_switch, register_triton

indexer_scores = dispatch("indexer_scores", ref.indexer_scores)


@torch._dynamo.assume_constant_result
def enabled() -> bool:
    """DSV4_INDEXER_KERNEL=1 turns the kernel on (read once per traced graph under torch.compile, like the
    registry's switch)."""
    return env_switch("DSV4_INDEXER_KERNEL")


# Decode (a few queries per sequence) stays on the twin: at Flash bs64 the kernel took 0.237 ms against the twin's
# 0.137 (H200, bench/results/h200_s7_bench/indexer_scores.json); prefill-sized calls are ~9x faster on the kernel.
KERNEL_MIN_ROWS = 64


def _fits(w: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None = None) -> bool:
    d = q.shape[-1]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (w, q, keys))     # the kernel has no backward
    return (enabled() and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and w.dtype == keys.dtype == q.dtype
            and d >= 16 and d & (d - 1) == 0 and q.stride(-1) == keys.stride(-1) == 1 and not grad
            and q.shape[1] >= KERNEL_MIN_ROWS)


@custom_op("indexer_scores", lambda w, q, keys, visible: q.new_empty(q.shape[0], q.shape[1], keys.shape[1]))
def _kernel(w: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    from dsv4.ops.triton.indexer_scores import indexer_scores as launch

    return launch(w, q, keys, visible)


register_triton("indexer_scores", "triton_indexer_scores", _fits,
                lambda w, q, keys, visible=None: _kernel(w, q, keys, visible))
