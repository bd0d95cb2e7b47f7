"""Lightning indexer of CSA layers (spec §3.6): picks which ratio-4 compressed entries each query reads.

score[t] = sum_h relu(q_h . k_t) * w_h with w = weights_proj(x) / sqrt(index_head_dim * index_n_heads);
no softmax, only the ranking matters. Queries and keys are Hadamard-rotated and FP4 fake-quantised when
the QAT emulation is on (the rotation alone would not change the scores: it is orthogonal).
NOTE: scores are computed in the compute dtype, like the reference; in bf16 near-ties can flip the top-k.
The indexer's own compressor keeps its keys in the decode state; `Attention` drives it.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4 import ops
from dsv4.dist import SINGLE
from dsv4.model.compressor import Compressor
from dsv4.model.primitives import Linear
from dsv4.model.rope import Rotary
from dsv4.parity.taps import tap
from dsv4.quant import fake_quant_fp4, hadamard


class Indexer(nn.Module):
    def __init__(self, cfg, rotary: Rotary, dense_fmt: str, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.rotary = rotary
        self.quant_emulation = True
        self.weight_scale = self.head_dim ** -0.5 * self.n_heads ** -0.5     # of ALL heads, also when sharded
        self.tp = SINGLE                                  # tensor parallel: this rank's heads, scores summed
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, dense_fmt, dtype)
        self.weights_proj = Linear(cfg.dim, self.n_heads, "plain", dtype)
        self.compressor = Compressor(cfg, 4, self.head_dim, rotate=True, rotary=rotary)

    def queries(self, qr: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """[b, s, n_heads, head_dim] indexer queries from the q LoRA latent."""
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = self.rotary(q, cis)
        if self.quant_emulation:
            q = fake_quant_fp4(hadamard(q), 32)
        return q

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, h] per-head score weights, in the compute dtype like the reference."""
        return self.weights_proj(x) * self.weight_scale

    def scores(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[b, s, t] relevance of each key t (indexer cache entry) to each query."""
        return self.tp.all_reduce(self.weighted_scores(self.weights(x), q, keys))

    @staticmethod
    def weighted_scores(w: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                        visible: torch.Tensor | None = None) -> torch.Tensor:
        """[b, s, t] sum_h relu(q_h . k_t) * w_h, -inf where t >= visible[b, s] (`ops.indexer_scores`: bf16 like
        the reference, a fused kernel on CUDA when switched on)."""
        return ops.indexer_scores(w, q, keys, visible)

    def summed_scores(self, w: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                      visible: torch.Tensor) -> torch.Tensor:
        """`weighted_scores` of this rank's heads, summed over the tensor-parallel ranks, -inf where not visible.
        The op masks (so its kernel can skip invisible key blocks); outside the single-process group the mask is
        applied again after the reduction, so that the result never depends on how a group treats -inf."""
        score = self.tp.all_reduce(self.weighted_scores(w, q, keys, visible))
        if self.tp is SINGLE:
            return score
        return score.masked_fill(torch.arange(keys.shape[1], device=q.device) >= visible.unsqueeze(-1),
                                 float("-inf"))

    # NOTE: no_grad: only indices leave, so nothing here has a gradient, and under autograd the [n, h, t] score
    # intermediates (quadratic: ~4 GB per layer at 16k training tokens) would be kept until the backward.
    # Queries scored at once: the [n, h, t] scores and the [n, t] sort are quadratic in the sequence (at 64k
    # training tokens 34 GB of bf16 scores per CSA layer, plus the sort's int64 indices), so long sequences are
    # scored in chunks of queries holding at most this many score elements (4 GiB in bf16). Each query's scores
    # and ranking are its own: in fp32 (float64 accumulation, batch-invariant) chunking is bit-identical; in bf16 a
    # product of another shape may round a score differently, as any kernel choice may (near-ties, see above).
    # The scores kernel (`ops.indexer_scores`) holds no [n, h, t], but the chunks stay the same whichever
    # implementation runs (the [n, t] sort's memory, and the same queries scored together).
    SELECT_CHUNK_ELEMENTS = 2**31

    @torch.no_grad()
    def select(self, w: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, start: int, offset: int) -> torch.Tensor:
        """Top-k entries for one sequence's queries at positions start.. (w [1, n, h], q [1, n, h, d]) over its
        keys [1, t, d]: [1, n, min(topk, t)] entry index + `offset`, -1 where the entry is not yet visible.
        Also b sequences at once (leading dim b), all at the same positions (`Attention.fresh`)."""
        n, t = q.shape[1], keys.shape[1]
        chunk = max(1, self.SELECT_CHUNK_ELEMENTS // max(1, q.shape[2] * t))
        if n > chunk:
            return torch.cat([self.select(w[:, i:i + chunk], q[:, i:i + chunk], keys, start + i, offset)
                              for i in range(0, n, chunk)], dim=1)
        visible = (torch.arange(start + 1, start + n + 1, device=q.device) // 4).expand(q.shape[0], n).contiguous()
        score = self.summed_scores(w, q, keys, visible)
        tap("attn.indexer.scores", score)
        # NOTE: with FP4 queries and keys exact score ties are common; a stable sort breaks them towards the
        # earlier entry whatever the number of candidates, so chunked prefill and decode pick what the one-shot
        # prefill picks (torch.topk's tie order depends on the row length).
        idx = ops.stable_topk(score, min(self.topk, t))
        return torch.where(idx >= visible.unsqueeze(-1), -1, idx + offset)
