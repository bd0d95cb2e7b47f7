"""FP4 (e2m1) routed-expert weights: codes packed two per byte along the input dim, e8m0 scale per 32 inputs.

Layout (spec §5.3): int8 [out, in/2]; element 2k is the low nibble, 2k+1 the high nibble. Code bit 3 is the
sign, bits 0-2 index {0, 0.5, 1, 1.5, 2, 3, 4, 6}; code 8 is -0.0. Scale: e8m0 [out, in/32].

torch has no CPU cast to float4, so rounding onto the e2m1 grid is done here: count the midpoints below |x|,
and at an exact midpoint round to the even code (the code's low bit is the mantissa bit), like the hardware cast.
`e2m1_codes` stays the definition; `e2m1_round` (the fake-quant's values, on the grid in 8 passes) and
`fp4_roundtrip` (the QAT weight rounding) are its bit-exact fast twins (tests/test_fp4_round.py).
"""

from __future__ import annotations

import torch

from dsv4.quant.e8m0 import e8m0_to_float, float_to_e8m0, pow2, pow2_ceil_scale
from dsv4.quant.fp8 import BLOCK, expand_blocks, work_dtype

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
E2M1_MAX = 6.0
FP4_BLOCK = 32
AMAX_FLOOR = 6.0 * 2.0**-126  # keeps the scale >= 2**-126, a normal fp32 number
# Midpoint c lies between codes c and c+1; a tie rounds up only when c+1 is even (c = 1, 3, 5).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)
_EXACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 code (ties to even, saturating, sign kept) without checking for NaN."""
    if x.dtype not in _EXACT_DTYPES:
        x = x.float()  # float8 inputs; the midpoints are exact in every dtype listed above
    a = x.abs()
    # Comparisons with Python constants, not a lookup tensor: nothing to build on the host (torch.compile would
    # copy such a table to the device inside the captured graph).
    magnitude = torch.zeros_like(a, dtype=torch.int32)
    for mid in _MIDPOINTS:                 # number of midpoints strictly below |x|; > 6 saturates at code 7
        magnitude += a > mid
    for tie in _TIES_UP:
        magnitude += a == tie
    return (magnitude | (torch.signbit(x).to(magnitude.dtype) << 3)).to(torch.uint8)


# Per work dtype: (integer view, exponent-field mask, C for q = 0.5). Adding C = 2**m * q (m: stored mantissa
# bits) and subtracting it again rounds a in [0, C) to a multiple of q, once, to nearest even: a + C lies in
# [C, 2C), where the float spacing is exactly q.
_MAGIC = {torch.float32: (torch.int32, 0x7F800000, 2.0**22), torch.float64: (torch.int64, 0x7FF0000000000000, 2.0**51)}


def e2m1_round(x: torch.Tensor, nan_to_zero: bool = False) -> torch.Tensor:
    """`fp4_decode(e2m1_codes(x))` computed on the grid, bit for bit, in 8 passes instead of ~45 (it runs for every
    QAT weight and FP4 activation rounding), fp32 values as there (float64 x: rounded in float64, then made fp32,
    exact; the caller's product with an fp32 scale then overflows as it did there). A NaN stays NaN
    (`nan_to_zero`: one more pass, and it becomes the signed zero that the code path gives it).

    The e2m1 spacing q is 0.5 below 2, 1 in [2, 4) and 2 from 4 on, i.e. 2**-23 times C = 2**22 * clamp(2**floor(
    log2 |x|), 1, 4) (C read off the exponent bits of |x| * 2**22), and (|x| + C) - C rounds |x| <= 6 to a multiple
    of q with one round-half-to-even: the code path's tie rule (at 0.25, 1.25, 2.5 and 5 the even neighbour is
    below, at 0.75, 1.75 and 3.5 above). |x| is clamped to 6 first (saturating, inf included), and the sign is put
    back with copysign (-0.0 for small negatives). NOTE: denormal flushing cannot change it: |x| + C is one
    correctly rounded add, and a flushed subnormal |x| (< 2**-126) rounds to 0 either way (tests/test_fp4_round.py
    checks it exhaustively over bf16 and around every tie in fp32)."""
    if x.dtype not in _MAGIC:
        x = x.float()  # 16-bit and float8 inputs: widening is exact
    int_dtype, exponent_mask, lo = _MAGIC[x.dtype]
    a = x.abs()
    a = (torch.nan_to_num(a, nan=0.0) if nan_to_zero else a).clamp_max(E2M1_MAX)
    c = ((a * lo).view(int_dtype) & exponent_mask).view(x.dtype).clamp(lo, 4 * lo)
    return ((a + c) - c).copysign(x).float()


def fp4_encode(x: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Float -> uint8 e2m1 codes 0..15; NaN has no e2m1 code and raises ValueError (`check=False`: not tested,
    the test being a GPU sync; a NaN then gets some code)."""
    assert x.is_floating_point(), f"fp4_encode needs a float tensor, got {x.dtype}"
    if check and bool(torch.isnan(x).any()):
        raise ValueError("fp4_encode: NaN cannot be encoded in e2m1")
    return e2m1_codes(x)


def fp4_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e2m1 codes -> fp32 values (from the code bits, so no lookup table has to live on the device)."""
    assert codes.dtype == torch.uint8, f"fp4 codes must be uint8, got {codes.dtype}"
    c = codes.to(torch.int32)
    exponent, mantissa = (c >> 1) & 3, (c & 1).float()
    magnitude = torch.where(exponent == 0, mantissa * 0.5, (mantissa + 2) * pow2(exponent - 2))
    return torch.where((c & 8) != 0, -magnitude, magnitude)  # code 8 gives -0.0


def pack_fp4(codes: torch.Tensor, check: bool = True) -> torch.Tensor:
    """uint8 codes [..., n] -> int8 [..., n/2], element 2k in the low nibble and 2k+1 in the high nibble; codes
    above 15 are a ValueError (`check=False`: not tested, for codes from `fp4_encode`)."""
    assert codes.dtype == torch.uint8, f"fp4 codes must be uint8, got {codes.dtype}"
    assert codes.shape[-1] % 2 == 0, f"pack_fp4 needs an even last dim, got {codes.shape[-1]}"
    if check and bool((codes > 15).any()):
        raise ValueError("pack_fp4: codes must be in 0..15")
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 / uint8 / float4_e2m1fn_x2 [..., n/2] -> uint8 codes [..., n]."""
    assert packed.dtype in (torch.int8, torch.uint8, torch.float4_e2m1fn_x2), (
        f"packed fp4 must be int8, uint8 or float4_e2m1fn_x2, got {packed.dtype}"
    )
    u = packed.view(torch.uint8)
    return torch.stack((u & 0x0F, u >> 4), dim=-1).flatten(-2)


def _check_fp4(weight: torch.Tensor, scale: torch.Tensor) -> None:
    assert weight.dim() >= 2, f"FP4 weight must be [..., out, in/2], got shape {tuple(weight.shape)}"
    in_features = 2 * weight.shape[-1]
    assert in_features % FP4_BLOCK == 0, f"FP4 in_features {in_features} is not a multiple of {FP4_BLOCK}"
    expected = (*weight.shape[:-1], in_features // FP4_BLOCK)
    assert tuple(scale.shape) == expected, (
        f"FP4 scale shape {tuple(scale.shape)} does not match weight {tuple(weight.shape)}: expected {expected}"
    )
    assert scale.dtype in (torch.float8_e8m0fnu, torch.uint8), f"FP4 scale must be e8m0, got {scale.dtype}"


def dequant_fp4(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., out, in/2] packed codes + e8m0 [..., out, in/32] -> [..., out, in] in `dtype`."""
    _check_fp4(weight, scale)
    values = fp4_decode(unpack_fp4(weight))
    return (values * e8m0_to_float(scale).repeat_interleave(FP4_BLOCK, dim=-1)).to(dtype)


def quant_fp4(w: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [..., out, in] -> (int8 packed [..., out, in/2], e8m0 [..., out, in/32]).

    Per 32 inputs: s = 2**ceil(log2(max(amax, 6 * 2**-126) / 6)), codes = e2m1(clamp(w / s, -6, 6)).
    `check=False`: the same bytes without the value checks (3 GPU syncs; a NaN weight is then not an error).
    """
    assert w.is_floating_point(), f"quant_fp4 needs a float tensor, got {w.dtype}"
    assert w.shape[-1] % FP4_BLOCK == 0, f"quant_fp4: last dim {w.shape[-1]} is not a multiple of {FP4_BLOCK}"
    blocks = w.to(work_dtype(w)).unflatten(-1, (-1, FP4_BLOCK))  # [..., in/32, 32]; float64 is not pre-rounded
    s = pow2_ceil_scale(blocks.abs().amax(-1).clamp(min=AMAX_FLOOR), E2M1_MAX)
    codes = fp4_encode((blocks / s.unsqueeze(-1)).clamp(-E2M1_MAX, E2M1_MAX), check).flatten(-2)
    return pack_fp4(codes, check), float_to_e8m0(s, check)


def fp4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """`dequant_fp4(*quant_fp4(w, check=False), w.dtype)` bit for bit (the QAT weight rounding, every FP4 linear
    every step), without the codes, the packing, the e8m0 bytes and the [out, in] scale copy: the scale s is the
    same fp32 power of two (e8m0 holds it exactly: s lies in [2**-126, 2**126] for an fp32 block), the values are
    `e2m1_round` of the same quotient (NaN to a signed zero, as the codes do), and the product is the same fp32
    product. A float64 w (whose scale may leave fp32's range) takes the composed path."""
    if work_dtype(w) != torch.float32:
        return dequant_fp4(*quant_fp4(w, check=False), w.dtype)
    assert w.shape[-1] % FP4_BLOCK == 0, f"fp4_roundtrip: last dim {w.shape[-1]} is not a multiple of {FP4_BLOCK}"
    blocks = w.float().unflatten(-1, (-1, FP4_BLOCK))
    s = pow2_ceil_scale(blocks.abs().amax(-1).clamp(min=AMAX_FLOOR), E2M1_MAX).unsqueeze(-1)
    return (e2m1_round(blocks / s, nan_to_zero=True) * s).flatten(-2).to(w.dtype)


def fp4_to_fp8(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-encode FP4 experts as standard 128x128-block FP8 (convert.py `--expert-dtype fp8`, spec §5.3).

    Per 128x128 tile the new exponent is the largest of the tile's fp4 exponents minus 6, so the largest
    value (6 * 2**6 = 384) still fits under 448. Each value becomes fp4 * 2**(e_old - e_new), exact in e4m3
    while e_old - e_new >= -8 (tile scales spanning at most 2**14); smaller ones underflow, rounding to even.
    """
    _check_fp4(weight, scale)
    out_f, in_f = weight.shape[-2], 2 * weight.shape[-1]
    e_old = scale.view(torch.uint8).to(torch.int32)  # [..., out, in/32]
    # Pad with byte 0 (the smallest exponent) so partial edge tiles take the max over their real scales only.
    sub = BLOCK // FP4_BLOCK
    padded = torch.nn.functional.pad(e_old, (0, -e_old.shape[-1] % sub, 0, -out_f % BLOCK))
    e_max = padded.unflatten(-1, (-1, sub)).unflatten(-3, (-1, BLOCK)).amax(dim=(-3, -1))  # [..., R, C]
    # A tile whose scales are all < 2**-121 keeps e_new = 0; its values then shrink by >= 2**0, never overflow.
    e_new = (e_max - 6).clamp(min=0)
    shift = e_old - expand_blocks(e_new, torch.Size((out_f, in_f // FP4_BLOCK)), BLOCK, sub)
    values = fp4_decode(unpack_fp4(weight)) * pow2(shift).repeat_interleave(FP4_BLOCK, dim=-1)  # |values| <= 384
    return values.to(torch.float8_e4m3fn), e_new.to(torch.uint8).view(torch.float8_e8m0fnu)
