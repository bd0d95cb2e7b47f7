"""Optimiser pieces: fp32 master weights for 16-bit parameters, AdamW, warmup + cosine, the noaux_tc bias update.

The model computes with its parameters in their inference dtypes (bf16 where the reference runs bf16, fp32 where
it keeps fp32); AdamW updates fp32 masters and the rounded result is copied back after each step. fp32
parameters are their own masters. Works unchanged on FSDP2's sharded (DTensor) parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MasterWeights:
    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.masters = [p if p.dtype == torch.float32 else nn.Parameter(p.detach().float()) for p in params]

    def grads_to_masters(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not p:
                p.copy_(m)


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_ratio * base_lr` at step `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(masters: list[nn.Parameter], lr: float, weight_decay: float,
                   betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW; no weight decay on vectors (norms, biases, sinks, hc scales/bases)."""
    decay = [m for m in masters if m.dim() >= 2]
    rest = [m for m in masters if m.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=1e-8)


@torch.no_grad()
def update_gate_bias(model: nn.Module, counts: dict[str, torch.Tensor], rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: bias_e += rate * sign(mean load - load_e) for top-k gates
    (hash-routed gates have no bias). Counts are global (already summed over ranks)."""
    for name, c in counts.items():
        gate = model.get_submodule(name)
        if rate and getattr(gate, "bias", None) is not None and c.sum() > 0:
            c = c.float()
            bias = gate.bias
            step = (rate * torch.sign(c.mean() - c)).to(bias.device)
            if hasattr(bias, "to_local"):                            # FSDP-sharded: update the local shard
                step = step[_shard_slice(bias)]
                bias.to_local().add_(step)
            else:
                bias.add_(step)


def _shard_slice(p) -> slice:
    local = p.to_local()
    n = p.shape[0]
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    per = -(-n // world)
    start = min(rank * per, n)
    return slice(start, start + local.shape[0])
