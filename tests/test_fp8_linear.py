"""The FP8 linear on the stored bytes (`ops/fp8_linear.py`, `ops/triton/fp8_linear.py`) against its twin
`ops.ref.linear` and float64.

On CPU the small-M kernel runs in Triton's interpreter, where its dot is fp32 (IEEE) over the bit-placement
decode of the weight bytes: exact products, so the check is the fp32-accumulation class, (128 + blocks + splits +
1) * 2^-24 * sum|x_k w_k| < 1e-5 of it at K = 384. On the GPU the dot is the hardware FP8 MMA, whose internal
accumulation over a 128 block is below fp32 (as in cuBLAS's blockwise FP8 GEMM): there the bound is the bf16
output class, relative error of the whole output <= 1e-2 against the twin (measured in the bench:
`op_errors_vs_float64`), and a float64 check of the same operands at 2e-3 of sum|x_k w_k|.
"""

from __future__ import annotations

import re

import pytest
import torch
from kernel_helpers import interpreted_json_at_once

pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernel here)")

FP32_CLASS = 1e-5

_CHECK = r'''
import json
import torch
from dsv4 import ops, quant
from dsv4.ops.triton.fp8_linear import fp8_linear_small_m

FINITE = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)


def all_codes_weight(gen):
    """[256, 384]: every finite e4m3 code (subnormals, -0 included); six different scale bytes."""
    flat = FINITE.repeat(-(-256 * 384 // len(FINITE)))[: 256 * 384]
    w = flat[torch.randperm(flat.numel(), generator=gen)].view(256, 384).view(torch.float8_e4m3fn)
    s = torch.tensor([[100, 117, 127], [131, 140, 154]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return w, s


def compare(x, w, s, act, split, block_n):
    xq = quant.fake_quant_fp8(x, 128) if act else x
    wd = ops.dequant_weight(w, s, "fp8").double()
    exact, abs_sum = xq.double() @ wd.T, xq.double().abs() @ wd.abs().T
    y32 = fp8_linear_small_m(x, w, s, act, out_dtype=torch.float32, split_k=split, block_n=block_n)
    y = fp8_linear_small_m(x, w, s, act, split_k=split, block_n=block_n)
    twin = ops.linear.twin(x, w, s, "fp8", act).double()
    bits = 8 if x.dtype == torch.bfloat16 else 24
    ulp = torch.ldexp(torch.ones_like(twin), torch.frexp(twin.abs()).exponent - bits)
    flushed = wd.where((w.view(torch.uint8) & 0x78) != 0, 0.0)          # a decoder that flushes subnormals
    wrong_scale = ops.dequant_weight(w, s.T.contiguous().T if s.shape[0] == s.shape[1] else s.flip(0), "fp8").double()
    return {"fp32": ((y32.double() - exact).abs() / abs_sum).max().item(),
            "twin": ((((y.double() - twin).abs() - ulp).clamp_min(0)) / abs_sum).max().item(),
            "dtype": str(y.dtype), "shape": list(y.shape),
            "flushed": ((y32.double() - xq.double() @ flushed.T).abs() / abs_sum).max().item(),
            "wrong_scale": ((y32.double() - xq.double() @ wrong_scale.T).abs() / abs_sum).max().item()}


gen = torch.Generator().manual_seed(41)
weights = {"all_codes": all_codes_weight(gen), "random": quant.quant_fp8(torch.randn(256, 384, generator=gen) / 16)}
res = {}
'''
# The checks after the shared set-up above, in two parts run at once (one interpreter process each, CI's two cores;
# the split evens their time). Each part continues `gen` from the weights, so part "a"'s inputs are the one-process
# script's.
_PARTS = {"a": ("cases", "sums"), "b": ("invariance", "shape")}
_SECTIONS = {"cases": r'''
CASES = [  # weight, M, dtype, act_quant_on, split_k, block_n
    ("all_codes", 1, torch.bfloat16, True, None, 64), ("all_codes", 1, torch.bfloat16, False, 3, 64),
    ("all_codes", 5, torch.float32, True, 3, 32), ("all_codes", 16, torch.bfloat16, True, None, 128),
    ("all_codes", 40, torch.bfloat16, True, 3, 64), ("random", 17, torch.float32, False, None, 64),
    ("random", 64, torch.bfloat16, True, 1, 64),
]
for name, m, dt, act, split, bn in CASES:
    x = (torch.randn(m, 384, generator=gen) * 3).to(dt)
    res[f"{name}-M{m}-{dt}-act{act}-split{split}-bn{bn}"] = compare(x, *weights[name], act, split, bn)
''', "sums": r'''
# The unsummed partials (`partials=True`, summed by the traced caller in split order): the two-kernel sum's bits,
# compared in fp32 (this interpreter truncates fp32 -> bf16 where the GPU and torch round to nearest: the rounding
# itself is the GPU test's, `test_traced_split_sum_is_bit_identical_under_compile`).
traced = []
for name, m, dt in (("random", 5, torch.bfloat16), ("all_codes", 20, torch.float32)):
    x = (torch.randn(m, 384, generator=gen) * 3).to(dt)
    parts = fp8_linear_small_m(x, *weights[name], True, split_k=3, partials=True)
    acc = parts[0] + parts[1] + parts[2]
    traced.append(list(parts.shape) == [3, m, 256] and torch.equal(
        acc, fp8_linear_small_m(x, *weights[name], True, split_k=3, out_dtype=torch.float32)))
res["partials_sum_equal"] = traced
# x quantised once per call (`prequant`): the kernel's own quantisation's codes and scales, so the same bits.
res["prequant_equal"] = []
for name, m, dt, split in (("all_codes", 1, torch.bfloat16, 3), ("random", 20, torch.float32, 1),
                           ("random", 40, torch.bfloat16, 3)):
    x = (torch.randn(m, 384, generator=gen) * 3).to(dt)
    res["prequant_equal"].append(torch.equal(
        fp8_linear_small_m(x, *weights[name], True, split_k=split, out_dtype=torch.float32, prequant=False),
        fp8_linear_small_m(x, *weights[name], True, split_k=split, out_dtype=torch.float32, prequant=True)))
''', "invariance": r'''
# Batch invariance: each row's fp32 accumulator is the same bits computed alone or with up to 63 other rows (the
# split is given: off CUDA `auto_split` is 1; `kernel_plan` keeps the GPU's split independent of M).
xb = (torch.randn(64, 384, generator=gen) * 3).bfloat16()
ROWS = (0, 2, 15, 16, 39, 63)
invariant = {}
for act in (True, False):
    alone = {i: fp8_linear_small_m(xb[i:i + 1], *weights["random"], act, out_dtype=torch.float32, split_k=3)
             for i in ROWS}
    for m in (1, 3, 16, 17, 40, 64):
        y = fp8_linear_small_m(xb[:m], *weights["random"], act, out_dtype=torch.float32, split_k=3)
        invariant[f"act{act}-M{m}"] = all(torch.equal(y[i:i + 1], alone[i]) for i in ROWS if i < m)
res["batch_invariant"] = invariant
''', "shape": r'''
x3 = torch.randn(2, 3, 384, generator=gen).bfloat16()
res["batched_shape"] = list(fp8_linear_small_m(x3, *weights["random"], True).shape)
'''}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    scripts = {part: _CHECK + "".join(_SECTIONS[name] for name in names) + "print(json.dumps(res))\n"
               for part, names in _PARTS.items()}
    res = interpreted_json_at_once(scripts, tmp_path_factory.mktemp("fp8_linear"))
    assert len(res) == 7 + 4, sorted(res)            # every case and check ran
    return res


def test_small_m_kernel_is_the_fp32_class_against_float64_and_the_twin(interpreted):
    flushed = []
    for case, r in interpreted.items():
        if case == "batched_shape":
            assert r == [2, 3, 256]
            continue
        if case == "partials_sum_equal":        # the traced sum's partials: shape and bits of the kernel's sum
            assert r == [True] * 2
            continue
        if case == "prequant_equal":            # x quantised once per call: the in-kernel quantisation's bits
            assert r == [True] * 3
            continue
        if case == "batch_invariant":
            assert all(r.values()), r           # a row's bits do not depend on the rows beside it
            continue
        assert r["fp32"] <= FP32_CLASS, (case, r)
        assert r["twin"] <= FP32_CLASS, (case, r)
        assert r["dtype"] == ("torch.bfloat16" if "bfloat16" in case else "torch.float32"), (case, r)
        if case.startswith("all_codes"):                 # six distinct block scales
            flushed.append(r["flushed"])
            assert r["wrong_scale"] > 2 * FP32_CLASS, (case, r)     # the bound sees scales on the wrong blocks ...
    assert max(flushed) > 2 * FP32_CLASS, flushed                # ... and a decoder that flushes subnormals


def test_kernel_plan_takes_split_and_tile_from_n_and_k_only(monkeypatch):
    """Batch invariance of the dispatch: on an H200 (132 SMs) every M up to SMALL_M gets the same K split and the
    same 16-row tile, for Flash's FP8 linear shapes and the tiny model's; only the number of row blocks grows.
    (Up to v10 the tile grew to 32 / 64 rows with M: a row's sum order then depended on its batch.)"""
    import triton

    from dsv4.ops.fp8_linear import SMALL_M
    from dsv4.ops.triton import fp8_linear as kernel
    from dsv4.ops.triton.splitk import divisor_at_most

    monkeypatch.setattr(kernel, "auto_split", lambda tiles, device, per_sm: -(-per_sm * 132 // tiles))
    monkeypatch.setenv("DSV4_FP8_MAX_SPLIT", "0")                  # no cap: the split from the SM count alone
    for n, k in ((2048, 4096), (512, 4096), (32768, 1024), (1024, 4096), (256, 128), (2048, 128)):
        plans = {m: kernel.kernel_plan(m, n, k, torch.device("cuda")) for m in range(1, SMALL_M + 1)}
        split = divisor_at_most(k // 128, -(-4 * 132 // (n // 64)))
        assert {p[0] for p in plans.values()} == {split}, (n, k)
        assert all(grid == (triton.cdiv(m, 16), n // 64, split) for m, (_, grid) in plans.items()), (n, k)
    # DSV4_FP8_MAX_SPLIT (default 8) caps the split (still from N and K only): every Flash shape within the
    # traced-sum limit
    monkeypatch.delenv("DSV4_FP8_MAX_SPLIT")
    assert kernel.max_split_from_env() == 8
    for n, k in ((2048, 4096), (512, 4096), (1024, 4096), (4096, 8192)):
        splits = {kernel.kernel_plan(m, n, k, torch.device("cuda"))[0] for m in (1, 16, 17, SMALL_M)}
        assert splits == {divisor_at_most(k // 128, min(8, -(-4 * 132 // (n // 64))))}, (n, k, splits)
        assert max(splits) <= 8
    monkeypatch.setenv("DSV4_FP8_MAX_SPLIT", "eight")
    with pytest.raises(ValueError, match="DSV4_FP8_MAX_SPLIT"):
        kernel.kernel_plan(1, 2048, 4096, torch.device("cuda"))


def test_bad_input_names_the_offender():
    from dsv4 import quant
    from dsv4.ops.triton.fp8_linear import fp8_linear_small_m

    w, s = quant.quant_fp8(torch.randn(256, 128))
    x = torch.randn(2, 128).bfloat16()
    cases = [((x, w.float(), s), "float8_e4m3fn"), ((x, w[:200], s), "multiples of 128"),
             ((x, w, s[:1]), "scale"), ((x[:, :64], w, s), "float8_e4m3fn")]
    for args, words in cases:
        with pytest.raises(ValueError, match=words):
            fp8_linear_small_m(*args, act_quant_on=True)


def test_kernels_compile_for_hopper_without_a_gpu():
    """The hardware FP8 dot path (not run by the interpreter) compiles to sm_90 with Triton's bundled ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv4.ops.triton.fp8_linear import _fp8_linear_small_m
    from dsv4.ops.triton.quant import _act_quant_fp8

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "KB_PER_SPLIT": "i32", "xs_ptr": "*fp32", "X_STRIDE": "i32", "GROUP_N": "i32"}
    for act, block_m, block_n, pre, grouped in (
            (True, 16, 64, False, False), (False, 16, 64, False, False), (True, 64, 128, False, False),
            (True, 16, 64, True, False), (False, 16, 64, False, True)):                 # grouped: ops.block_diag_linear
        cs = {"ACT_QUANT": act, "HW_FP8": True, "BLOCK_N": block_n, "BLOCK_M": block_m, "PREQUANT": pre,
              "GROUPED": grouped}
        x_sig = {"x_ptr": "*u8" if pre else "*bf16"}          # prequant: x is act_quant_fp8's e4m3 codes
        kernel = triton.compile(ASTSource(_fp8_linear_small_m, {**sig, **x_sig, **dict.fromkeys(cs, "constexpr")},
                                          constexprs=cs), target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], cs
        # the MMA the variant promises: FP8 x FP8 with act quant (the reference kernel's), else bf16 operands
        mma = "e4m3.e4m3" if act else "bf16.bf16"
        assert re.search(rf"wgmma\.mma_async[.\w]*\.{mma}", kernel.asm["ptx"]), cs
    sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(sig))}           # what a real launch passes
    cs = {"BLOCK": 128, "ROWS": 16}
    ptx = triton.compile(ASTSource(_act_quant_fp8, {**sig, **dict.fromkeys(cs, "constexpr")}, cs, attrs),
                         target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    # 16-byte loads of x and stores of the codes (one element a thread, the first version, was 5x its bytes' time)
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx


@pytest.mark.gpu
@pytest.mark.parametrize("act_quant_on", [True, False])
@pytest.mark.parametrize("m", [1, 8, 64, 65, 1024])
@pytest.mark.parametrize("n,k", [(2048, 4096), (256, 256)])
def test_dispatched_fp8_linear_on_cuda_at_flash_dims(m, act_quant_on, n, k):
    """4096 -> 2048 (a shared expert's w1): the small-M kernel up to 64 rows, scaled_mm (act quant on) or the
    per-call bf16 decode (off) above; bf16 output class against the twin, and against float64 of the same
    operands within 2e-3 of sum|x_k w_k| (the FP8 MMA's reduced internal accumulation). 256 -> 256 (built-in
    model sizes) is too small for cuBLAS's blockwise scales: above 64 rows it must take the twin's arithmetic."""
    from dsv4 import ops, quant
    from dsv4.ops.registry import which

    gen = torch.Generator().manual_seed(42)
    w, s = quant.quant_fp8(torch.randn(n, k, generator=gen) / 64)
    x = (torch.randn(m, k, generator=gen) * 3).bfloat16()
    args = (x.cuda(), w.cuda(), s.cuda(), "fp8", act_quant_on)
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        assert which("linear", *args) == "fp8_stored_linear"
        got = ops.linear(*args).cpu()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + 1 << 20            # nothing kept beside the weight
    want = ops.linear.twin(x, w, s, "fp8", act_quant_on)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert rel <= 1e-2, rel
    xq = quant.fake_quant_fp8(x, 128) if act_quant_on else x
    wd = ops.dequant_weight(w, s, "fp8").double()
    err = ((got.double() - xq.double() @ wd.T).abs() / (xq.double().abs() @ wd.abs().T)).max().item()
    assert err <= 2e-3, err


@pytest.mark.gpu
def test_act_quant_kernel_is_bit_identical_to_the_definition():
    from dsv4 import quant
    from dsv4.ops.triton.quant import act_quant_fp8

    x = torch.randn(33, 512, generator=torch.Generator().manual_seed(43)) * torch.logspace(-6, 3, 33)[:, None]
    x[0, :128] = 0
    q, s = act_quant_fp8(x.bfloat16().cuda())
    qw, sw = quant.act_quant(x.bfloat16(), 128)
    assert torch.equal(q.cpu().view(torch.uint8), qw.view(torch.uint8))
    assert torch.equal(s.cpu(), sw) and s.stride() == (1, 33)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("n,k", [(4096, 2048), (32768, 1024)])
def test_traced_split_sum_is_bit_identical_under_compile(m, n, k, monkeypatch):
    """DSV4_FP8_SUM_TRACED (on by default): under torch.compile the dispatched linear returns the kernel's partials
    and adds them in the graph (fused into the consumer, one launch fewer): the eager call's bits (kernel +
    `_sum_splits`), at the split counts (2 .. 8) the default plan picks for Flash's shared-expert w2 and its widest
    linear (wq_b)."""
    from dsv4 import ops, quant
    from dsv4.ops.fp8_linear import TRACED_SUM_MAX_SPLIT
    from dsv4.ops.triton.fp8_linear import kernel_plan

    monkeypatch.delenv("DSV4_FP8_SUM_TRACED", raising=False)       # the default
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(45)
    w, s = (t.cuda() for t in quant.quant_fp8(torch.randn(n, k, generator=gen) / 64))
    x = (torch.randn(m, k, generator=gen) * 3).bfloat16().cuda()
    assert 1 < kernel_plan(m, n, k, x.device)[0] <= TRACED_SUM_MAX_SPLIT      # the traced path applies
    with torch.no_grad():
        eager = ops.linear(x, w, s, "fp8", True)
        fn = torch.compile(lambda x: torch.relu(ops.linear(x, w, s, "fp8", True)), fullgraph=True)
        got, code = torch._inductor.utils.run_and_get_code(fn, x)
    assert "fp8_small_m_partials" in "".join(code)
    assert torch.equal(got, torch.relu(eager))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("n,k", [(1024, 4096), (32768, 1024), (4096, 8192)])
def test_prequantised_x_is_bit_identical_on_cuda(m, n, k):
    """`prequant=True` (x quantised once by `act_quant_fp8`, the kernel reading its codes and scales) against the
    in-kernel quantisation, at Flash's wq_a, wq_b and wo_b shapes with the default plan: the same codes and scales
    into the same FP8 MMA, so the same bits, in fp32 and in the bf16 output."""
    from dsv4 import quant
    from dsv4.ops.triton.fp8_linear import fp8_linear_small_m

    gen = torch.Generator().manual_seed(46)
    w, s = (t.cuda() for t in quant.quant_fp8(torch.randn(n, k, generator=gen) / 64))
    x = (torch.randn(m, k, generator=gen) * 3).bfloat16().cuda()
    for dtype in (torch.float32, None):
        want = fp8_linear_small_m(x, w, s, True, out_dtype=dtype, prequant=False)
        assert torch.isfinite(want).all()
        assert torch.equal(fp8_linear_small_m(x, w, s, True, out_dtype=dtype, prequant=True), want)


def test_prequant_switches(monkeypatch):
    """By default x is quantised once per call from `PREQUANT_FROM_M` rows (33: bs64's four 16-row blocks, not bs1 /
    bs8's one); DSV4_FP8_PREQUANT=1: every M; =0: never; a bad value: an error."""
    from dsv4.ops.triton.fp8_linear import PREQUANT_FROM_M, prequant_from_env

    monkeypatch.delenv("DSV4_FP8_PREQUANT", raising=False)
    assert PREQUANT_FROM_M == 33
    assert [prequant_from_env(m) for m in (1, 8, 32, 33, 64)] == [False, False, False, True, True]
    monkeypatch.setenv("DSV4_FP8_PREQUANT", "1")
    assert all(prequant_from_env(m) for m in (1, 8, 64))
    monkeypatch.setenv("DSV4_FP8_PREQUANT", "0")
    assert not any(prequant_from_env(m) for m in (1, 8, 64))
    monkeypatch.setenv("DSV4_FP8_PREQUANT", "yes")
    with pytest.raises(ValueError, match="DSV4_FP8_PREQUANT"):
        prequant_from_env(1)
