"""Packed FP4 decode helpers (`ops/triton/fp4_decode.py`): the bit-placement formulas, exhaustively in plain torch;
the pure-Triton twins in the interpreter; the inline-PTX versions compiled for sm_90 (no GPU needed) and, on a GPU,
against the twins. All checks are bit-exact (values and the sign of zero): decoding is a cast, no rounding."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import run_in_interpreter

from dsv4.quant import E2M1_VALUES

decode = pytest.importorskip("dsv4.ops.triton.fp4_decode", reason="needs triton")


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.equal(got.double(), want.double()) and torch.equal(got.signbit(), want.signbit())


def _all_pairs_words(extra: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 words whose nibbles j and j + 4 take every pair of codes for every j, plus random words; and the
    codes [n, 8] (element J in nibble J)."""
    a, b = torch.arange(16).repeat_interleave(16), torch.arange(16).repeat(16)            # 256 pairs
    codes = torch.randint(0, 16, (256, 8), generator=torch.Generator().manual_seed(seed))
    codes = torch.cat([codes.clone() for _ in range(4)])
    for j in range(4):
        codes[256 * j:256 * (j + 1), j], codes[256 * j:256 * (j + 1), j + 4] = a, b
    codes = torch.cat([codes, torch.randint(0, 16, (extra, 8), generator=torch.Generator().manual_seed(seed + 1))])
    words = (codes << (4 * torch.arange(8))).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32), codes


def test_bit_placement_formulas_are_exact_for_every_code():
    """The module docstring's formulas on uint32 words (int64 here), every code pair in every nibble position,
    other nibbles random (they must not leak): fp16x2 halves = value * 2^-14, e4m3 bytes = value * 2^-6."""
    words, codes = _all_pairs_words()
    w = words.to(torch.int64) & 0xFFFFFFFF
    values = E2M1_VALUES[codes]                                                          # [n, 8]
    for j in range(4):
        mag = (w << (9 - 4 * j)) if j < 3 else (w >> 3)
        sign = (w << (12 - 4 * j)) if j < 3 else w
        half2 = ((mag & 0x0E000E00) | (sign & 0x80008000)).to(torch.int32)
        halves = half2.view(torch.float16).view(-1, 2)                                     # little-endian
        assert _same(halves[:, 0], values[:, j] * decode.F16_BIAS), j
        assert _same(halves[:, 1], values[:, j + 4] * decode.F16_BIAS), j
    lo = ((w << 2) & 0x1C1C1C1C) | ((w << 4) & 0x80808080)
    hi = ((w >> 2) & 0x1C1C1C1C) | (w & 0x80808080)
    for nibbles, start in ((lo, 0), (hi, 1)):
        e4m3 = nibbles.to(torch.int32).view(torch.float8_e4m3fn).view(-1, 4)            # byte i = element 2i + start
        assert _same(e4m3.float(), values[:, start::2] * decode.E4M3_BIAS), start


_CHECK = """
import torch
from dsv4.ops.triton.fp4_decode import decode_probe
words = torch.tensor({words}, dtype=torch.int32)
for t in decode_probe(words, packed=False):
    print(' '.join(str(v) for v in t.view(torch.int8 if t.element_size() == 1 else
                                            torch.int16 if t.element_size() == 2 else torch.int32).flatten().tolist()))
"""


def _want(codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`decode_probe`'s outputs for these codes: f32 and pair in element order, f16 / f16mul / e4m3 low nibbles
    then high nibbles (f16mul: times 2^((i + c % 4) % 16 - 8) for word i, column c; pair: byte j's factor for
    elements 2j, 2j + 1: exact, no product leaves fp16)."""
    values, perm = E2M1_VALUES[codes], [0, 2, 4, 6, 1, 3, 5, 7]
    i, c = torch.arange(len(codes))[:, None], torch.arange(8)[None, :]
    factor = 2.0 ** ((i + c % 4) % 16 - 8)
    return (values * decode.F16_BIAS, (values[:, perm] * decode.F16_BIAS).half(),
            (values[:, perm] * decode.F16_BIAS * factor).half(),
            (values * decode.F16_BIAS * factor[:, [0, 0, 1, 1, 2, 2, 3, 3]]).half(),  # pair: byte e // 2's factor
            (values[:, perm] * decode.E4M3_BIAS).to(torch.float8_e4m3fn))


def test_twins_in_the_interpreter(tmp_path):
    """The pure-Triton twins through TRITON_INTERPRET=1 over every code pair in every position: bit-exact."""
    words, codes = _all_pairs_words(extra=0)
    out = run_in_interpreter(_CHECK.format(words=words.tolist()), tmp_path, timeout=120).splitlines()[-5:]
    for line, want in zip(out, _want(codes), strict=True):
        bits = torch.tensor([int(v) for v in line.split()])
        view = {1: torch.int8, 2: torch.int16, 4: torch.int32}[want.element_size()]
        assert torch.equal(bits, want.view(view).flatten().long()), want.dtype


def test_packed_helpers_compile_for_hopper_without_a_gpu():
    """The inline PTX assembles for sm_90 (ptxas checks it; only a GPU can run it): the probe kernel with
    PACKED=True, whose PTX must hold the packed placement (not the twin's per-element code)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    sig = {"w_ptr": "*i32", "f32_ptr": "*fp32", "f16_ptr": "*fp16", "f16mul_ptr": "*fp16", "pair_ptr": "*fp16",
           "e4m3_ptr": "*fp8e4nv", "N_WORDS": "constexpr", "PACKED": "constexpr"}
    kernel = triton.compile(ASTSource(decode._decode_probe, sig, constexprs={"N_WORDS": 128, "PACKED": True}),
                            target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"]
    ptx = kernel.asm["ptx"]
    assert "0x0E000E00" in ptx and "prmt.b32" in ptx and "mul.rn.f16x2" in ptx and "0x1C1C1C1C" in ptx


@pytest.mark.gpu
def test_packed_helpers_equal_the_twins_on_cuda():
    """On the GPU: the inline PTX decodes every code pair in every position bit-identically to the twins (and to
    the e2m1 values times the biases); 1024 extra random words."""
    words, codes = _all_pairs_words(extra=1024)
    words, codes = words[:2048].cuda(), codes[:2048]
    packed, twin = decode.decode_probe(words, packed=True), decode.decode_probe(words, packed=False)
    for got, ref, want in zip(packed, twin, _want(codes), strict=True):
        assert _same(got.cpu().float(), ref.cpu().float()) and _same(got.cpu().float(), want.float()), want.dtype
