"""KV compressor (spec §3.5): gated pooling of every `ratio` tokens into one entry.

Ratio 128 (HCA) pools each block of 128 tokens. Ratio 4 (CSA and the indexer) *overlaps*: an entry pools 8
slots, the previous block's 4 tokens through the first half of the projected channels and its own 4 tokens
through the second half. The softmax over slots runs separately for every channel, and the gate scores get a
learned per-slot bias `ape`. Projections and pooling are fp32.
NOTE: an entry is emitted only once its block is complete, and is rotated at its block's FIRST position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4 import ops
from dsv4.model.pairs import paired_widened
from dsv4.model.primitives import Linear, RMSNorm
from dsv4.model.rope import Rotary
from dsv4.model.state import CompressorState
from dsv4.ops.ref import widen
from dsv4.quant import fake_quant_fp4, hadamard


class Compressor(nn.Module):
    PAIRS = (("wkv", "wgate"),)         # one input: packed into one buffer on CUDA (`model/pairs.py`)

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
        """Per-token fp32 (kv, gate score without ape), each [b, s, coff*head_dim]: fp32 projections even in a bf16
        model (`ops.widened_dense`: on bf16 tensor cores at inference on CUDA)."""
        if torch.is_grad_enabled() and x.requires_grad:
            # training: one upcast feeds both products, so its gradient sums theirs in fp32 and rounds once
            xf = widen(x)
            return ops.dense(xf, self.wkv.weight, x.dtype), ops.dense(xf, self.wgate.weight, x.dtype)
        return paired_widened(self.wkv, self.wgate, x)         # one call where the loader packed them (CUDA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Entries of every complete block of fresh sequences (position 0): [b, s // ratio, head_dim]."""
        b = x.shape[0]
        state = CompressorState(*(t.expand(b, -1, -1).clone() for t in self.empty_state(x.device)))
        kv, score = self.project(x)
        out = [self.step(kv[i], score[i], 0, state, i) for i in range(b)]
        return torch.stack([self.finish(pooled, first, x.dtype) for pooled, first in out])

    def empty_state(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        coff = 2 if self.overlap else 1
        shape = (1, coff * self.ratio, coff * self.head_dim)
        return torch.zeros(shape, device=device), torch.full(shape, float("-inf"), device=device)

    def step(self, kv: torch.Tensor, score: torch.Tensor, start: int, state: CompressorState,
             slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one sequence's new tokens (fp32 projections [n, coff*c] at positions start..start+n-1) through
        its partial-block state; returns the pooled fp32 entries [m, c] of the blocks this completes and their
        first positions [m]. The state keeps the current block's tokens (and, overlapping, the previous block).
        """
        r, n = self.ratio, kv.shape[0]
        pend = start % r                                      # tokens of the current block already seen
        cur = r if self.overlap else 0                        # state row of the current block's first token
        st_kv, st_score = state.kv[slot], state.score[slot]
        score = score + self.ape[torch.arange(start, start + n, device=kv.device) % r]
        kv_all = torch.cat([st_kv[cur:cur + pend], kv])       # positions start-pend .. start+n-1
        score_all = torch.cat([st_score[cur:cur + pend], score])
        m = (pend + n) // r
        pooled = kv.new_zeros(0, self.head_dim)
        if m:
            kb, sb = kv_all[:m * r].unflatten(0, (m, r)), score_all[:m * r].unflatten(0, (m, r))
            if self.overlap:
                kb, sb = self._overlap_slots(kb, st_kv[:r]), self._overlap_slots(sb, st_score[:r])
            pooled = (kb * sb.softmax(dim=1)).sum(dim=1)                      # [m, c]
            if self.overlap:                                                  # becomes the next "previous"
                st_kv[:r], st_score[:r] = kv_all[(m - 1) * r:m * r], score_all[(m - 1) * r:m * r]
        rest = pend + n - m * r
        st_kv[cur:cur + rest], st_score[cur:cur + rest] = kv_all[m * r:], score_all[m * r:]
        first = start - pend + r * torch.arange(m, device=kv.device)
        return pooled, first

    def fresh(self, kv: torch.Tensor, score: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Finished entries [b, s // r, c] of b fresh sequences at once (projections [b, s, coff*c], position 0):
        `step` from an empty state then `finish`, the same elementwise math with the sequences as a batch dim."""
        r, c = self.ratio, self.head_dim
        b, m = kv.shape[0], kv.shape[1] // r
        score = score[:, :m * r] + self.ape.repeat(m, 1)
        kb, sb = kv[:, :m * r].unflatten(1, (m, r)), score.unflatten(1, (m, r))         # [b, m, r, coff*c]
        if self.overlap and m:      # the block before the first is empty: kv 0, score -inf (`empty_state`)
            kb = torch.cat([F.pad(kb[:, :-1, :, :c], (0, 0, 0, 0, 1, 0)), kb[:, :, :, c:]], dim=2)
            sb = torch.cat([F.pad(sb[:, :-1, :, :c], (0, 0, 0, 0, 1, 0), value=float("-inf")), sb[:, :, :, c:]],
                           dim=2)
        pooled = (kb * sb.softmax(dim=2)).sum(dim=2)                                    # [b, m, c]
        first = r * torch.arange(m, device=kv.device).expand(b, m)
        return self.finish(pooled, first, dtype)

    def decode(self, kv: torch.Tensor, score: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               state: CompressorState, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per sequence, without host synchronisation (`step` for a `DecodeBatch`): kv, score
        [B, coff*c] at `positions` [B] of `slots` [B]. Returns (entries [B, c] finished as by `finish`, complete [B]):
        entry `positions // ratio` is real only where `complete`; the caller writes it there and nowhere else.
        NOTE: the pooled value of an incomplete block may be NaN (all-empty softmax); it must never be stored.
        """
        r, c = self.ratio, self.head_dim
        cur = r if self.overlap else 0
        row = cur + positions % r
        state.kv[slots, row] = kv
        state.score[slots, row] = score + self.ape[positions % r]
        kb, sb = state.kv[slots], state.score[slots]                         # [B, coff*r, coff*c]
        if self.overlap:                                                      # [B, 2r, c]: previous | own block
            kb = torch.cat([kb[:, :r, :c], kb[:, r:, c:]], dim=1)
            sb = torch.cat([sb[:, :r, :c], sb[:, r:, c:]], dim=1)
        pooled = (kb * sb.softmax(dim=1)).sum(dim=1)                          # [B, c]
        complete = (positions + 1) % r == 0
        if self.overlap:                                                      # the block becomes the "previous"
            done = complete.view(-1, 1, 1)
            state.kv[slots, :r] = torch.where(done, state.kv[slots, r:], state.kv[slots, :r])
            state.score[slots, :r] = torch.where(done, state.score[slots, r:], state.score[slots, :r])
        return self.finish(pooled, positions + 1 - r, dtype), complete

    def _overlap_slots(self, t: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """[m, r, 2c] blocks + the block before them [r, 2c] -> [m, 2r, c]: slots 0..r-1 = previous block's
        first-half channels, r..2r-1 = own block's second-half channels."""
        c = self.head_dim
        before = torch.cat([prev[:, :c].unsqueeze(0), t[:-1, :, :c]])
        return torch.cat([before, t[:, :, c:]], dim=1)

    def finish(self, pooled: torch.Tensor, first_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Pooled fp32 [..., n, c] -> cache entries: norm (in `dtype`), RoPE at the block's first position,
        then the QAT emulation: Hadamard + FP4 for the indexer's keys, FP8 on the nope dims otherwise."""
        kv = self.norm(pooled.to(dtype))
        kv = self.rotary(kv, self.rotary.cis(first_pos))
        if not self.quant_emulation:
            return kv
        if self.rotate:
            return fake_quant_fp4(hadamard(kv), 32)
        return ops.fake_quant_kv(kv, self.rope_dim)
