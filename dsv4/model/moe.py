"""Mixture of experts (spec §3.7): sqrt-softplus gate, hash routing on the first layers, clamped SwiGLU.

NOTE: the gate's `bias` only decides WHICH experts are picked; the weights are the unbiased scores,
renormalised and multiplied by `route_scale`. Hash layers take the experts from `tid2eid[token_id]`.
The SwiGLU clamp (up to [-limit, limit], gate <= limit) applies to routed AND shared experts, and a routed
expert's weight multiplies its hidden activation before w2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4 import ops
from dsv4.dist import SINGLE
from dsv4.model.primitives import Linear


class Gate(nn.Module):
    def __init__(self, cfg, layer_id: int):
        super().__init__()
        self.topk, self.score_func, self.route_scale = cfg.n_activated_experts, cfg.score_func, cfg.route_scale
        self.hash = cfg.is_hash_layer(layer_id)
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim, dtype=torch.float32))
        if self.hash:
            self.tid2eid = nn.Parameter(torch.empty(cfg.vocab_size, self.topk, dtype=torch.int64), requires_grad=False)
        else:
            self.bias = nn.Parameter(torch.empty(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], input_ids [N] -> (weights [N, k] fp32, expert ids [N, k])."""
        scores = ops.dense(x.float(), self.weight, x.dtype)
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1)
        elif self.score_func == "sigmoid":
            scores = scores.sigmoid()
        else:
            scores = F.softplus(scores).sqrt()
        if self.hash:
            ids = self.tid2eid[input_ids]
        else:
            ids = (scores + self.bias).topk(self.topk, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.score_func != "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, ids


class Expert(nn.Module):
    """SwiGLU FFN w2(silu(w1 x) * (w3 x)) with the clamp; fp32 activation math."""

    def __init__(self, dim: int, inter_dim: int, fmt: str, dtype: torch.dtype, swiglu_limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, fmt, dtype)
        self.w2 = Linear(inter_dim, dim, fmt, dtype)
        self.w3 = Linear(dim, inter_dim, fmt, dtype)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = self.w1(x).float(), self.w3(x).float()
        if self.swiglu_limit > 0:
            up = up.clamp(-self.swiglu_limit, self.swiglu_limit)
            gate = gate.clamp(max=self.swiglu_limit)
        h = F.silu(gate) * up
        if weights is not None:
            h = weights * h
        return self.w2(h.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, cfg, layer_id: int, dense_fmt: str, expert_fmt: str, dtype: torch.dtype):
        super().__init__()
        self.dim, self.n_experts = cfg.dim, cfg.n_routed_experts
        self.gate = Gate(cfg, layer_id)
        self.experts = nn.ModuleList(
            Expert(cfg.dim, cfg.moe_inter_dim, expert_fmt, dtype, cfg.swiglu_limit) for _ in range(self.n_experts))
        self.shared_experts = Expert(cfg.dim, cfg.moe_inter_dim, dense_fmt, dtype, cfg.swiglu_limit)
        self.tp = SINGLE                # expert parallel: experts[e] is None when another rank holds it

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        weights, ids = self.gate(x, input_ids.reshape(-1))
        y = torch.zeros_like(x, dtype=torch.float32)
        counts = torch.bincount(ids.flatten(), minlength=self.n_experts).tolist()
        for e, count in enumerate(counts):
            if count and self.experts[e] is not None:
                rows, slot = torch.where(ids == e)
                y.index_add_(0, rows, self.experts[e](x[rows], weights[rows, slot, None]).float())
        y = self.tp.all_reduce(y)       # fp32 sum of every rank's experts; the shared expert is replicated
        y = y + self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)
