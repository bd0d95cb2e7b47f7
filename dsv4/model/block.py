"""One transformer block: mHC around attention and around the MoE (spec §3.2)."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model.attention import Attention
from dsv4.model.hyper import hc_post, hc_pre
from dsv4.model.moe import MoE
from dsv4.model.primitives import RMSNorm
from dsv4.model.state import LayerState, StepBatch
from dsv4.parity.taps import tap_scope


def _hc_params(module: nn.Module, prefix: str, mix: int, width: int) -> None:
    """Registers `{prefix}_fn [mix, width]`, `{prefix}_base [mix]`, `{prefix}_scale` (fp32, checkpoint names)."""
    n_scales = 3 if prefix != "hc_head" else 1
    setattr(module, f"{prefix}_fn", nn.Parameter(torch.empty(mix, width, dtype=torch.float32)))
    setattr(module, f"{prefix}_base", nn.Parameter(torch.empty(mix, dtype=torch.float32)))
    setattr(module, f"{prefix}_scale", nn.Parameter(torch.empty(n_scales, dtype=torch.float32)))


class Block(nn.Module):
    def __init__(self, cfg, layer_id: int, dense_fmt: str, expert_fmt: str, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        self.tap_name = f"layers.{layer_id}"               # checkpoint name, the prefix of its taps
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_id, dense_fmt, dtype)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg, layer_id, dense_fmt, expert_fmt, dtype)
        for prefix in ("hc_attn", "hc_ffn"):
            _hc_params(self, prefix, cfg.hc_mix, cfg.hc_mult * cfg.dim)

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor, batch: StepBatch, state: LayerState) -> torch.Tensor:
        """h [1, T, hc, D] (a flattened step) -> [1, T, hc, D]; input_ids [1, T] drive hash routing."""
        x, cis, post, comb = self.attn_input(h, batch.positions)
        return self.after_attn(h, self.attn(x, cis, batch, state), post, comb, input_ids)

    def attn_input(self, h: torch.Tensor, positions: torch.Tensor) -> tuple:
        """Per token, before attention: (normed input x [1, T, D], rotations cis, hc_post's post and comb)."""
        tap_scope(self.tap_name)
        x, post, comb = hc_pre(h, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, self.cfg, "hc_attn_pre")
        return self.attn_norm(x), self.attn.rotary.cis(positions).unsqueeze(0), post, comb

    def after_attn(self, h: torch.Tensor, attn_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                   input_ids: torch.Tensor) -> torch.Tensor:
        """Per token, after attention: its hc_post, then the MoE between its own hc_pre and hc_post."""
        tap_scope(self.tap_name)
        h = hc_post(attn_out, h, post, comb)
        x, post, comb = hc_pre(h, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, self.cfg, "hc_ffn_pre")
        return hc_post(self.ffn(self.ffn_norm(x), input_ids), h, post, comb)
