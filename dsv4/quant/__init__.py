"""Quantised number formats (FP8 e4m3, FP4 e2m1, e8m0 scales), activation fake-quant and Hadamard rotation.

Pure PyTorch, device-agnostic and autograd-free; every cast here is tested bit-exact in tests/test_quant.py.
"""

from dsv4.quant.act import act_quant, fake_quant_fp4, fake_quant_fp8
from dsv4.quant.e8m0 import e8m0_to_float, float_to_e8m0, pow2_ceil_scale
from dsv4.quant.fp4 import (
    E2M1_VALUES,
    dequant_fp4,
    fp4_decode,
    fp4_encode,
    fp4_roundtrip,
    fp4_to_fp8,
    pack_fp4,
    quant_fp4,
    unpack_fp4,
)
from dsv4.quant.fp8 import dequant_fp8, quant_fp8
from dsv4.quant.hadamard import hadamard

__all__ = [
    "E2M1_VALUES",
    "act_quant",
    "dequant_fp4",
    "dequant_fp8",
    "e8m0_to_float",
    "fake_quant_fp4",
    "fake_quant_fp8",
    "float_to_e8m0",
    "fp4_decode",
    "fp4_encode",
    "fp4_roundtrip",
    "fp4_to_fp8",
    "hadamard",
    "pack_fp4",
    "pow2_ceil_scale",
    "quant_fp4",
    "quant_fp8",
    "unpack_fp4",
]
