"""FP8 e4m3 weights with 128x128 e8m0 scales -> bf16, in one launch: the transient decode of attention's wo_a for
prefill-sized calls (`ops/block_diag_linear.py`, `decode_bf16`).

Why a kernel: torch's form of the same decode (`weight.to(bf16)` then an in-place multiply by the broadcast scale
grid) took ~240 us for Flash's wo_a (8192 x 4096) on the H100, where its bytes (1 read + 2 written per weight, 100 MB)
take ~33 us: the thirty-fifth session's micro-benchmark (bench/results/h100_s35/), which made the 1k prefill
1.0 ms slower than the old bf16 copy.
Exact: an e4m3 value (at most 4 significant bits) times a power of two is a bf16 number wherever it stays in
bf16's normal range; outside it the result is built as integer bit patterns, never by a multiply that could flush a
subnormal: bit for bit `dequant_weight(w, s, "fp8").bfloat16()` (fp32 product, one rounding to bf16), NaN where
the code is NaN (0x7F / 0xFF) or the scale byte is 255, inf where the value overflows.
* Fast path, a tile whose scale byte b lies in [10, 246]: every nonzero result is a normal bf16, so the hardware's
  e4m3 conversion times the power of two is exact (no flush can occur).
* Any other tile (the checkpoint's scales never go there; tests do): the bits built from integers (a subnormal
  code m x 2^-9 normalised to 1.f x 2^(p - 9), p the position of m's top bit), bf16 subnormals rounded to
  nearest even as the twin's cast rounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R, BLOCK_C = 32, 128          # a tile: 32 rows x one 128-column scale block (one scale byte per program)
FAST_LO, FAST_HI = 10, 246           # scale bytes whose every nonzero product is a normal bf16


@triton.jit
def _normalised(c):
    """int32 codes -> (q, f): the nonzero finite value is 1.f x 2^q (f bf16's 7 mantissa bits), at scale 2^0."""
    e = (c >> 3) & 15
    m = c & 7
    p = (m >= 4).to(tl.int32) + (m >= 2).to(tl.int32)              # a subnormal code's top bit
    q = tl.where(e == 0, p - 9, e - 7)
    f = tl.where(e == 0, ((m - (1 << p)) << (7 - p)) & 0x7F, m << 4)
    return q, f


@triton.jit
def _bf16_bits(c, b):
    """int32 e4m3 codes (0..255) and one e8m0 byte b -> int32 holding the bf16 bits of code x 2^(b - 127)."""
    if (b >= 10) & (b <= 246):
        # Every nonzero product is a normal number: the hardware's e4m3 -> fp32 conversion (exact: e4m3 values,
        # its subnormals included, are f16 normals) times the power of two, rounded to bf16 (exact: 4 significant
        # bits). ~6 instructions an element where the integer construction below takes ~30 (at ~30 an H100 is
        # ALU-bound on this kernel's 3 bytes an element: 70-87 us for Flash's wo_a, h100_s35 call C). NaN codes
        # set apart (Triton's interpreter converts them as 480).
        scale = (b << 23).to(tl.float32, bitcast=True)
        value = c.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale
        value = tl.where((c & 0x7F) == 0x7F, float("nan"), value)
        bits = value.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
    else:
        # The general construction, from integers: bf16 subnormals rounded to nearest even (the twin's cast),
        # overflow to inf, NaN under byte 255 (times 0 too).
        q, f = _normalised(c)
        qs = q + b - 127
        shift = tl.minimum(-126 - qs, 10)                            # below 2^-126: a subnormal, 2^-133 units
        sig = 128 + f                                                # 1.f in units of 2^-7
        half = (1 << tl.maximum(shift - 1, 0)) - 1
        sub = (sig + half + ((sig >> tl.maximum(shift, 0)) & 1)) >> tl.maximum(shift, 0)
        mag = tl.where(qs >= -126, ((qs + 127) << 7) | f, sub)
        mag = tl.where(qs >= 128, 0x7F80, mag)
        mag = tl.where((c & 0x7F) == 0, 0, mag)
        mag = tl.where(((c & 0x7F) == 0x7F) | (b == 255), 0x7FC0, mag)
        bits = mag | ((c & 0x80) << 8)
    return bits


@triton.jit
def _dequant_fp8(w_ptr, s_ptr, out_ptr, N, K, KS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """w [N, K] e4m3 bytes, s [ceil(N/128), KS] e8m0 bytes -> out [N, K] int16 (bf16 bits)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    at = rows.to(tl.int64)[:, None] * K + cols[None, :]
    ok = (rows < N)[:, None] & (cols < K)[None, :]
    c = tl.load(w_ptr + at, mask=ok, other=0).to(tl.int32) & 0xFF
    b = tl.load(s_ptr + (tl.program_id(0) * BLOCK_R // 128) * KS + tl.program_id(1)).to(tl.int32) & 0xFF
    tl.store(out_ptr + at, _bf16_bits(c, b).to(tl.int16), mask=ok)


def dequant_fp8_bf16(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 [N, K] (float8_e4m3fn / uint8) + e8m0 [ceil(N/128), ceil(K/128)] -> bf16 [N, K]."""
    if weight.dim() != 2 or weight.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise ValueError(f"dequant_fp8_bf16: weight [N, K] float8_e4m3fn/uint8, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8) or scale.shape != (-(-n // 128), -(-k // 128)):
        raise ValueError(f"dequant_fp8_bf16: scale [{-(-n // 128)}, {-(-k // 128)}] e8m0/uint8 for weight "
                         f"{tuple(weight.shape)}, got {scale.dtype} {tuple(scale.shape)}")
    w = weight.contiguous().view(torch.uint8)
    s = scale.contiguous().view(torch.uint8)
    out = torch.empty(n, k, dtype=torch.bfloat16, device=weight.device)
    grid = (triton.cdiv(n, BLOCK_R), triton.cdiv(k, BLOCK_C))
    _dequant_fp8[grid](w, s, out.view(torch.int16), n, k, s.shape[1], BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4)
    return out
