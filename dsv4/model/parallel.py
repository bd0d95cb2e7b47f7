"""Tensor and expert parallelism as a transform (spec §5.4): the model files stay single-device code.

`shard_model(model, tp)` rewrites a model built on the meta device into one rank's share before loading:
* attention: this rank's heads (`wq_b` rows, `attn_sink`) and `wo_a` groups; `wo_b` becomes row-parallel (its
  input slice; partial products summed across ranks);
* indexer: this rank's heads (`wq_b`, `weights_proj`); its score is summed across ranks (`Indexer.tp`);
* MoE: routed experts of other ranks become None, the routed sum is all-reduced before the replicated shared
  expert is added (`MoE.tp`);
* embedding: vocabulary rows (lookup + all-reduce); head: vocabulary rows (logits all-gathered).
Everything else (wq_a, wkv, norms, compressors, gate, shared experts, hc weights) is replicated.
NOTE: the reductions keep precision: bf16 models reduce `wo_b` in fp32 like the reference; fp32 models reduce
float64 partials and round once, so TP=N equals TP=1 up to the summation order of float64 sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.dist.context import ParallelContext
from dsv4.model.primitives import BlockDiagLinear, Head, Linear


class RowParallelLinear(Linear):
    """A Linear holding a slice of the input dim: y = sum over ranks of x_local @ W_local^T."""

    def __init__(self, in_features: int, out_features: int, fmt: str, dtype: torch.dtype, tp: ParallelContext):
        super().__init__(in_features, out_features, fmt, dtype)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.double() if x.dtype == torch.float32 else x      # fp32 model: float64 partials, one rounding
        y = super().forward(wide)
        return self.tp.all_reduce(y if y.dtype == torch.float64 else y.float()).to(x.dtype)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [lo, hi) of the embedding; ids outside give zeros, the all-reduce fills them in (exact)."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, tp: ParallelContext):
        self.lo, hi = tp.split(vocab_size, "vocab_size")
        # no init (Transformer's NOTE: on the meta device it would import Dynamo)
        super().__init__(hi - self.lo, dim, _weight=torch.empty(hi - self.lo, dim, dtype=dtype))
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.lo
        outside = (local < 0) | (local >= self.num_embeddings)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(y.masked_fill(outside.unsqueeze(-1), 0))


class VocabParallelHead(Head):
    """Vocabulary rows [lo, hi) of the LM head; every rank ends with the full logits (all-gather)."""

    def __init__(self, dim: int, vocab_size: int, tp: ParallelContext, dtype: torch.dtype = torch.float32):
        lo, hi = tp.split(vocab_size, "vocab_size")
        super().__init__(dim, hi - lo, dtype)
        self.tp = tp

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(super().logits(y), dim=-1)


def shard_model(model: nn.Module, tp: ParallelContext) -> nn.Module:
    """Rewrite a model (on the meta device) in place into rank `tp.rank`'s share; world size 1 leaves it as is."""
    if tp.world == 1:
        return model
    cfg = model.cfg
    device = next(model.parameters()).device
    with torch.device(device):
        model.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, model.dtype, tp)
        model.head = VocabParallelHead(cfg.dim, cfg.vocab_size, tp, model.dtype)
        for block in [*model.layers, *model.mtp]:
            _shard_attention(block.attn, cfg, model.dtype, tp)
            _shard_moe(block.ffn, tp)
    return model


def _narrow(old: Linear, in_features: int, out_features: int, dtype: torch.dtype, cls=Linear, **kw) -> Linear:
    new = cls(in_features, out_features, old.fmt, dtype, **kw)
    new.quant_emulation = old.quant_emulation
    return new


def _shard_attention(attn: nn.Module, cfg, dtype: torch.dtype, tp: ParallelContext) -> None:
    tp.split(cfg.n_heads, "n_heads")
    tp.split(cfg.o_groups, "o_groups")
    attn.n_heads, attn.groups = cfg.n_heads // tp.world, cfg.o_groups // tp.world
    attn.attn_sink = nn.Parameter(torch.empty(attn.n_heads, dtype=torch.float32))
    attn.wq_b = _narrow(attn.wq_b, cfg.q_lora_rank, attn.n_heads * cfg.head_dim, dtype)
    # this rank's groups: rows of the weight and, FP8, of its 128-row scale blocks (`dist/sharding.py`)
    attn.wo_a = _narrow(attn.wo_a, attn.wo_a.in_features, attn.groups * cfg.o_lora_rank, dtype, BlockDiagLinear,
                        groups=attn.groups)
    attn.wo_b = _narrow(attn.wo_b, attn.groups * cfg.o_lora_rank, cfg.dim, dtype, RowParallelLinear, tp=tp)
    if hasattr(attn, "indexer"):
        ix = attn.indexer
        tp.split(cfg.index_n_heads, "index_n_heads")
        ix.n_heads, ix.tp = cfg.index_n_heads // tp.world, tp
        ix.wq_b = _narrow(ix.wq_b, cfg.q_lora_rank, ix.n_heads * cfg.index_head_dim, dtype)
        ix.weights_proj = _narrow(ix.weights_proj, cfg.dim, ix.n_heads, dtype)


def _shard_moe(moe: nn.Module, tp: ParallelContext) -> None:
    tp.split(moe.n_experts, "n_routed_experts")
    for e in range(moe.n_experts):
        if tp.owner(e, moe.n_experts) != tp.rank:
            moe.experts[e] = None                     # another rank's expert (expert parallel)
    moe.tp = tp
