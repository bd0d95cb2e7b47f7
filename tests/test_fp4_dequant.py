"""`ops.dequant_fp4_bf16` (FP4 e2m1 + e8m0 -> bf16 stacks, the MoE's per-call transient stacks): the twin equals
`quant.dequant_fp4` exactly (an e2m1 value times a power of two is a bf16 number), and the Triton kernel equals the
twin bit for bit (NaN where the scale byte is 255) in the interpreter on CPU, in an sm_90 compile, and on CUDA.
Exactness is the precision class here: no tolerance."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import interpreted_json

from dsv4 import ops
from dsv4.ops.registry import which
from dsv4.quant.fp4 import dequant_fp4


def _inputs(stack: tuple[int, ...], n: int, k: int, seed: int, fast_only: bool = False,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed codes (every byte value present) and e8m0 scales including bytes 0, 1, 254 and 255 (NaN): the
    kernel's tiles holding those take its exact bit construction, the others its table path. `fast_only`: every
    scale in the table path's range [2, 252], its two ends included (the extreme exponents it must not overflow)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (*stack, n, k // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    w.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    low, high, special = (2, 253, [2, 252, 127]) if fast_only else (100, 150, [0, 1, 127, 128, 254, 255])
    s = torch.randint(low, high, (*stack, n, k // 32), generator=gen, dtype=torch.int32).to(torch.uint8)
    s.view(-1)[:len(special)] = torch.tensor(special, dtype=torch.uint8)
    return w.view(torch.int8), s.view(torch.float8_e8m0fnu)


def test_twin_is_exact():
    """The bf16 stack's values are dequant_fp4's fp32 values (nothing rounded), NaN only under byte-255 scales."""
    w, s = _inputs((3,), 5, 64, 0)
    got = ops.dequant_fp4_bf16.twin(w, s)
    want = dequant_fp4(w, s, torch.float32)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 5, 64)
    assert torch.equal(got.float().nan_to_num(7.0), want.nan_to_num(7.0))
    assert got.isnan().sum().item() == 32                                     # one NaN block of 32


def test_dispatch_is_cuda_only():
    w, s = _inputs((2,), 4, 64, 1)
    assert which("dequant_fp4_bf16", w, s) == "twin"
    assert torch.equal(ops.dequant_fp4_bf16(w, s).nan_to_num(7.0), ops.dequant_fp4_bf16.twin(w, s).nan_to_num(7.0))


def test_wrapper_rejects_bad_inputs():
    kernel = pytest.importorskip("dsv4.ops.triton.fp4_dequant", reason="needs triton")
    w, s = _inputs((), 8, 64, 2)
    for args, message in [((w.float(), s), "weight int8/uint8"), ((w, s.view(torch.uint8).float()), "int8/uint8"),
                          ((w, s[:, :1]), "do not pair"), ((w[:, :8], s[:, :1]), "do not pair")]:
        with pytest.raises(ValueError, match=message):
            kernel.dequant_fp4_bf16(*args)


_CHECK = """
import json, torch
from test_fp4_dequant import _inputs
from dsv4 import ops
from dsv4.ops.triton.fp4_dequant import dequant_fp4_bf16
out = {}
# rows not a multiple of BLOCK_R, packed bytes not a multiple of BLOCK_B; a 2-D matrix and a 3-D stack (first row
# block: the exact construction, the rest: the table path); and a stack whose every tile takes the table path
for name, stack, n, k, fast in [("matrix", (), 19, 96, False), ("stack", (3,), 7, 640, False),
                                ("table_path", (2,), 20, 1024, True)]:
    w, s = _inputs(stack, n, k, 3, fast)
    got, want = dequant_fp4_bf16(w, s), ops.dequant_fp4_bf16.twin(w, s)
    out[name] = {"shape": list(got.shape) == list(want.shape), "dtype": str(got.dtype),
                 "nan_same": bool(torch.equal(got.isnan(), want.isnan())),
                 "bits_same": bool(torch.equal(got.nan_to_num(7.0).view(torch.int16),
                                               want.nan_to_num(7.0).view(torch.int16)))}
print(json.dumps(out))
"""


def test_kernel_in_the_interpreter(tmp_path):
    """Bit for bit the twin: every code byte, scale bytes 0 (the subnormal 2^-127), 1, 254 and 255 (NaN), ragged
    edges in both dimensions (the interpreter stores fp32 -> bf16 by truncation: exact values are unaffected), and
    the table path alone at its range's ends (scale bytes 2 and 252)."""
    pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernel here)")
    # (the interpreter helper puts tests/ on the script's path itself; this test once rewrote the process's
    # PYTHONPATH for every test after it)
    result = interpreted_json(_CHECK, tmp_path)
    for name, r in result.items():
        assert r == {"shape": True, "dtype": "torch.bfloat16", "nan_same": True, "bits_same": True}, (name, r)


def test_kernel_compiles_for_hopper_without_a_gpu():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    from dsv4.ops.triton.fp4_dequant import BLOCK_B, BLOCK_R, _dequant_fp4

    sig = {"w_ptr": "*i8", "s_ptr": "*u8", "base_ptr": "*i32", "nz_ptr": "*i32", "out_ptr": "*i32", "R": "i32",
           "KB": "i32",
           "BLOCK_R": "constexpr", "BLOCK_B": "constexpr"}
    kernel = triton.compile(ASTSource(_dequant_fp4, sig, constexprs={"BLOCK_R": BLOCK_R, "BLOCK_B": BLOCK_B}),
                            target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"]


@pytest.mark.gpu
def test_kernel_on_cuda_at_a_flash_expert_stack():
    """8 experts of Flash's w1 (2048 x 4096): dispatched to the kernel, bit for bit the twin (both paths; then the
    table path alone at its range's ends)."""
    for fast in (False, True):
        w, s = (t.cuda() for t in _inputs((8,), 2048, 4096, 4, fast))
        assert which("dequant_fp4_bf16", w, s) == "triton_dequant_fp4"
        got, want = ops.dequant_fp4_bf16(w, s), ops.dequant_fp4_bf16.twin(w, s)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(7.0).view(torch.int16), want.nan_to_num(7.0).view(torch.int16)), fast
