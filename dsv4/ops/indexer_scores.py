"""The lightning indexer's scores as a dispatched op (`model/indexer.py`: prefill / training `select`, and decode).

The twin (`ops.ref.indexer_scores`) is the reference's formula: it materialises the [n, heads, t] per-head dots
and makes several broadcasting passes over them (at 32k training tokens, 16 heads and 8k keys: 4.3 G elements,
8.6 GB of bf16 per CSA layer). Its visibility mask (-inf for entries not yet complete at a query) is part of the
op so that a kernel can skip the key blocks no query of a block sees (half the work of causal prefill/training).
"""

from __future__ import annotations

from dsv4.ops import ref
from dsv4.ops.registry import dispatch

indexer_scores = dispatch("indexer_scores", ref.indexer_scores)
