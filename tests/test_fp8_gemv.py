"""The FP8 block-scaled GEMV (`ops/triton/fp8_gemv.py`) against its twin `ops.ref.linear` and float64.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported: one
subprocess runs every check and reports JSON). The tl.dot path is checked with fp32 x only: triton 3.6's
interpreter computes bf16 tl.dot wrongly; the broadcast path is checked with bf16 x as well.

Tolerances by precision class:
* e4m3 decode, fused act quant: bit-exact (casts). The act quant is seen through an identity weight, whose
  product adds exact zeros to one exact value, so y == fake_quant_fp8(x) exactly (+-0 aside).
* the GEMV before the output rounding (fp32 out): products of exact values (bf16 / FP8 x times e4m3; fp32 x adds
  one rounding), summed in fp32 over a 128-wide block, scaled exactly, blocks and splits summed in fp32. The
  rounding bound is (128 + blocks + splits + 1) * 2^-24 * sum|x_k w_k| < 1e-5 * sum|x_k w_k| for K <= 384, so
  |y - exact| <= 1e-5 * (|x| @ |W|^T) elementwise (a bound that also holds under cancellation).
* after the output rounding: within one ulp (of x's dtype) of the twin, plus the fp32 class above.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kernel_helpers import interpreted_json

import dsv4

pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernel here)")

FP32_CLASS = 1e-5

_CHECK = r'''
import json, sys
import torch
import triton
import triton.language as tl
from dsv4 import ops, quant
from dsv4.ops.triton.fp8_gemv import _e4m3_lane, _nan_codes, fp8_gemv

FINITE = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)


@triton.jit
def _decode(w_ptr, out_ptr, nan_ptr, WORDS: tl.constexpr):
    i = tl.arange(0, WORDS)
    word = tl.load(w_ptr + i)
    for j in tl.static_range(4):
        tl.store(out_ptr + 4 * i + j, _e4m3_lane(word, j))
    tl.store(nan_ptr + i, (_nan_codes(word) != 0).to(tl.int32))


def decode_bits():
    """Every code in every byte lane of a word (other lanes 0): value bit for bit, NaN flag exactly for NaN."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    words = torch.zeros(256, 4, 4, dtype=torch.uint8)                    # [code, lane, byte]
    words[:, torch.arange(4), torch.arange(4)] = codes[:, None]
    got, flags = torch.empty(256 * 4 * 4), torch.empty(256 * 4, dtype=torch.int32)
    _decode[(1,)](words.view(-1).view(torch.int32), got, flags, WORDS=1024)
    vals = got.view(256, 4, 4)                                          # [code, lane, byte of the word]
    on = vals[:, torch.arange(4), torch.arange(4)].contiguous()          # [code, lane]
    off = vals.clone()
    off[:, torch.arange(4), torch.arange(4)] = 0
    want = codes.view(torch.float8_e4m3fn).float()
    nan = want.isnan()
    value_ok = (torch.equal(on[~nan].view(torch.int32), want[~nan, None].expand(-1, 4).contiguous().view(torch.int32))
                and bool((off.view(torch.int32) == 0).all()))
    return bool(value_ok and torch.equal(flags.view(256, 4).bool(), nan[:, None].expand(-1, 4)))


def all_codes_weight(gen):
    """[256, 384]: every finite e4m3 code (subnormals, -0 included) ~387 times; six different scale bytes."""
    flat = FINITE.repeat(-(-256 * 384 // len(FINITE)))[: 256 * 384]
    w = flat[torch.randperm(flat.numel(), generator=gen)].view(256, 384).view(torch.float8_e4m3fn)
    s = torch.tensor([[100, 117, 127], [131, 140, 154]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return w, s


def ulp(v, dtype):
    bits = {torch.bfloat16: 8, torch.float32: 24}[dtype]
    return torch.ldexp(torch.ones_like(v), torch.frexp(v.abs()).exponent - bits)


def compare(x, w, s, act, dot, split, block_n):
    """(fp32-out error vs float64, rounded-out excess over one ulp vs the twin), both / sum|x_k w_k|."""
    xq = quant.fake_quant_fp8(x, 128) if act else x
    wd = ops.dequant_weight(w, s, "fp8").double()
    exact, abs_sum = xq.double() @ wd.T, xq.double().abs() @ wd.abs().T
    y32 = fp8_gemv(x, w, s, act, out_dtype=torch.float32, dot=dot, split_k=split, block_n=block_n)
    y = fp8_gemv(x, w, s, act, dot=dot, split_k=split, block_n=block_n)
    twin = ops.linear.twin(x, w, s, "fp8", act).double()
    one_ulp = torch.maximum(ulp(twin, x.dtype), ulp(y.double(), x.dtype))
    excess = ((y.double() - twin).abs() - one_ulp).clamp_min(0)
    flushed = wd.where((w.view(torch.uint8) & 0x78) != 0, 0.0)          # a decoder that flushes subnormals
    return {"fp32": ((y32.double() - exact).abs() / abs_sum).max().item(),
            "twin": (excess / abs_sum).max().item(), "dtype": str(y.dtype),
            "flushed": ((y32.double() - xq.double() @ flushed.T).abs() / abs_sum).max().item()}


def act_quant_identity(gen):
    """x rows with edge cases through an identity weight: y must equal fake_quant_fp8(x) bit for bit."""
    x = torch.randn(16, 384, generator=gen) * torch.logspace(-6, 3, 16).unsqueeze(1)
    x[0, :128] = 0
    x[2, :128] = torch.linspace(-1, 1, 128) * 448 * 2**-3          # amax exactly 448 * 2^k
    x[3, :4] = torch.tensor([-1e-7, 2.0**-9 * 1.5, -2.0**-9 * 2.5, 447.9])
    eye = torch.eye(384).to(torch.float8_e4m3fn)
    s = torch.full((3, 3), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    out = {}
    for dt, dot in ((torch.bfloat16, False), (torch.float32, True), (torch.float32, False)):
        xd = x.to(dt)
        y = fp8_gemv(xd, eye, s, True, out_dtype=torch.float32, dot=dot, block_n=128)   # 128: fewer programs
        out[f"{dt}-dot{dot}"] = bool(torch.equal(y, quant.fake_quant_fp8(xd, 128).float()))
    # Controls: without act quant the identity passes x through unchanged, and quantising does change this x.
    out["control"] = bool(torch.equal(fp8_gemv(x, eye, s, False, dot=True), x)
                          and not torch.equal(quant.fake_quant_fp8(x, 128), x))
    return out


def nan_code(gen):
    w, s = quant.quant_fp8(torch.randn(128, 256, generator=gen) / 16)
    w.view(torch.uint8)[5, 10] = 0x7F
    y = fp8_gemv(torch.randn(2, 256, generator=gen).bfloat16(), w, s, True)
    return bool(y[:, 5].isnan().all() and y[:, torch.arange(128) != 5].isfinite().all())


gen = torch.Generator().manual_seed(15)
res = {"decode_bits": decode_bits(), "act_quant": act_quant_identity(gen), "nan": nan_code(gen), "gemv": {}}
weights = {"all_codes": all_codes_weight(gen), "random": quant.quant_fp8(torch.randn(256, 384, generator=gen) / 16)}
CASES = [  # weight, M, dtype, act_quant_on, dot, split_k, block_n
    ("all_codes", 1, torch.bfloat16, False, False, None, 32), ("all_codes", 1, torch.bfloat16, True, False, 3, 16),
    ("all_codes", 5, torch.bfloat16, True, False, None, 128), ("all_codes", 16, torch.float32, False, True, 3, 64),
    ("all_codes", 16, torch.float32, True, True, None, 32), ("all_codes", 3, torch.float32, False, False, None, 64),
    ("random", 1, torch.bfloat16, True, False, None, 32), ("random", 4, torch.float32, True, True, 3, 128),
]
for name, m, dt, act, dot, split, bn in CASES:
    x = (torch.randn(m, 384, generator=gen) * 3).to(dt)
    res["gemv"][f"{name}-M{m}-{dt}-act{act}-dot{dot}-split{split}-bn{bn}"] = compare(x, *weights[name], act, dot,
                                                                                    split, bn)
print(json.dumps(res))
'''


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return interpreted_json(_CHECK, tmp_path_factory.mktemp("fp8_gemv"))


def test_e4m3_decode_is_bit_exact_for_every_code(interpreted):
    assert interpreted["decode_bits"]                   # subnormals, -0.0 (0x80) and NaN (0x7F, 0xFF) included


def test_fused_act_quant_is_bit_identical_to_the_definition(interpreted):
    aq = interpreted["act_quant"]
    assert all(aq.values()), aq                         # incl. "control": the check sees whether x was quantised


def test_nan_code_reaches_only_its_column(interpreted):
    assert interpreted["nan"]


def test_gemv_matches_float64_and_the_twin(interpreted):
    for case, r in interpreted["gemv"].items():
        assert r["fp32"] <= FP32_CLASS, (case, r)
        assert r["twin"] <= FP32_CLASS, (case, r)
        assert r["dtype"] == ("torch.bfloat16" if "bfloat16" in case else "torch.float32"), (case, r)
        if case.startswith("all_codes"):                # the bound sees a decoder that flushes subnormals
            assert r["flushed"] > 2 * FP32_CLASS, (case, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("m", [1, 8, 16])
def test_fp8_gemv_on_cuda_at_flash_dims(m, dot):
    """4096 -> 1024 (32 K blocks, bf16 x, act quant on): the fp32 class with the bound for 32 blocks,
    (128 + 32 + splits + 1) * 2^-24 < 2e-5 of sum|x_k w_k|, before the output rounding and, beyond one bf16 ulp,
    against the twin after it."""
    from dsv4 import ops, quant
    from dsv4.ops.triton.fp8_gemv import fp8_gemv

    gen = torch.Generator().manual_seed(16)
    w, s = quant.quant_fp8(torch.randn(1024, 4096, generator=gen) / 64)
    x = (torch.randn(m, 4096, generator=gen) * 3).bfloat16()
    xq, wd = quant.fake_quant_fp8(x, 128).double(), ops.dequant_weight(w, s, "fp8").double()
    abs_sum = xq.abs() @ wd.abs().T
    y32 = fp8_gemv(x.cuda(), w.cuda(), s.cuda(), True, out_dtype=torch.float32, dot=dot).cpu()
    assert ((y32.double() - xq @ wd.T).abs() / abs_sum).max().item() <= 2e-5
    y = fp8_gemv(x.cuda(), w.cuda(), s.cuda(), True, dot=dot).cpu()
    twin = ops.linear.twin(x, w, s, "fp8", True).double()
    one_ulp = torch.ldexp(torch.ones_like(twin), torch.frexp(twin.abs()).exponent - 8)
    assert y.dtype == torch.bfloat16
    assert (((y.double() - twin).abs() - one_ulp).clamp_min(0) / abs_sum).max().item() <= 2e-5


def test_bad_input_names_the_offender():
    from dsv4 import quant
    from dsv4.ops.triton.fp8_gemv import fp8_gemv

    w, s = quant.quant_fp8(torch.randn(256, 128))
    x = torch.randn(2, 128).bfloat16()
    cases = [((x, w.float(), s), "float8_e4m3fn"), ((x, w[:200], s), "multiples of 128"),
             ((x, w, s[:1]), "scale"), ((x.half(), w, s), "bf16 or fp32"), ((x[:, :64], w, s), "float8_e4m3fn")]
    for args, words in cases:
        with pytest.raises(ValueError, match=words):
            fp8_gemv(*args, act_quant_on=True)


def test_bench_script_covers_the_dense_fp8_linears_of_a_flash_block():
    """scripts/bench/fp8_linear.py takes its shapes from the inventory: every FP8 dense linear the model runs as
    FP8 (wo_a is run in bf16 by the reference), including the indexer's wq_b."""
    import importlib.util

    path = Path(dsv4.__file__).parents[1] / "scripts" / "bench" / "fp8_linear.py"
    spec = importlib.util.spec_from_file_location("fp8_gemv_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert sorted(bench.flash_shapes()) == [
        ("attn.indexer.wq_b", 8192, 1024), ("attn.wkv", 512, 4096), ("attn.wo_b", 4096, 8192),
        ("attn.wq_a", 1024, 4096), ("attn.wq_b", 32768, 1024), ("ffn.shared_experts.w1", 2048, 4096),
        ("ffn.shared_experts.w2", 4096, 2048), ("ffn.shared_experts.w3", 2048, 4096)]


def test_kernel_compiles_for_hopper_without_a_gpu():
    """Triton compiles ahead of time to sm_90 code with its bundled ptxas, so CI catches what the interpreter does
    not check (the bf16 tl.dot path, layouts, BLOCK_M = 1) without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv4.ops.triton.fp8_gemv import _fp8_gemv, _sum_splits

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*u8", "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32"}
    for dot, block_m, block_n, act in ((False, 1, 32, True), (False, 16, 16, False), (True, 16, 64, True)):
        cs = {"KB_PER_SPLIT": 4, "ACT_QUANT": act, "DOT": dot, "IEEE": False, "BLOCK_M": block_m, "BLOCK_N": block_n}
        kernel = triton.compile(ASTSource(_fp8_gemv, {**sig, **dict.fromkeys(cs, "constexpr")}, constexprs=cs),
                                target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], cs
    cs = {"SPLIT": 4, "BLOCK": 1024}
    sig = {"part_ptr": "*fp32", "out_ptr": "*bf16", "MN": "i32", **dict.fromkeys(cs, "constexpr")}
    assert triton.compile(ASTSource(_sum_splits, sig, constexprs=cs), target=GPUTarget("cuda", 90, 32)).asm["cubin"]
