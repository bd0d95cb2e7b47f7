"""Lightning indexer of CSA layers (spec §3.6): picks which ratio-4 compressed entries each query reads.

score[t] = sum_h relu(q_h . k_t) * w_h with w = weights_proj(x) / sqrt(index_head_dim * index_n_heads);
no softmax, only the ranking matters. Queries and keys are Hadamard-rotated and FP4 fake-quantised when
the QAT emulation is on (the rotation alone would not change the scores: it is orthogonal).
NOTE: scores are computed in the compute dtype, like the reference; in bf16 near-ties can flip the top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model.compressor import Compressor
from dsv4.model.primitives import Linear
from dsv4.model.rope import Rotary
from dsv4.quant import fake_quant_fp4, hadamard


class Indexer(nn.Module):
    def __init__(self, cfg, rotary: Rotary, dense_fmt: str, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.rotary = rotary
        self.quant_emulation = True
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

    def scores(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[b, s, t] relevance of each key t (indexer cache entry) to each query."""
        w = self.weights_proj(x) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)      # [b, s, h]
        dots = torch.einsum("bshd,btd->bsht", q, keys.to(q.dtype))
        return (dots.relu() * w.unsqueeze(-1)).sum(dim=2)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, cis: torch.Tensor, offset: int) -> torch.Tensor:
        """Top-k entry lists of a sequence starting at position 0: [b, s, min(topk, s // 4)], each
        index + `offset` (where entry 0 sits in the attention's KV rows), -1 where not yet visible."""
        s = x.shape[1]
        keys = self.compressor(x)                                     # [b, s // 4, head_dim]
        score = self.scores(x, self.queries(qr, cis), keys)
        visible = torch.arange(1, s + 1, device=x.device).unsqueeze(1) // 4      # entries complete at i
        hidden = torch.arange(keys.shape[1], device=x.device) >= visible         # [s, n]
        score = score.masked_fill(hidden, float("-inf"))
        idx = score.topk(min(self.topk, keys.shape[1]), dim=-1).indices
        return torch.where(idx >= visible, -1, idx + offset)
