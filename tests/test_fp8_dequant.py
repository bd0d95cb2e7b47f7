"""The FP8 e4m3 + 128x128 e8m0 -> bf16 decode kernel (`ops/triton/fp8_dequant.py`: wo_a's transient decode for
prefill-sized calls) against its twin (`ops.block_diag_linear.decode_bf16_twin`, itself checked against
`dequant_weight(...).bfloat16()` in tests/test_block_diag_linear.py) bit for bit: in the interpreter on CPU, in an
sm_90 compile, and on CUDA. Exactness is the precision class here: no tolerance."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import interpreted_json

from dsv4 import ops


def _inputs(n: int, k: int, seed: int, scales: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every e4m3 code in every 32 x 128 tile (then random codes), and the given scale bytes in order (then random
    ones from the checkpoint's range)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    tile = w[:32, :128]
    tile.copy_(torch.arange(256, dtype=torch.uint8).repeat(16)[: tile.numel()].view(tile.shape))
    s = torch.randint(100, 140, (-(-n // 128), -(-k // 128)), generator=gen, dtype=torch.int32).to(torch.uint8)
    if scales:
        s.view(-1)[: len(scales)] = torch.tensor(scales, dtype=torch.uint8)
    return w.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu)


def _all_tiles(n: int, k: int) -> torch.Tensor:
    """Codes 0..255 in every 32 x 128 tile: each tile's 4096 bytes are arange(256) 16 times."""
    return torch.arange(256, dtype=torch.uint8).repeat(n * k // 256).view(n, k)


_CHECK = """
import json, torch
from test_fp8_dequant import _all_tiles, _inputs
from dsv4 import ops
from dsv4.ops.triton.fp8_dequant import dequant_fp8_bf16

def same(w, s):      # the definition (the twin needs whole 128-blocks; it equals this, tested on its own)
    got, want = dequant_fp8_bf16(w, s), ops.dequant_weight(w, s, "fp8").bfloat16()
    return {"dtype": str(got.dtype), "shape": list(got.shape) == list(want.shape),
            "nan_same": bool(torch.equal(got.isnan(), want.isnan())),
            "bits_same": bool(torch.equal(got.nan_to_num(7.0).view(torch.int16),
                                          want.nan_to_num(7.0).view(torch.int16)))}

out = {}
# every code under every scale byte (0: the subnormal 2^-127 .. 254, and 255: NaN): 16 x 16 scale blocks
w = _all_tiles(16 * 128, 16 * 128).view(torch.float8_e4m3fn)
s = torch.arange(256, dtype=torch.uint8).view(16, 16).view(torch.float8_e8m0fnu)
out["every_code_every_scale"] = same(w, s)
out["ragged"] = same(*_inputs(200, 300, 1, [0, 9, 247, 255, 127, 10]))
print(json.dumps(out))
"""


def test_twin_matches_its_definition_under_every_scale_byte():
    """The twin (torch ops) against `dequant_weight(...).bfloat16()` for every code under every scale byte: the
    kernel's bits are compared with the twin's, so the twin must be the definition's bits."""
    from dsv4.ops.block_diag_linear import decode_bf16_twin

    w = _all_tiles(16 * 128, 16 * 128).view(torch.float8_e4m3fn)
    s = torch.arange(256, dtype=torch.uint8).view(16, 16).view(torch.float8_e8m0fnu)
    got, want = decode_bf16_twin(w, s), ops.dequant_weight(w, s, "fp8").bfloat16()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(7.0).view(torch.int16), want.nan_to_num(7.0).view(torch.int16))
    assert got.isinf().any() and (got != 0).logical_and(got.abs() < 2.0 ** -126).any()    # both ends reached


def test_kernel_in_the_interpreter(tmp_path):
    """Bit for bit the twin: every code under every scale byte (the fast path's [10, 246] and the general
    construction outside it: bf16 subnormals rounded to nearest even, overflow to inf, byte 255 NaN), and ragged
    edges in both dimensions."""
    pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernel here)")
    result = interpreted_json(_CHECK, tmp_path)
    for name, r in result.items():
        assert r == {"dtype": "torch.bfloat16", "shape": True, "nan_same": True, "bits_same": True}, (name, r)


def test_wrapper_rejects_bad_inputs():
    kernel = pytest.importorskip("dsv4.ops.triton.fp8_dequant", reason="needs triton")
    w, s = _inputs(256, 256, 2)
    for args, message in [((w.float(), s), "float8_e4m3fn/uint8"), ((w[0], s), r"weight \[N, K\]"),
                          ((w, s[:1]), "scale"), ((w, s.view(torch.uint8).float()), "scale")]:
        with pytest.raises(ValueError, match=message):
            kernel.dequant_fp8_bf16(*args)


def test_kernel_compiles_for_hopper_without_a_gpu():
    """sm_90, with the divisibility Triton's launcher sees for real weights (K = 4096): 16-byte weight loads and
    stores, and the fast path's hardware e4m3 conversion (the integer construction alone was ALU-bound)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    from dsv4.ops.triton.fp8_dequant import BLOCK_C, BLOCK_R, _dequant_fp8

    sig = {"w_ptr": "*u8", "s_ptr": "*u8", "out_ptr": "*i16", "N": "i32", "K": "i32", "KS": "i32",
           "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}           # pointers, N and K
    kernel = triton.compile(ASTSource(_dequant_fp8, sig, constexprs={"BLOCK_R": BLOCK_R, "BLOCK_C": BLOCK_C},
                                      attrs=attrs), target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"]
    ptx = kernel.asm["ptx"]
    assert set(re.findall(r"st\.global\S*", ptx)) == {"st.global.v4.b32"}
    assert "ld.global.v4.b32" in ptx and "e4m3x2" in ptx


@pytest.mark.gpu
def test_kernel_on_cuda_at_flash_wo_a():
    """Flash's wo_a (8 x 1024 rows, 4096 columns), its scales from the checkpoint's range with the extreme bytes in
    the first blocks; then every code under every scale byte: bit for bit the twin, run on the GPU too."""
    from dsv4.ops.block_diag_linear import decode_bf16, decode_bf16_twin

    w, s = _inputs(8192, 4096, 3, [0, 1, 9, 10, 246, 247, 254, 255])
    cases = [(w, s), (_all_tiles(16 * 128, 16 * 128).view(torch.float8_e4m3fn),
                      torch.arange(256, dtype=torch.uint8).view(16, 16).view(torch.float8_e8m0fnu))]
    for w, s in cases:
        w, s = w.cuda(), s.cuda()
        got, want = decode_bf16(w, s), decode_bf16_twin(w, s)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(7.0).view(torch.int16), want.nan_to_num(7.0).view(torch.int16))
