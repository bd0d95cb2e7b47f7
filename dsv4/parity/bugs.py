"""Known DeepSeek-V4 bugs, injectable on purpose: the worked example of docs/parity.md and the tests that prove
`dsv4 parity compare` pinpoints them (`dsv4 parity dump --inject-bug NAME`).

Each is a mistake other implementations really made (spec §8): a context manager patches the model's code for
its duration and restores it after. Never use them outside of that demonstration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dsv4.model import attention
from dsv4.model.indexer import Indexer
from dsv4.model.rope import Rotary
from dsv4.parity.errors import ParityError


def _rotate_half(self: Rotary, x: torch.Tensor, cis: torch.Tensor, inverse: bool = False,
                 owned: bool = False) -> torch.Tensor:
    """RoPE with the GPT-NeoX pairing (dim j with j + dim/2) instead of the interleaved (2j, 2j+1) pairs. Always a
    new tensor (`owned` allows, does not require, an in-place rotation)."""
    rope = x[..., -self.dim:].float()
    half = self.dim // 2
    pairs = torch.complex(rope[..., :half].contiguous(), rope[..., half:].contiguous())
    cis = cis.conj() if inverse else cis
    while cis.dim() < pairs.dim():
        cis = cis.unsqueeze(-2)
    turned = pairs * cis
    rotated = torch.cat([turned.real, turned.imag], dim=-1).to(x.dtype)
    return torch.cat([x[..., :-self.dim], rotated], dim=-1)


def _early_block_indices(start: int, n: int, ratio: int, offset: int, device) -> torch.Tensor:
    """HCA visibility one block early: entry j visible at position p when j <= (p + 1) // ratio."""
    j = torch.arange((start + n) // ratio, device=device)
    visible = torch.arange(start + 1, start + n + 1, device=device).unsqueeze(1) // ratio + 1
    return torch.where(j >= visible, -1, j + offset)


def _early_select(original):
    def select(self, w, q, keys, start, offset):
        return original(self, w, q, keys, start + 4, offset)    # the indexer sees one more ratio-4 block
    return select


@contextlib.contextmanager
def _patched(*patches) -> Iterator[None]:
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


BUGS = {
    "rope-rotate-half": "RoPE pairs dim j with j + 32 (rotate-half) instead of the interleaved pairs (2j, 2j+1)",
    "compressed-early": "a compressed entry becomes visible one block early (CSA indexer and HCA)",
}


def inject(name: str):
    """Context manager that makes the model compute with bug `name` (one of `BUGS`)."""
    if name == "rope-rotate-half":
        return _patched((Rotary, "__call__", _rotate_half))
    if name == "compressed-early":
        return _patched((attention, "block_indices", _early_block_indices),
                        (Indexer, "select", _early_select(Indexer.select)))
    raise ParityError(f"unknown bug {name!r}; known: {', '.join(BUGS)}")
