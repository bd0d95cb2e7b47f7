"""Manifold-constrained hyper-connections (mHC, spec §3.3).

The residual stream is `hc` parallel copies h [b, s, hc, D] (bf16 between blocks). Before a sub-layer,
`hc_pre` mixes them into one input with weights `pre`; after it, `hc_post` writes the output back into every
stream with weights `post` plus a doubly-stochastic (Sinkhorn) mix `comb` of the old streams.
NOTE: the RMS normalisation of `hc_pre` runs over the whole concatenated hc*D vector and has no weight.
"""

from __future__ import annotations

import torch

from dsv4 import ops
from dsv4.parity.taps import tap


def hc_pre(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, cfg, tap_as: str = "hc_pre"):
    """h [b, s, hc, D] -> (mixed input [b, s, D] in h's dtype, post [b, s, hc], comb [b, s, hc, hc])."""
    y, pre, post, comb = ops.hc_pre_mix(h, fn, scale, base, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.norm_eps,
                                        cfg.hc_eps)
    tap(f"{tap_as}.weights", pre)
    tap(f"{tap_as}.post", post)
    tap(f"{tap_as}.comb", comb)
    tap(f"{tap_as}.x", y)
    return y, post, comb


def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New stream k = post_k * x + sum_j comb[j, k] * residual_j, in fp32, cast to x's dtype."""
    return ops.hc_post(x, residual, post, comb)


def hc_head(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, cfg) -> torch.Tensor:
    """Final reduction of the streams: weights sigmoid(m * scale + base) + eps, no post/comb."""
    return ops.hc_head_mix(h, fn, scale, base, cfg.norm_eps, cfg.hc_eps)
