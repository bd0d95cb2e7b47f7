"""KV compressor (spec §3.5): gated pooling of every `ratio` tokens into one entry.

Ratio 128 (HCA) pools each block of 128 tokens. Ratio 4 (CSA and the indexer) *overlaps*: an entry pools 8
slots, the previous block's 4 tokens through the first half of the projected channels and its own 4 tokens
through the second half. The softmax over slots runs separately for every channel, and the gate scores get a
learned per-slot bias `ape`. Projections and pooling are fp32.
NOTE: an entry is emitted only once its block is complete, and is rotated at its block's FIRST position.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4 import ops
from dsv4.model.primitives import Linear, RMSNorm
from dsv4.model.rope import Rotary
from dsv4.quant import fake_quant_fp4, hadamard


class Compressor(nn.Module):
    def __init__(self, cfg, ratio: int, head_dim: int, rotate: bool, rotary: Rotary):
        super().__init__()
        self.ratio, self.head_dim, self.rotate = ratio, head_dim, rotate
        self.overlap = ratio == 4
        self.rotary = rotary
        self.rope_dim = cfg.rope_head_dim
        self.quant_emulation = True
        width = (2 if self.overlap else 1) * head_dim
        self.ape = nn.Parameter(torch.empty(ratio, width, dtype=torch.float32))
        self.wkv = Linear(cfg.dim, width, "plain", torch.float32)
        self.wgate = Linear(cfg.dim, width, "plain", torch.float32)
        self.norm = RMSNorm(head_dim, cfg.norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token fp32 (kv, gate score without ape), each [b, s, coff*head_dim]."""
        xf = x.float()
        return self.wkv(xf), self.wgate(xf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Entries of every complete block of a sequence starting at position 0: [b, s // ratio, head_dim]."""
        b, s, _ = x.shape
        n = s // self.ratio
        kv, score = self.project(x[:, :n * self.ratio])
        kv = kv.unflatten(1, (n, self.ratio))                              # [b, n, r, coff*c]
        score = score.unflatten(1, (n, self.ratio)) + self.ape
        if self.overlap:
            kv, score = self._overlap_slots(kv, 0.0), self._overlap_slots(score, float("-inf"))
        pooled = (kv * score.softmax(dim=2)).sum(dim=2)                    # [b, n, c]
        first = torch.arange(n, device=x.device) * self.ratio
        return self.finish(pooled, first.expand(b, n), x.dtype)

    def _overlap_slots(self, t: torch.Tensor, fill: float) -> torch.Tensor:
        """[b, n, r, 2c] -> [b, n, 2r, c]: slots 0..r-1 = previous block's first-half channels, r..2r-1 =
        own block's second-half channels; block 0 has no predecessor (kv 0, score -inf)."""
        b, n, r, _ = t.shape
        c = self.head_dim
        out = t.new_full((b, n, 2 * r, c), fill)
        out[:, :, r:] = t[:, :, :, c:]
        out[:, 1:, :r] = t[:, :-1, :, :c]
        return out

    def finish(self, pooled: torch.Tensor, first_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Pooled fp32 [b, n, c] -> cache entries: norm (in `dtype`), RoPE at the block's first position,
        then the QAT emulation: Hadamard + FP4 for the indexer's keys, FP8 on the nope dims otherwise."""
        kv = self.norm(pooled.to(dtype))
        kv = self.rotary(kv, self.rotary.cis(first_pos))
        if not self.quant_emulation:
            return kv
        if self.rotate:
            return fake_quant_fp4(hadamard(kv), 32)
        return ops.fake_quant_kv(kv, self.rope_dim)
