"""Normalised Walsh-Hadamard rotation (spec §2.3): y = H_n x / sqrt(n) over the last dim, Sylvester order.

The reference calls `fast_hadamard_transform` (a butterfly in fp32); here it is one fp32 matmul with a cached
±1 matrix, scaled afterwards so the matrix stays exact. Sums may be ordered differently from the butterfly, so
results agree to fp32 rounding, not bit for bit.

NOTE: if TF32 matmuls are enabled globally on CUDA, this matmul silently runs in TF32 (10-bit mantissa).
"""

from __future__ import annotations

import functools

import torch


def _sylvester(n: int, device: torch.device) -> torch.Tensor:
    """The ±1 Sylvester matrix: H[i, j] = (-1)^popcount(i & j), built on the device (no host tensor: under
    torch.compile a host-built table would be copied inside the captured graph); cached outside compilation."""
    if torch.compiler.is_compiling():
        return _build(n, device)
    return _cached(n, device)


@functools.cache
def _cached(n: int, device: torch.device) -> torch.Tensor:
    # Built outside inference mode so a cached matrix can still be used later by code that needs autograd.
    with torch.inference_mode(False):
        return _build(n, device)


def _build(n: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    both = i[:, None] & i[None, :]
    parity = torch.zeros_like(both)
    for bit in range(max(n - 1, 1).bit_length()):
        parity ^= (both >> bit) & 1
    return (1 - 2 * parity).float()


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """H_n x * n**-0.5 over the last dim (a power of two), cast back to x's dtype. 16-bit inputs are computed in
    fp32; fp32/fp64 inputs in float64, so an fp32 row's result does not depend on how many rows come with it."""
    n = x.shape[-1]
    assert n > 0 and n & (n - 1) == 0, f"hadamard needs a power-of-two last dim, got {n}"
    assert x.is_floating_point(), f"hadamard needs a float tensor, got {x.dtype}"
    h = _sylvester(n, x.device)  # symmetric, so x @ H == (H x^T)^T
    acc = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    return ((x.to(acc) @ h.to(acc)) * n**-0.5).to(x.dtype)
