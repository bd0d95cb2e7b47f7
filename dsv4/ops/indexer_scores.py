"""The lightning indexer's scores as a dispatched op (`model/indexer.py`: prefill / training `select`, and decode).

The twin (`ops.ref.indexer_scores`) is the reference's formula: it materialises the [n, heads, t] per-head dots
and makes several broadcasting passes over them (at 32k training tokens, 16 heads and 8k keys: 4.3 G elements,
8.6 GB of bf16 per CSA layer). Its visibility mask (-inf for entries not yet complete at a query) is part of the
op so that the kernel can skip the key blocks no query of a block sees (half the work of causal prefill/training).
On CUDA, for bf16 / fp16 calls without autograd, `ops/triton/indexer_scores.py` computes the same roundings tile
by tile in registers (DSV4_INDEXER_KERNEL=0 off). Measured on the H200: ~9x faster than the twin per
prefill-sized call (scores bit-equal to the twin's but ~1 in 10^7, the same top-k picks). The sixth session's
1k-prefill bench was 7 ms slower with it (never explained); the twenty-ninth's A/B on an H100 was not (1k -0.3 ms,
8k -5.9 ms), so it is on by default since. Decode calls keep the twin.
"""

from __future__ import annotations

import torch

from dsv4.ops import ref
from dsv4.ops.registry import custom_op, dispatch, env_switch, register_triton, trace_constant

indexer_scores = dispatch("indexer_scores", ref.indexer_scores)


@trace_constant
def enabled() -> bool:
    """DSV4_INDEXER_KERNEL=0 turns the kernel off (read once per traced graph under torch.compile, like the
    registry's switch). On by default since the twenty-ninth session's A/B (H100, eager prefill,
    bench/results/h100_s29/call_a): 8k 113.0 -> 107.1 ms, 1k 23.5 -> 23.2 ms."""
    return env_switch("DSV4_INDEXER_KERNEL", default=True)


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
