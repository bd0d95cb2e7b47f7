"""Rotary embedding of DeepSeek-V4 (spec §2.4).

NOTE: pairs are *interleaved* (elements 2j, 2j+1 form one complex number), the rotation covers the LAST
`rope_head_dim` dims of a vector, and there are two tables: base `rope_theta` without YaRN for
sliding-only layers (and MTP), base `compress_rope_theta` with YaRN for every compressed layer.
No YaRN mscale anywhere: the rotation has unit magnitude and the softmax scale is untouched.
Angles are computed for the requested positions directly; each equals the reference table entry bit for bit
(one fp32 product `pos * f_i`), so no table has to be sized from max_seq_len.
"""

from __future__ import annotations

import math

import torch

from dsv4.ops.ref import widen


def yarn_correction_range(dim: int, base: float, original_seq_len: int, beta_fast: float,
                          beta_slow: float) -> tuple[int, int]:
    """Indices (low, high) of the frequency ramp: below low unscaled, above high divided by the factor."""
    def corr_dim(rotations):
        return dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low = math.floor(corr_dim(beta_fast))
    high = math.ceil(corr_dim(beta_slow))
    return max(low, 0), min(high, dim - 1)


def inv_freqs(dim: int, base: float, yarn: bool, factor: float, original_seq_len: int, beta_fast: float,
              beta_slow: float) -> torch.Tensor:
    """f_i = base^(-2i/dim), i < dim/2, blended towards f_i/factor by the YaRN ramp (fp32, as the reference)."""
    # device="cpu" explicitly: models are built under `torch.device("meta")`, and this table is not a parameter.
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if yarn and original_seq_len > 0:
        low, high = yarn_correction_range(dim, base, original_seq_len, beta_fast, beta_slow)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


class Rotary:
    """One layer's rotation: `rotate(x, positions)` and its inverse on the last `dim` dims."""

    def __init__(self, cfg, compressed: bool):
        base = cfg.compress_rope_theta if compressed else cfg.rope_theta
        self.dim = cfg.rope_head_dim
        self.freqs = inv_freqs(self.dim, base, compressed, cfg.rope_factor, cfg.original_seq_len,
                               cfg.beta_fast, cfg.beta_slow)
        # (freqs, a 0-d one) per device: no host-to-device copy per step (CUDA graphs), and polar's modulus a
        # constant rather than a `ones_like` kernel per call (7 launches of a compiled 4-layer decode step)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def cis(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotations for integer positions: complex [*positions.shape, dim/2] (the reference's table, bit for bit),
        or, inside a torch.compile trace, the same numbers as real (cos, sin) pairs [*positions.shape, dim/2, 2].
        Why: inductor generates no code for complex tensors, so in a compiled decode step every complex op ran as
        its own aten kernel (~35 a 4-layer step: complex mul, conj, polar; bench/results/h200_s15_checks/
        profile.log). As real pairs the rotation's products fuse with their neighbours; they are the same fp32
        operations in the same order as the complex multiply (equal bit for bit on the CPU: tests/
        test_rope_real.py; not on CUDA, whose complex-multiply kernel rounds otherwise: the tiny model's rotated bf16
        queries differ by up to 7.6e-6, so a traced step is not bit-equal to eager there:
        scripts/bench/compiled_side_diff.py, bench/results/h100_s25/). The table itself stays torch.polar's (cos/sin
        of another libm differ by an ulp)."""
        consts = self._on_device.get(positions.device)
        if consts is None:
            consts = self._on_device[positions.device] = (self.freqs.to(positions.device),
                                                          torch.ones((), device=positions.device))
        freqs, one = consts
        angles = positions.to(torch.float32).unsqueeze(-1) * freqs
        cis = torch.polar(one, angles)                   # (broadcast: the same values as a modulus of ones_like)
        return torch.view_as_real(cis) if torch.compiler.is_compiling() else cis

    def __call__(self, x: torch.Tensor, cis: torch.Tensor, inverse: bool = False, owned: bool = False) -> torch.Tensor:
        """Rotate x[..., -dim:] by `cis` (broadcast over x's head dims); returns a tensor of x's dtype.

        `cis` has the shape of x's leading token dims: [b, s, dim/2] for x [b, s, d] or [b, s, h, d].
        `owned`: the caller's x is its own fresh tensor, nothing else reads it: without autograd the rotated dims
        are written into it and x is returned (the same values). A new tensor (the cat) copies the other d - dim
        dims too: at an 8k prefill the queries (and the attention output) are [8192, 64, 512] bf16, and the cat of
        each took 1.43 ms on an H200 (bench/results/h200_s16_checks/prefill_stacks.log), 11.5 ms of 204. Owned:
        the queries (`Attention.queries`) and the attention op's output (`Attention.output`: an op returns a
        fresh tensor; taps copy what they record, and a wrapper that keeps an op's output must copy it too, as
        tests/test_decode_batch.py's recorder and scripts/bench/graph_divergence.py do).
        """
        pairs = widen(x[..., -self.dim:]).unflatten(-1, (-1, 2))
        rotated = (_rotate_complex if cis.is_complex() else _rotate_real)(pairs, cis, inverse).to(x.dtype)
        if owned and not (torch.is_grad_enabled() and x.requires_grad):
            x[..., -self.dim:] = rotated
            return x
        return torch.cat([x[..., :-self.dim], rotated], dim=-1)


def _rotate_complex(pairs: torch.Tensor, cis: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The reference's rotation: pairs [..., dim/2, 2] as complex numbers times cis (complex [..., dim/2])."""
    rope = torch.view_as_complex(pairs.contiguous())
    cis = cis.conj() if inverse else cis
    while cis.dim() < rope.dim():
        cis = cis.unsqueeze(-2)
    return torch.view_as_real(rope * cis).flatten(-2)


def _rotate_real(pairs: torch.Tensor, cis: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The same products in real arithmetic, cis as (cos, sin) pairs [..., dim/2, 2]: (a + ib)(c + id) =
    (ac - bd) + i(ad + bc), the order of torch's complex multiply; the inverse negates d (exact), as conj does."""
    cos, sin = cis.unbind(-1)
    sin = -sin if inverse else sin
    while cos.dim() < pairs.dim() - 1:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    a, b = pairs.unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
