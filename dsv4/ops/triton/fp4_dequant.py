"""FP4 e2m1 weights (packed, low nibble first) with e8m0 scales per 32 -> bf16, in one launch over a whole stack.

What it is for: the MoE's transient grouped path for large prefill chunks (`MoE.routed_grouped`): all experts of
one matrix decoded to a bf16 stack for ONE call, multiplied by cuBLAS's grouped GEMM (`torch._grouped_mm`), freed.
Nothing stays resident (issue 16, item 1): the stack lives for one GEMM. The twin (`ops.dequant_fp4_bf16.twin`)
decodes expert by expert through `quant.dequant_fp4`, whose fp32 temporaries are 4x the stack's size at once.
Exact: an e2m1 value (at most 2 significant bits) times a power of two is a bf16 number (bf16 has fp32's exponent
range, subnormals included), so every element is the twin's value bit for bit (built as integer bit patterns:
`_bf16_bits`); NaN exactly where the scale byte is 255, inf where the value overflows (as the twin).
Bytes: per two elements 1 packed byte + 1/16 scale byte read, 4 bytes written: a Flash matrix stack (256 x 2048 x
4096) is ~1.1 GB read and 4.3 GB written, ~1.3 ms at ~4.2 TB/s (~1.6 ms at the H100's 3.35). Measured on the H100:
6.8 ms (0.80 TB/s) with interleaving int16 stores (nineteenth session), 6.97 ms with int32 word stores (twentieth):
the stores were not the limit. The exact bit construction (`_bf16_bits`, ~30 integer ops per element, ~60 per byte)
is: 1.1e9 bytes x ~62 ops at ~16.7e12 int32 ops/s (132 SMs x 64 lanes x 1.98 GHz) is ~4 ms. Hence the table path
(`_byte_tables`): ~3 ops per byte, exact wherever no value leaves bf16's normal range. Measured (H100, twentieth
session): 4.86 ms, 1.12 TB/s: now bound by the two table gathers (a warp's 32 lanes hit up to 8 of the 1 KB
table's cache lines each: ~2 ms of L1 wavefronts). The transient path it serves stays opt-in (`MoE`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.fp4_layout import to_rows

BLOCK_R, BLOCK_B = 16, 256          # rows x packed bytes per program (bytes: 512 elements of each of 16 rows)


@triton.jit
def _bf16_bits(code, e):
    """int32 e2m1 codes (0..15) and e8m0 bytes (0..255) -> int32 holding the bf16 bit pattern of code * 2^(e - 127).

    Built from integers, not by an fp32 multiply: results below 2^-126 are bf16 subnormals, which a flush-to-zero
    multiply (Triton's interpreter flushes them; a GPU may) would lose. A nonzero code is 1.f x 2^(E - 1) (E the
    code's two exponent bits, E >= 1) or 0.5 (E = 0, f = 1), so the value is 1.f x 2^q with q >= -128: normal bf16
    bits (q + 127) << 7 | f << 6 from q = -126; below, the subnormal (2 + f) << (q + 132) (units of 2^-133).
    Above bf16's range: inf; scale byte 255: NaN (as `quant.e8m0_to_float`); the sign is bit 3 -> bit 15."""
    big = (code >> 1) & 3
    f = tl.where(big == 0, 0, code & 1)
    q = tl.where(big == 0, e - 128, big + e - 128)
    normal = ((q + 127) << 7) | (f << 6)
    subnormal = (2 + f) << tl.minimum(tl.maximum(q + 132, 0), 8)
    mag = tl.where(q >= -126, normal, subnormal)
    mag = tl.where(q >= 128, 0x7F80, mag)
    mag = tl.where((code & 7) == 0, 0, mag)
    mag = tl.where(e == 255, 0x7FC0, mag)
    return mag | ((code & 8) << 12)


@triton.jit
def _dequant_fp4(w_ptr, s_ptr, base_ptr, nz_ptr, out_ptr, R, KB, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    """w [R, KB] packed bytes, s [R, KB / 16] e8m0 bytes -> out [R, KB] int32 words, each the bf16 bit patterns of
    one byte's two elements (low nibble in the low half: element 2i first in memory, little-endian).
    One 4-byte word per byte, stored where the byte's index says: contiguous, coalesced stores. A tile whose scale
    bytes all lie in [2, 252] takes the table path (`_byte_tables`); any other tile the exact bit construction."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    r64 = rows.to(tl.int64)[:, None]
    at = r64 * KB + cols[None, :]
    ok = (rows < R)[:, None] & (cols < KB)[None, :]
    byte = tl.load(w_ptr + at, mask=ok, other=0).to(tl.int32) & 0xFF
    e = tl.load(s_ptr + r64 * (KB // 16) + (cols // 16)[None, :], mask=ok, other=127).to(tl.int32) & 0xFF
    if (tl.min(e) >= 2) & (tl.max(e) <= 252):
        word = tl.load(base_ptr + byte) + (e - 127) * tl.load(nz_ptr + byte)
    else:
        word = _bf16_bits(byte & 15, e) | (_bf16_bits(byte >> 4, e) << 16)
    tl.store(out_ptr + at, word, mask=ok)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _byte_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per packed byte: `base` = the int32 word of its two values at scale 2^0 (bf16 bits, low nibble low), and
    `nz` = 128 (one exponent unit) in each half whose value is nonzero. Scaling by 2^(e-127) adds e - 127 to a
    nonzero half's exponent field: word = base + (e - 127) * nz. Exact when every result is a normal bf16: the
    smallest nonzero value 0.5 x 2^(e-127) >= 2^-126 needs e >= 2, the largest 6 x 2^(e-127) < 2^128 needs e <= 252.
    Then no half's exponent leaves [1, 254], so no carry or borrow crosses into the sign bit or the other half
    (|e - 127| x 128 x 65537 < 2^31). Zeros (either sign) keep their bits."""
    if device not in _TABLES:
        values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        values = torch.cat([values, -values]).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
        byte = torch.arange(256)
        lo, hi = byte & 15, byte >> 4
        base = values[lo] | (values[hi] << 16)
        nz = 128 * ((lo & 7) != 0).to(torch.int32) + (128 << 16) * ((hi & 7) != 0).to(torch.int32)
        _TABLES[device] = (base.to(torch.int32).to(device), nz.to(torch.int32).to(device))
    return _TABLES[device]


def dequant_fp4_bf16(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[..., N, K/2] packed codes (int8/uint8; tile-major too, `dsv4.ops.fp4_layout`: put back in rows order first)
    + e8m0 [..., N, K/32] (float8_e8m0fnu/uint8) -> bf16 [..., N, K]."""
    weight = to_rows(weight)
    if weight.dtype not in (torch.int8, torch.uint8) or scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise ValueError(f"dequant_fp4_bf16: weight int8/uint8 and scale e8m0/uint8, got {weight.dtype}, "
                         f"{scale.dtype}")
    kb = weight.shape[-1]
    if kb % 16 or scale.shape != (*weight.shape[:-1], kb // 16):
        raise ValueError(f"dequant_fp4_bf16: weight {tuple(weight.shape)} and scale {tuple(scale.shape)} do not "
                         "pair as [..., N, K/2] and [..., N, K/32]")
    w = weight.contiguous().view(-1, kb)
    s = scale.contiguous().view(torch.uint8).view(-1, kb // 16)
    out = torch.empty(*weight.shape[:-1], 2 * kb, dtype=torch.bfloat16, device=weight.device)
    grid = (triton.cdiv(w.shape[0], BLOCK_R), triton.cdiv(kb, BLOCK_B))
    base, nz = _byte_tables(weight.device)
    _dequant_fp4[grid](w, s, base, nz, out.view(torch.int32), w.shape[0], kb, BLOCK_R=BLOCK_R, BLOCK_B=BLOCK_B,
                       num_warps=4)
    return out
