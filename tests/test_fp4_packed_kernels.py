"""FP4 kernels with the packed decode (`ops/triton/fp4_decode.py`) as an option, default off until measured.

Tolerances by precision class: the packed pair GEMV runs the default decode's arithmetic on values scaled by the
exact power of two 2^-14 and restores it once per 32 elements, so it must equal the default kernel BIT FOR BIT
(no product comes near fp32's subnormal range here); against the float64 twin both are fp32 sums of exact
products in another order: relative error (Frobenius) <= 1e-5, the FP4 kernels' budget.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import in_interpreter_at_once

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
    for kw in ({'block_g': 4}, {'block_n': 8}):
        base = fp4_pair_gemv(x, ids, w, s, **kw)
        got = fp4_pair_gemv(x, ids, w, s, packed='twin', **kw)
        equal &= torch.equal(got, base)
        errs.append(((got - want).norm() / want.norm()).item())
print(equal, max(errs))
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Both interpreter checks of this file, run at once (one core each: 9 s, not 13)."""
    scripts = {"gemv": _GEMV_CHECK, "prefill": _PREFILL_CHECK}
    with in_interpreter_at_once(scripts, tmp_path_factory.mktemp("fp4_packed"), timeout=300) as runs:
        yield runs


def test_packed_pair_gemv_twin_in_the_interpreter(interpreted):
    """packed='twin' (the packed arithmetic in plain Triton), over quantised weights and
    random bytes (every code, -0 included), N = 40 not a multiple of block_n, block_g cut to K/32:
    equal to the default decode bit for bit, and within 1e-5 of the twin."""
    out = interpreted["gemv"].result().split()
    assert out[-2] == "True" and float(out[-1]) <= 1e-5, out


def test_packed_pair_gemv_names_bad_options():
    x, ids = torch.zeros(2, 64), torch.zeros(2, dtype=torch.long)
    w, s = torch.zeros(1, 8, 32, dtype=torch.int8), torch.zeros(1, 8, 2, dtype=torch.uint8)
    for kw, words in (({"packed": True}, "CUDA only"), ({"packed": "yes"}, "packed must be"),
                      ({"block_n": 12}, "powers of two")):
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
    """The inline-PTX path assembles for sm_90 at Flash's w1/w3 shape (bf16 x), with the packed placement in its
    PTX; only a GPU can run it (test below)."""
    sig = {"x_ptr": "*bf16", "ids_ptr": "*i64", "w_ptr": "*i32", "s_ptr": "*u8", "out_ptr": "*fp32", "N": "i32",
           "K": "i32"}
    consts = {"WORDS": 512, "N_SCALES": 128, "BLOCK_N": 16, "BLOCK_G": 32, "HALF2": True, "ASM": True, "TILED": False}
    kernel = _compile_for_hopper(gemv._fp4_pair_gemv, sig, consts, 4)
    assert kernel.asm["cubin"] and "0x0E000E00" in kernel.asm["ptx"]


@pytest.mark.gpu
def test_packed_pair_gemv_on_cuda_at_flash_dims():
    """Flash w1/w3 (K 4096 -> N 2048) over 8 experts, 12 pairs of FP8-quantised bf16 x: the inline PTX equals the
    default decode bit for bit and is within 1e-5 of the twin."""
    gen = torch.Generator().manual_seed(41)
    pairs = [quant_fp4(torch.randn(2048, 4096, generator=gen) / 64) for _ in range(8)]
    w, s = torch.stack([a for a, _ in pairs]).cuda(), torch.stack([b for _, b in pairs]).cuda()
    x = fake_quant_fp8(torch.randn(12, 4096, generator=gen), 128).bfloat16().cuda()
    ids = torch.randint(0, 8, (12,), generator=gen).cuda()
    got = gemv.fp4_pair_gemv(x, ids, w, s, packed=True)
    assert torch.equal(got, gemv.fp4_pair_gemv(x, ids, w, s))
    want = ops.pair_linear.twin(x.cpu(), ids.cpu(), w.cpu(), s.cpu(), "fp4")
    assert ((got.cpu().double() - want.double()).norm() / want.double().norm()).item() <= 1e-5


# ------------------------------------------------------------------------- expert-major grouped GEMM, fp16 dots
prefill = pytest.importorskip("dsv4.ops.triton.fp4_grouped_prefill", reason="needs triton")

_PREFILL_CHECK = """
import torch
from dsv4 import ops
from dsv4.ops.triton.fp4_grouped_prefill import fp4_grouped_gemm_prefill
from dsv4.quant import fake_quant_fp8, quant_fp4

def gemm(*args, **kw):
    return fp4_grouped_gemm_prefill(*args, packed='twin', **kw)

def rel(got, want):
    return ((got - want).norm() / want.norm()).item()

gen = torch.Generator().manual_seed(42)
ws = [quant_fp4(torch.randn(80, 256, generator=gen) / 16) for _ in range(8)]
w, s = torch.stack([a for a, _ in ws]), torch.stack([b for _, b in ws])
eid = torch.tensor([1] * 3 + [3] + [4] * 70 + [6] * 9)          # empty experts, several row tiles, partial tiles
# FP8-grid x over 12 binades of 128-block scales (the MoE's input): exact in fp16 after the per-block power of two
x = fake_quant_fp8(torch.randn(83, 256, generator=gen) * torch.logspace(-6, 6, 256)[None], 128)
want = ops.grouped_linear.twin(x, eid, w, s, 'fp4')
errs = [rel(gemm(x, eid, w, s, block_m=32, block_n=32), want), rel(gemm(x, eid.int(), w, s), want),
        rel(gemm(x, eid, w, s, block_m=16, block_n=128), want)]
# random bytes (every code); scales within 24 binades per 128 block (fp16 path) or, for expert 4, one group per
# block 40 binades below the others (its programs fall back to the default decode)
wr = torch.randint(-128, 128, w.shape, dtype=torch.int8, generator=gen)
narrow = torch.randint(110, 134, s.shape, dtype=torch.uint8, generator=gen)
wide = narrow.clone()
wide[4, :, 1::4] = 80
for sb in (narrow, wide):
    errs.append(rel(gemm(x, eid, wr, sb.view(s.dtype), block_m=32, block_n=32),
                    ops.grouped_linear.twin(x, eid, wr, sb.view(s.dtype), 'fp4')))
# decoding, exactly: one-hot rows read back every code under scale bytes spanning 0 .. 160 (fallback) and 120 .. 126
codes = torch.arange(16 * 128 * 8, dtype=torch.int32).view(16, 128, 8) % 16
wq = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8).view(torch.int8).view(1, 16, 4 * 128)
eye, exact = torch.eye(1024)[:128], True
for pattern in ([0, 1, 100, 127, 140, 160], [120, 126, 123, 121, 125]):
    sq = torch.tensor(pattern, dtype=torch.uint8)[torch.arange(16 * 32).view(1, 16, 32) % len(pattern)]
    sq = sq.view(torch.float8_e8m0fnu)
    got = torch.cat([gemm(eye.roll(128 * i, 1), torch.zeros(128, dtype=torch.long), wq, sq) for i in range(8)])
    exact &= torch.equal(got, ops.dequant_weight(wq[0], sq[0], 'fp4').T)
# a NaN scale in expert 3 (fast path: its block's other scales are near 255) and in expert 4 (fallback)
for e, others in ((3, 250), (4, 127)):
    sn = s.clone().view(torch.uint8)
    sn[e, 7, 0:4] = others
    sn[e, 7, 2] = 255
    nan = gemm(x, eid, w, sn.view(s.dtype), block_m=32, block_n=32).isnan()
    exact &= torch.equal(nan, ops.grouped_linear.twin(x, eid, w, sn.view(s.dtype), 'fp4').isnan())
    exact &= nan.sum().item() == (eid == e).sum().item()
print(exact, *errs)
"""


def test_packed_grouped_prefill_twin_in_the_interpreter(interpreted):
    """packed='twin' (fp16 dots over the packed decode, in plain Triton) through the interpreter, fp32 x on the
    FP8 grid: within 1e-5 of the twin over empty experts, row tiles spanning experts, partial tiles, random codes,
    the fp16 path and the default-decode fallback (scales 40 binades apart); every code decoded exactly under
    scale bytes that take either path; NaN scales give NaN exactly where the twin does."""
    out = interpreted["prefill"].result().split()
    exact, *errs = out[-6:]
    assert exact == "True" and max(float(v) for v in errs) <= 1e-5, out


def test_packed_grouped_prefill_compiles_for_hopper_without_a_gpu():
    """The inline-PTX fp16-dot path assembles for sm_90 at Flash's shape with the measured tiles (64 x 64 and
    128 x 128, 8 warps, 3 stages) and at the decode tile (16 x 64); only a GPU can run it (test below)."""
    sig = {"x_ptr": "*bf16", "xh_ptr": "*fp16", "xs_ptr": "*fp32", "offs_ptr": "*i32", "w_ptr": "*i8",
           "s_ptr": "*u8", "out_ptr": "*fp32", "N": "i32", "K": "i32"}
    for bm, bn in ((64, 64), (128, 128), (16, 64)):
        consts = {"HALF": 2048, "N_SCALES": 128, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_B": 64, "IEEE": False,
                  "GROUP_SCALES": True, "JOIN": True, "PACKED": True, "ASM": True, "TILED": False}
        kernel = _compile_for_hopper(prefill._fp4_grouped_prefill, sig, consts, 8)
        assert kernel.asm["cubin"] and "mul.rn.f16x2" in kernel.asm["ptx"], (bm, bn)


def test_packed_grouped_prefill_names_bad_options():
    w, s = torch.zeros(3, 16, 64, dtype=torch.int8), torch.zeros(3, 16, 4, dtype=torch.uint8)
    x, eid = torch.zeros(5, 128), torch.zeros(5, dtype=torch.long)
    for kw in ({"packed": True}, {"packed": "twin", "block_k": 64}, {"packed": 2}):         # K / 128 = 1: fine
        with pytest.raises(ValueError, match="packed must be"):
            prefill.fp4_grouped_gemm_prefill(x, eid, w, s, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [384, 6144])
def test_packed_grouped_prefill_on_cuda_at_flash_dims(rows):
    """Flash w1/w3 (K 4096 -> N 2048, 256 experts) at decode batch 64 (384 pairs) and 1k prefill (6144): bf16 x
    on the FP8 grid as the MoE feeds it; the inline PTX equals the 'twin' variant bit for bit (same arithmetic,
    decode in PTX) and is within 1e-5 of the twin and of the default kernel."""
    dev, gen = "cuda", torch.Generator("cuda").manual_seed(43)
    pairs = [quant_fp4(torch.randn(2048, 4096, generator=gen, device=dev) / 64) for _ in range(256)]
    w, s = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    eid = torch.rand(rows // 6, 256, generator=gen, device=dev).topk(6, dim=-1).indices.flatten().sort().values
    x = fake_quant_fp8(torch.randn(rows, 4096, generator=gen, device=dev), 128).bfloat16()
    tile = {"block_m": 16} if rows < 1000 else {}
    got = prefill.fp4_grouped_gemm_prefill(x, eid, w, s, packed=True, **tile)
    assert torch.equal(got, prefill.fp4_grouped_gemm_prefill(x, eid, w, s, packed="twin", **tile))

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert rel(got, ops.grouped_linear.twin(x, eid, w, s, "fp4")) <= 1e-5
    assert rel(got, prefill.fp4_grouped_gemm_prefill(x, eid, w, s)) <= 1e-5


def test_fp16_blocks_are_exact_on_the_fp8_grid():
    """x on the FP8 grid per 128 block (block scales over 2^-100 .. 2^100, e4m3 subnormals, zero blocks) splits
    exactly into fp16 x / s times the power of two s; off the grid it rounds (what the docstring says)."""
    gen = torch.Generator().manual_seed(44)
    x = torch.randn(16, 1024, generator=gen) * 2.0 ** torch.randint(-100, 100, (16, 8, 1), generator=gen).repeat(
        1, 1, 128).view(16, 1024).float()
    x[0, :128] = 0
    x[1, :128] = torch.linspace(-1, 1, 128) * 2.0**-7                            # e4m3 subnormals beside 448
    x[1, 0] = 448.0
    x = fake_quant_fp8(x, 128)
    xh, s = prefill.fp16_blocks(x)
    assert xh.dtype == torch.float16 and s.shape == (16, 8)
    assert torch.equal(xh.float().view(16, 8, 128) * s[..., None], x.view(16, 8, 128))
    assert torch.equal(s, 2.0 ** torch.floor(torch.log2(s)))                   # powers of two
    y = torch.randn(4, 128, generator=gen)
    yh, t = prefill.fp16_blocks(y)
    assert not torch.equal(yh.float() * t[:, :, None].view(4, 1), y)


def test_packed_decode_is_opt_in_through_the_environment(monkeypatch):
    """The pair GEMV, and the expert-major kernel from 16 rows per expert, get packed=False unless
    DSV4_FP4_PACKED=1 (the default is the measured kernel); the expert-major kernel's small groups (decode batches)
    get packed=True whatever the switch (measured faster: `_PACKED_BELOW`); other values raise. Spies stand in for
    the kernels (CPU)."""
    import importlib

    grouped_linear = importlib.import_module("dsv4.ops.grouped_linear")     # (dsv4.ops.grouped_linear: the op)
    moe_pairs = importlib.import_module("dsv4.ops.moe_pairs")
    seen = []
    spy = lambda *args, **kw: seen.append(kw["packed"]) or torch.zeros(args[0].shape[0], args[2].shape[1])  # noqa: E731
    monkeypatch.setattr(gemv, "fp4_pair_gemv", spy)
    monkeypatch.setattr(prefill, "fp4_grouped_gemm_prefill", spy)
    w, s = torch.zeros(1, 8, 64, dtype=torch.int8), torch.zeros(1, 8, 4, dtype=torch.uint8)
    small, large = (torch.zeros(n, 128) for n in (15, 16))                  # rows per expert (one expert)
    ids = torch.zeros(16, dtype=torch.long)
    monkeypatch.setenv("DSV4_FP4_SWAPPED", "0")     # below 96 rows per expert the swapped kernel runs by default
    for env, want in ((None, False), ("0", False), ("1", True)):
        if env is None:
            monkeypatch.delenv("DSV4_FP4_PACKED", raising=False)
        else:
            monkeypatch.setenv("DSV4_FP4_PACKED", env)
        moe_pairs._fp4_pair_gemv(small, ids[:15], w, s)
        grouped_linear._fp4_grouped_gemm_prefill(large, ids, w, s, False)
        grouped_linear._fp4_grouped_gemm_prefill(small, ids[:15], w, s, False)
        assert seen[-3:] == [want, want, True], env
    monkeypatch.setenv("DSV4_FP4_PACKED", "yes")
    with pytest.raises(ValueError, match="DSV4_FP4_PACKED"):
        moe_pairs._fp4_pair_gemv(small, ids[:15], w, s)
