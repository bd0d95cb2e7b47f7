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
        pairs = [(p, m) for p, m in zip(self.params, self.masters, strict=True) if m is not p]
        if pairs and not any(_is_dtensor(p) for p, _ in pairs):
            # one foreach copy (a few kernels on a GPU) instead of ~200 launches; the same rounding as copy_
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
            return
        for p, m in pairs:
            p.copy_(m)


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_ratio * base_lr` at step `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(masters: list[nn.Parameter], lr: float, weight_decay: float,
                   betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW; no weight decay on vectors (norms, biases, sinks, hc scales/bases). FSDP-sharded (DTensor) and
    rank-local (expert parallel) parameters go to separate groups: foreach kernels do not mix the two."""
    groups = []
    for sharded in (True, False):
        mine = [m for m in masters if _is_dtensor(m) == sharded]
        groups += [{"params": [m for m in mine if m.dim() >= 2], "weight_decay": weight_decay},
                   {"params": [m for m in mine if m.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=1e-8)


def clip_grad_norm(masters: list[nn.Parameter], max_norm: float, ctx) -> torch.Tensor:
    """Global gradient-norm clipping; returns the norm before clipping as a 0-dim tensor on the device (reading it
    would make the host wait for the GPU: the trainer reads it with the step's other values). With expert parallel
    the rank-local expert gradients differ per rank: their squared norms are summed over ranks and joined with the
    FSDP part."""
    sharded = [m for m in masters if _is_dtensor(m)]
    local = [m for m in masters if not _is_dtensor(m)]
    if not (sharded and local):                               # one process, or FSDP alone
        norm = torch.nn.utils.clip_grad_norm_(masters, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    device = masters[0].device                                  # NCCL reduces device tensors only
    total = (_squared_norm(sharded, device) + ctx.all_sum(_squared_norm(local, device))).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)           # as clip_grads_with_norm_ computes it
    for m in masters:
        if m.grad is not None:
            m.grad.mul_(coef)                                   # the fp32 product it was as a Python float
    return total


def _squared_norm(params: list[nn.Parameter], device) -> torch.Tensor:
    """Sum of squares of the gradients (a DTensor's over all its shards), a float32 scalar on `device`."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norm = torch.nn.utils.get_total_norm(grads)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return norm.float().to(device) ** 2


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local")


@torch.no_grad()
def update_gate_bias(model: nn.Module, counts: dict[str, torch.Tensor], rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: bias_e += rate * sign(mean load - load_e) for top-k gates
    (hash-routed gates have no bias). Counts are global (already summed over ranks)."""
    for name, c in counts.items():
        gate = model.get_submodule(name)
        if rate and getattr(gate, "bias", None) is not None:
            c = c.float().to(gate.bias.device)
            step = rate * torch.sign(c.mean() - c)
            bias = gate.bias
            if hasattr(bias, "to_local"):                            # FSDP-sharded: update the local shard
                step, bias = step[_shard_slice(bias)], bias.to_local()
            # a gate that routed no token keeps its bias bit for bit: decided on the device (a host test of the
            # counts would wait for the GPU)
            bias.copy_(torch.where(c.sum() > 0, bias + step, bias))


def _shard_slice(p) -> slice:
    local = p.to_local()
    n = p.shape[0]
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    per = -(-n // world)
    start = min(rank * per, n)
    return slice(start, start + local.shape[0])
