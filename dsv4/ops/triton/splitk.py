"""Split-K helpers of the small-M Triton GEMMs: how many K splits to run, and their deterministic sum."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sum_splits(part_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum over the K splits of the fp32 partials, in split order (deterministic), rounded once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for k in tl.static_range(1, SPLIT):
        acc += tl.load(part_ptr + k * MN + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def auto_split(n_tiles: int, device: torch.device, programs_per_sm: int) -> int:
    """K splits so that about `programs_per_sm` programs per SM run: a GEMV keeps the bytes in flight that the
    memory needs only with many programs (1 off CUDA: the interpreter gains nothing)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return -(-programs_per_sm * sms // n_tiles)


def divisor_at_most(n: int, want: int) -> int:
    """The largest divisor of n that is <= want (equal splits: every program runs the same K loop)."""
    return max(d for d in range(1, min(n, max(want, 1)) + 1) if n % d == 0)


def split_outputs(split: int, M: int, N: int, dtype: torch.dtype, device: torch.device,
                  partials: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, part) of a small-M split-K call: `part` [split, M, N] fp32 the kernel writes (out itself when the call
    returns the partials or has one split), `out` [M, N] in `dtype` what the call returns (`add_splits` fills it)."""
    if partials:
        out = torch.empty(split, M, N, dtype=torch.float32, device=device)
        return out, out
    out = torch.empty(M, N, dtype=dtype, device=device)
    return out, out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=device)


def add_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    """out = the sum of part's splits in split order (`_sum_splits`), unless part is out (nothing to add)."""
    if part is not out:
        n = out.numel()
        _sum_splits[(triton.cdiv(n, 1024),)](part, out, n, SPLIT=part.shape[0], BLOCK=1024)
