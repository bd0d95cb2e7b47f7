"""FP4 kernels with the packed decode (`ops/triton/fp4_decode.py`) as an option, default off until measured.

Tolerances by precision class: the packed pair GEMV runs the default decode's arithmetic on values scaled by the
exact power of two 2^-14 and restores it once per 32 elements, so it must equal the default kernel BIT FOR BIT
(no product comes near fp32's subnormal range here); against the float64 twin both are fp32 sums of exact
products in another order: relative error (Frobenius) <= 1e-5, the FP4 kernels' budget.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import run_in_interpreter

from dsv4 import ops
from dsv4.quant import fake_quant_fp8, quant_fp4

gemv = pytest.importorskip("dsv4.ops.triton.fp4_gemv", reason="needs triton")

_GEMV_CHECK = """
import torch
from dsv4 import ops
from dsv4.ops.triton.fp4_gemv import fp4_pair_gemv
from dsv4.quant import quant_fp4
gen = torch.Generator().manual_seed(40)
ws = [quant_fp4(torch.randn(40, 256, generator=gen) / 16) for _ in range(3)]
w, s = torch.stack([a for a, _ in ws]), torch.stack([b for _, b in ws])
x, ids = torch.randn(4, 256, generator=gen), torch.tensor([2, 0, 2, 1])
equal, errs = True, []
for w, s in [(w, s), (torch.randint(-128, 128, w.shape, dtype=torch.int8, generator=gen),
                      torch.randint(100, 140, s.shape, dtype=torch.uint8, generator=gen).view(s.dtype))]:
    want = ops.pair_linear.twin(x, ids, w, s, 'fp4')
    for kw in ({'block_g': 4}, {'block_n': 8}, {'block_g': 4, 'prefetch': True}):
        base = fp4_pair_gemv(x, ids, w, s, **kw)
        for x_lanes in (False, True):
            got = fp4_pair_gemv(x, ids, w, s, packed='twin', x_lanes=x_lanes, **kw)
            equal &= torch.equal(got, base)
            errs.append(((got - want).norm() / want.norm()).item())
print(equal, max(errs))
"""


def test_packed_pair_gemv_twin_in_the_interpreter(tmp_path):
    """packed='twin' (the packed arithmetic in plain Triton), with and without x_lanes, over quantised weights and
    random bytes (every code, -0 included), N = 40 not a multiple of block_n, block_g cut to K/32, prefetch on and
    off: equal to the default decode bit for bit, and within 1e-5 of the twin."""
    out = run_in_interpreter(_GEMV_CHECK, tmp_path, timeout=300).split()
    assert out[-2] == "True" and float(out[-1]) <= 1e-5, out


def test_packed_pair_gemv_names_bad_options():
    x, ids = torch.zeros(2, 64), torch.zeros(2, dtype=torch.long)
    w, s = torch.zeros(1, 8, 32, dtype=torch.int8), torch.zeros(1, 8, 2, dtype=torch.uint8)
    for kw, words in (({"packed": True}, "CUDA only"), ({"packed": "yes"}, "packed must be"),
                      ({"x_lanes": True}, "x_lanes needs")):
        with pytest.raises(ValueError, match=words):
            gemv.fp4_pair_gemv(x, ids, w, s, **kw)


def _compile_for_hopper(fn, sig: dict, consts: dict, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(sig))}
    return triton.compile(ASTSource(fn, {**sig, **dict.fromkeys(consts, "constexpr")}, consts, attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def test_packed_pair_gemv_compiles_for_hopper_without_a_gpu():
    """The inline-PTX path assembles for sm_90 at Flash's w1/w3 shape (bf16 x, and fp32 x with x_lanes), with
    the packed placement in its PTX; only a GPU can run it (test below)."""
    for x_lanes in (False, True):
        sig = {"x_ptr": "*fp32" if x_lanes else "*bf16", "ids_ptr": "*i64", "w_ptr": "*i32", "s_ptr": "*u8",
               "out_ptr": "*fp32", "N": "i32", "K": "i32"}
        consts = {"WORDS": 512, "N_SCALES": 128, "BLOCK_N": 16, "BLOCK_G": 32, "PREFETCH": False, "HALF2": True,
                  "ASM": True, "X_LANES": x_lanes}
        kernel = _compile_for_hopper(gemv._fp4_pair_gemv, sig, consts, 4)
        assert kernel.asm["cubin"] and "0x0E000E00" in kernel.asm["ptx"], x_lanes


@pytest.mark.gpu
@pytest.mark.parametrize("x_lanes", [False, True])
def test_packed_pair_gemv_on_cuda_at_flash_dims(x_lanes):
    """Flash w1/w3 (K 4096 -> N 2048) over 8 experts, 12 pairs of FP8-quantised bf16 x: the inline PTX equals the
    default decode bit for bit and is within 1e-5 of the twin."""
    gen = torch.Generator().manual_seed(41)
    pairs = [quant_fp4(torch.randn(2048, 4096, generator=gen) / 64) for _ in range(8)]
    w, s = torch.stack([a for a, _ in pairs]).cuda(), torch.stack([b for _, b in pairs]).cuda()
    x = fake_quant_fp8(torch.randn(12, 4096, generator=gen), 128).bfloat16().cuda()
    ids = torch.randint(0, 8, (12,), generator=gen).cuda()
    got = gemv.fp4_pair_gemv(x, ids, w, s, packed=True, x_lanes=x_lanes)
    assert torch.equal(got, gemv.fp4_pair_gemv(x, ids, w, s))
    want = ops.pair_linear.twin(x.cpu(), ids.cpu(), w.cpu(), s.cpu(), "fp4")
    assert ((got.cpu().double() - want.double()).norm() / want.double().norm()).item() <= 1e-5
