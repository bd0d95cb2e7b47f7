"""Attention of DeepSeek-V4 (spec §3.4): one shared KV head, sliding window + compressed entries, sinks.

Per layer type: "sliding" reads the last `window_size` tokens; "hca" (ratio 128) also reads every complete
compressed block; "csa" (ratio 4) also reads the indexer's top-k compressed entries. Every query gets one
index list into a KV row tensor (-1 = masked), the contract shared with the fused kernels.
NOTE: K and V are the same 512-d vector; the output is de-rotated by the query's own position; q gets a
weightless per-head RMS normalisation (rsqrt, in the compute dtype) after wq_b.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4 import ops
from dsv4.model.compressor import Compressor
from dsv4.model.indexer import Indexer
from dsv4.model.primitives import Linear, RMSNorm
from dsv4.model.rope import Rotary


def window_indices(s: int, window: int, device) -> torch.Tensor:
    """[s, min(s, window)]: query i sees raw positions max(0, i-W+1)..i; later slots -1."""
    i = torch.arange(s, device=device).unsqueeze(1)
    rows = (i - window + 1).clamp_min(0) + torch.arange(min(s, window), device=device)
    return torch.where(rows > i, -1, rows)


def block_indices(s: int, ratio: int, offset: int, device) -> torch.Tensor:
    """[s, s // ratio]: every compressed entry whose block is complete at query i, + offset; else -1."""
    j = torch.arange(s // ratio, device=device)
    visible = torch.arange(1, s + 1, device=device).unsqueeze(1) // ratio
    return torch.where(j >= visible, -1, j + offset)


class Attention(nn.Module):
    def __init__(self, cfg, layer_id: int, dense_fmt: str, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.head_dim, self.groups = cfg.n_heads, cfg.head_dim, cfg.o_groups
        self.rope_dim, self.window, self.eps = cfg.rope_head_dim, cfg.window_size, cfg.norm_eps
        self.ratio = cfg.compress_ratios[layer_id]
        self.softmax_scale = cfg.head_dim ** -0.5
        self.quant_emulation = True
        self.rotary = Rotary(cfg, compressed=self.ratio > 0)
        self.attn_sink = nn.Parameter(torch.empty(cfg.n_heads, dtype=torch.float32))
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, dense_fmt, dtype)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, dense_fmt, dtype)
        self.wkv = Linear(cfg.dim, cfg.head_dim, dense_fmt, dtype)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        # wo_a is FP8 on disk; the reference dequantises it to bf16 at conversion and runs a bf16 einsum.
        self.wo_a = Linear(cfg.n_heads * cfg.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, "plain", dtype)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, dense_fmt, dtype)
        if self.ratio:
            self.compressor = Compressor(cfg, self.ratio, cfg.head_dim, rotate=False, rotary=self.rotary)
        if self.ratio == 4:
            self.indexer = Indexer(cfg, self.rotary, dense_fmt, dtype)

    def queries(self, x: torch.Tensor, cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [b, s, H, d] rotated, q LoRA latent qr [b, s, q_lora] for the indexer)."""
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + self.eps)
        return self.rotary(q, cis), qr

    def window_kv(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """[b, s, d] per-token KV: kv_norm, RoPE, FP8 fake-quant of the nope dims (emulation)."""
        kv = self.rotary(self.kv_norm(self.wkv(x)), cis)
        return ops.fake_quant_kv(kv, self.rope_dim) if self.quant_emulation else kv

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A whole sequence from position 0 (positions = arange(s)): x [b, s, D] -> [b, s, D]."""
        b, s, _ = x.shape
        cis = self.rotary.cis(positions).expand(b, s, -1)
        q, qr = self.queries(x, cis)
        kv = self.window_kv(x, cis)
        idx = window_indices(s, self.window, x.device).expand(b, s, -1)
        if self.ratio:
            # Compressed entries are appended after the s raw rows, so their indices start at s.
            entries = self.compressor(x)
            if self.ratio == 4:
                picked = self.indexer(x, qr, cis, offset=s)
            else:
                picked = block_indices(s, self.ratio, s, x.device).expand(b, s, -1)
            kv = torch.cat([kv, entries], dim=1)
            idx = torch.cat([idx, picked], dim=-1)
        o = ops.sparse_attention(q, kv, self.attn_sink, idx, self.softmax_scale)
        return self.output(o, cis)

    def output(self, o: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """De-rotate, grouped low-rank wo_a (per group of heads), then wo_b."""
        b, s = o.shape[:2]
        o = self.rotary(o, cis, inverse=True).view(b, s, self.groups, -1)
        wo_a = self.wo_a.weight.view(self.groups, -1, o.shape[-1]).to(o.dtype)
        o = torch.einsum("bsgd,grd->bsgr", o, wo_a)
        return self.wo_b(o.flatten(2))
