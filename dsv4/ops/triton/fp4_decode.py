"""Packed FP4 e2m1 decode: several codes per 32-bit instruction (inline PTX), each beside a pure-Triton twin.

Triton computes int8/fp16 tensors one element per 32-bit register lane, so a per-element decode costs ~6-10
integer/float ops per element; these helpers decode by bit placement on packed registers instead. All of them
are exact: no rounding anywhere, only a fixed power-of-two factor (the bias) that the caller folds into a scale.
* e2m1 -> fp16 (bias 2^-14): the magnitude bits (e1 e0 m) go to fp16 bits 9-11 and the sign to bit 15; 0.5 becomes
  the fp16 subnormal 2^-15. In an int32 word of 8 codes (element 8i + J in nibble J), nibbles j and j + 4 sit 16
  bits apart, so ONE shift + mask pair places both into an fp16x2 word: ((w << (9 - 4j)) & 0x0E000E00) |
  ((w << (12 - 4j)) & 0x80008000), four fp16x2 words per int32 word.
* e2m1 -> e4m3 (bias 2^-6): byte = sign << 7 | mag << 2 (e4m3 subnormals included), four bytes per op: low nibbles
  ((w << 2) & 0x1C1C1C1C) | ((w << 4) & 0x80808080), high nibbles ((w >> 2) & 0x1C1C1C1C) | (w & 0x80808080).
The formulas are checked exhaustively in plain torch (tests/test_fp4_decode.py).

Every helper takes a constexpr PACKED: True runs the inline PTX (GPU only: the CPU interpreter cannot run inline
asm), False the twin, which gives bit-identical results in plain Triton (the interpreter tests it, the GPU test
compares the two). `decode_probe` runs all helpers over given words, for those tests.
NOTE: `inline_asm_elementwise(pack=4)` hands the asm four consecutive elements of a thread packed in one register
(element i in byte i / the i-th 16-bit half, little-endian); which elements share a register is Triton's choice,
which does not matter for an elementwise map.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.registry import env_switch

F16_BIAS = 2.0**-14                 # e2m1 -> fp16 by bit placement gives the value times this
E4M3_BIAS = 2.0**-6                 # e2m1 -> e4m3 likewise


def _half2_ptx(dst: str, src: str, j: int) -> str:
    """PTX for the fp16x2 word of nibbles j (low half) and j + 4 (high half) of `src` (see the docstring)."""
    mag = f"shl.b32 m, {src}, {9 - 4 * j};" if j < 3 else f"shr.b32 m, {src}, 3;"
    sign = f"shl.b32 s, {src}, {12 - 4 * j};" if j < 3 else f"mov.b32 s, {src};"
    return f"{mag} {sign} and.b32 m, m, 0x0E000E00; and.b32 s, s, 0x80008000; or.b32 {dst}, m, s;"


# One int32 word -> its 8 elements as fp32 (value * 2^-14): four fp16x2 placements, eight exact conversions.
_WORD_TO_F32 = tl.constexpr(
    "{ .reg .b32 m, s, h; .reg .b16 lo, hi; "
    + " ".join(_half2_ptx("h", "$8", j) + f" mov.b32 {{lo, hi}}, h; cvt.f32.f16 ${j}, lo; cvt.f32.f16 ${j + 4}, hi;"
               for j in range(4)) + " }")
# Four bytes (pack=4) -> the fp16 (value * 2^-14) of their low (j = 0, 2) or high (j = 1, 3) nibbles, two fp16x2
# outputs. The word formula pairs bytes (0, 2) and (1, 3); prmt regroups them as (0, 1) and (2, 3).
_BYTES_TO_F16_LO, _BYTES_TO_F16_HI = (
    tl.constexpr("{ .reg .b32 m, s, a, b; " + _half2_ptx("a", "$2", j) + " " + _half2_ptx("b", "$2", j + 2)
                 + " prmt.b32 $0, a, b, 0x5410; prmt.b32 $1, a, b, 0x7632; }") for j in (0, 1))
# The same, each fp16x2 output then multiplied by fp16x2 factors (pack=4: $2 = the bytes, $3 / $4 = factors 0-1 / 2-3).
_BYTES_TO_F16_MUL_LO, _BYTES_TO_F16_MUL_HI = (
    tl.constexpr("{ .reg .b32 m, s, a, b; " + _half2_ptx("a", "$2", j) + " " + _half2_ptx("b", "$2", j + 2)
                 + " prmt.b32 m, a, b, 0x5410; prmt.b32 s, a, b, 0x7632; mul.rn.f16x2 $0, m, $3;"
                 " mul.rn.f16x2 $1, s, $4; }") for j in (0, 1))
# Pairs: four bytes (b0, b0, b1, b1) (pack=4 over `tl.join(byte, byte)`) -> fp16x2 (lo, hi) of b0 and of b1, each
# times an fp16x2 factor ($3, $4): the word formula for j = 0 gives (lo b0, lo b1), for j = 3 (hi b0, hi b1).
_PAIRS_TO_F16_MUL = tl.constexpr(
    "{ .reg .b32 m, s, a, b; " + _half2_ptx("a", "$2", 0) + " " + _half2_ptx("b", "$2", 3)
    + " prmt.b32 m, a, b, 0x5410; prmt.b32 s, a, b, 0x7632; mul.rn.f16x2 $0, m, $3; mul.rn.f16x2 $1, s, $4; }")
# Four bytes -> e4m3 (value * 2^-6) of their low / high nibbles, one register in, one out.
_BYTES_TO_E4M3_LO = tl.constexpr("{ .reg .b32 m, s; shl.b32 m, $1, 2; shl.b32 s, $1, 4; "
                                 "and.b32 m, m, 0x1C1C1C1C; and.b32 s, s, 0x80808080; or.b32 $0, m, s; }")
_BYTES_TO_E4M3_HI = tl.constexpr("{ .reg .b32 m; shr.b32 m, $1, 2; and.b32 m, m, 0x1C1C1C1C; "
                                 "and.b32 $0, $1, 0x80808080; or.b32 $0, $0, m; }")


@triton.jit
def _f16_halves(h):
    """int32 holding two fp16 bit patterns -> (low, high) as fp32."""
    lo = (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _half2_bits(word, j: tl.constexpr):
    if j < 3:
        return ((word << (9 - 4 * j)) & 0x0E000E00) | ((word << (12 - 4 * j)) & -2147450880)   # 0x80008000
    return ((word >> 3) & 0x0E000E00) | (word & -2147450880)


@triton.jit
def e2m1_word_f32(word, PACKED: tl.constexpr):
    """int32 words of 8 codes (element 8i + J in nibble J) -> 8 fp32 tensors (J = 0..7), each value * 2^-14."""
    if PACKED:
        return tl.inline_asm_elementwise(_WORD_TO_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r", [word],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    e0, e4 = _f16_halves(_half2_bits(word, 0))
    e1, e5 = _f16_halves(_half2_bits(word, 1))
    e2, e6 = _f16_halves(_half2_bits(word, 2))
    e3, e7 = _f16_halves(_half2_bits(word, 3))
    return e0, e1, e2, e3, e4, e5, e6, e7


@triton.jit
def e2m1_byte_f16(byte, HIGH: tl.constexpr, PACKED: tl.constexpr):
    """int8/uint8 packed bytes -> fp16 of the low (HIGH=False: element 2i) or high (element 2i + 1) nibble,
    value * 2^-14, same shape: four bytes per asm instance."""
    if PACKED:
        asm: tl.constexpr = _BYTES_TO_F16_HI if HIGH else _BYTES_TO_F16_LO
        return tl.inline_asm_elementwise(asm, "=r,=r,r", [byte], dtype=tl.float16, is_pure=True, pack=4)
    code = (byte.to(tl.int32) >> (4 * HIGH)) & 0xF
    return (((code & 7) << 9) | ((code & 8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def e2m1_byte_f16_mul(byte, factor, HIGH: tl.constexpr, PACKED: tl.constexpr):
    """`e2m1_byte_f16(byte, HIGH) * factor` (fp16 factor of the same shape), the multiply on fp16x2 pairs in the
    asm; exact when the products are fp16 numbers (powers of two within range: the caller's bound)."""
    if PACKED:
        asm: tl.constexpr = _BYTES_TO_F16_MUL_HI if HIGH else _BYTES_TO_F16_MUL_LO
        return tl.inline_asm_elementwise(asm, "=r,=r,r,r,r", [byte, factor], dtype=tl.float16, is_pure=True,
                                         pack=4)
    return e2m1_byte_f16(byte, HIGH, False) * factor


@triton.jit
def e2m1_pair_f16_mul(byte, factor, PACKED: tl.constexpr):
    """int8/uint8 packed bytes [...] and fp16 factors [...] -> fp16 [..., 2]: (low, high) nibble of each byte, value
    * 2^-14 * factor, K-interleaved as a dot operand wants it (elements 2i, 2i + 1 adjacent in a register)."""
    if PACKED:
        return tl.inline_asm_elementwise(_PAIRS_TO_F16_MUL, "=r,=r,r,r,r", [tl.join(byte, byte),
                                         tl.join(factor, factor)], dtype=tl.float16, is_pure=True, pack=4)
    return tl.join(e2m1_byte_f16(byte, False, False) * factor, e2m1_byte_f16(byte, True, False) * factor)


@triton.jit
def e2m1_byte_e4m3(byte, HIGH: tl.constexpr, PACKED: tl.constexpr):
    """int8/uint8 packed bytes -> float8e4nv of the low or high nibble, value * 2^-6, same shape (4 per op)."""
    if PACKED:
        asm: tl.constexpr = _BYTES_TO_E4M3_HI if HIGH else _BYTES_TO_E4M3_LO
        return tl.inline_asm_elementwise(asm, "=r,r", [byte], dtype=tl.float8e4nv, is_pure=True, pack=4)
    code = (byte.to(tl.int32) >> (4 * HIGH)) & 0xF
    return (((code & 7) << 2) | ((code & 8) << 4)).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _store_elements(at, elements):
    """A word's eight decoded elements (a tuple of tensors) to at + 0 .. at + 7."""
    for j in tl.static_range(8):
        tl.store(at + j, elements[j])


@triton.jit
def _decode_probe(w_ptr, f32_ptr, f16_ptr, f16mul_ptr, pair_ptr, e4m3_ptr, N_WORDS: tl.constexpr,
                  PACKED: tl.constexpr):
    """Every helper over N_WORDS int32 words: f32 and pair [N_WORDS, 8] (element order), f16, f16mul and e4m3
    [N_WORDS, 8] (the word's bytes' low nibbles in columns 0-3 and high nibbles in 4-7: elements 0, 2, 4, 6, 1, 3,
    5, 7); f16mul is f16 times 2^((i + c % 4) % 16 - 8) for word i, column c, pair the same factors per byte."""
    i = tl.arange(0, N_WORDS)
    word = tl.load(w_ptr + i)
    _store_elements(f32_ptr + i * 8, e2m1_word_f32(word, PACKED))
    b = tl.arange(0, 4)
    byte = tl.load(w_ptr.to(tl.pointer_type(tl.uint8)) + i[:, None] * 4 + b[None, :])     # [N_WORDS, 4]
    factor = (((i[:, None] + b[None, :]) % 16 + 7) << 10).to(tl.int16).to(tl.float16, bitcast=True)
    at_pair = pair_ptr + i[:, None, None] * 8 + b[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]
    tl.store(at_pair, e2m1_pair_f16_mul(byte, factor, PACKED))
    for HIGH in tl.static_range(2):
        tl.store(f16_ptr + i[:, None] * 8 + 4 * HIGH + b[None, :], e2m1_byte_f16(byte, HIGH, PACKED))
        tl.store(f16mul_ptr + i[:, None] * 8 + 4 * HIGH + b[None, :], e2m1_byte_f16_mul(byte, factor, HIGH, PACKED))
        tl.store(e4m3_ptr + i[:, None] * 8 + 4 * HIGH + b[None, :], e2m1_byte_e4m3(byte, HIGH, PACKED))


def decode_probe(words: torch.Tensor, packed: bool) -> tuple[torch.Tensor, ...]:
    """int32 words [n] (n a power of two) -> `_decode_probe`'s (f32, f16, f16mul, pair, e4m3) [n, 8]."""
    n = words.numel()
    if words.dtype != torch.int32 or n & (n - 1):
        raise ValueError(f"decode_probe: want a power-of-two count of int32 words, got {words.dtype} [{n}]")
    f32 = torch.empty(n, 8, dtype=torch.float32, device=words.device)
    f16 = torch.empty(n, 8, dtype=torch.float16, device=words.device)
    f16mul, pair = torch.empty_like(f16), torch.empty_like(f16)
    e4m3 = torch.empty(n, 8, dtype=torch.float8_e4m3fn, device=words.device)
    _decode_probe[(1,)](words.contiguous(), f32, f16, f16mul, pair, e4m3, N_WORDS=n, PACKED=packed)
    return f32, f16, f16mul, pair, e4m3


def packed_from_env() -> bool:
    """DSV4_FP4_PACKED=1 turns the packed decode on in the dispatched FP4 kernels (the pair GEMV and the
    expert-major grouped GEMM): an opt-in for measuring it end to end (`dsv4 bench`); unset or 0: off, except in
    the expert-major kernel's small groups (decode batches: below 16 rows per expert), where it is the measured
    default (ops/grouped_linear.py `_PACKED_BELOW`)."""
    return env_switch("DSV4_FP4_PACKED")
