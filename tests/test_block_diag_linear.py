"""The block-diagonal linear (`ops.block_diag_linear`: attention's wo_a held FP8) against its twin and float64.

The twin decodes the weight and runs the reference's grouped einsum; on CPU it is checked against a per-group
float64 product (fp32 x: float64 accumulation, one rounding, so `assert_close`'s fp32 defaults; it is the
definition, so only its plumbing is at stake: grouping, the scale grid, no act quant). The small-M kernel with
groups runs in Triton's CPU interpreter, where its dot is fp32 (IEEE) over the bit-placement decode of the weight
bytes: exact products, so the check is the fp32-accumulation class of tests/test_fp8_linear.py (1e-5 of
sum|x_k w_k|), and a row's bits must not depend on the rows beside it. On the GPU the kernel's dot is bf16 on the
tensor cores (exact products, fp32 sums): the bf16 output class against the twin, relative 1e-2 of the output,
and 2e-3 of sum|x_k w_k| against float64, as the FP8 linear's GPU tests.
"""

from __future__ import annotations

import pytest
import torch

from dsv4 import ops, quant
from dsv4.model.primitives import BlockDiagLinear
from dsv4.ops.registry import which

FP32_CLASS = 1e-5


def _weight(groups: int, rank: int, k: int, gen: torch.Generator):
    return quant.quant_fp8(torch.randn(groups * rank, k, generator=gen) * torch.logspace(-3, 1, groups * rank)[:, None])


def _float64(x, w, s):
    """Per group, x_g @ W_g^T in float64: (exact [..., G, R], sum |x_k w_k| [..., G, R])."""
    g = x.shape[-2]
    wd = ops.dequant_weight(w, s, "fp8").double().view(g, -1, x.shape[-1])
    xd = x.double()
    return (torch.stack([xd[..., i, :] @ wd[i].T for i in range(g)], dim=-2),
            torch.stack([xd[..., i, :].abs() @ wd[i].abs().T for i in range(g)], dim=-2))


@pytest.mark.parametrize("groups, rank, k", [(2, 64, 256), (4, 128, 128), (3, 40, 100)])
def test_twin_is_the_per_group_product(groups, rank, k):
    gen = torch.Generator().manual_seed(50)
    w, s = _weight(groups, rank, k, gen)
    x = torch.randn(2, 3, groups, k, generator=gen)
    exact, _ = _float64(x, w, s)
    y = ops.block_diag_linear.twin(x, w, s, "fp8")
    assert y.dtype == torch.float32 and y.shape == (2, 3, groups, rank)
    torch.testing.assert_close(y, exact.float())
    decoded = ops.dequant_weight(w, s, "fp8")
    assert torch.equal(ops.block_diag_linear.twin(x, w, s, "fp8", decoded), y)          # a cached decode: same bits
    assert torch.equal(ops.block_diag_linear.twin(x, decoded, None, "plain"), y)       # held dequantised: same bits
    xb = x.bfloat16()                                   # bf16: the weight cast to bf16 (exact), a bf16 einsum
    want = torch.einsum("...gd,grd->...gr", xb, decoded.view(groups, rank, k).bfloat16())
    assert torch.equal(ops.block_diag_linear.twin(xb, w, s, "fp8"), want)


def test_bf16_decode_is_the_twins_values_bit_for_bit():
    """The prefill path's transient decode (`decode_bf16`) against the twin's (fp32 decode, cast to bf16): every
    finite e4m3 code, subnormals and -0 included, under scales from 2^-127 (byte 0) to 2^126, as uint8."""
    from dsv4.ops.block_diag_linear import decode_bf16

    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    w = codes.repeat(-(-256 * 512 // len(codes)))[: 256 * 512].view(256, 512).view(torch.float8_e4m3fn)
    s = torch.tensor([[0, 1, 100, 127], [130, 160, 200, 253]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    got = decode_bf16(w, s)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.uint16), ops.dequant_weight(w, s, "fp8").bfloat16().view(torch.uint16))


def test_prefill_sizes_take_the_twins_arithmetic():
    """Above SMALL_M rows the fast path decodes the weight to bf16 for the call and runs the twin's einsum: the
    twin's bits (run here on CPU: no kernel is involved)."""
    from dsv4.ops.block_diag_linear import fp8_block_diag_linear

    gen = torch.Generator().manual_seed(55)
    w, s = _weight(4, 128, 256, gen)
    x = torch.randn(1, 65, 4, 256, generator=gen).bfloat16()
    with torch.no_grad():
        got = fp8_block_diag_linear(x, w, s, "fp8")
    assert torch.equal(got, ops.block_diag_linear.twin(x, w, s, "fp8"))


def test_module_never_quantises_its_input():
    """wo_a has no act quant in the reference: the module's output is the twin's whatever `quant_emulation` says,
    and differs from what an act-quantised input would give."""
    gen = torch.Generator().manual_seed(51)
    lin = BlockDiagLinear(256, 2 * 128, "fp8", torch.float32, groups=2)
    lin.weight.data, lin.scale.data = _weight(2, 128, 256, gen)
    x = torch.randn(3, 2, 256, generator=gen)
    lin.quant_emulation = True
    on = lin(x)
    lin.quant_emulation = False
    assert torch.equal(on, lin(x)) and torch.equal(on, ops.block_diag_linear.twin(x, lin.weight, lin.scale, "fp8"))
    assert not torch.equal(on, ops.block_diag_linear.twin(quant.fake_quant_fp8(x, 128), lin.weight, lin.scale, "fp8"))
    with pytest.raises(ValueError, match="3 groups"):
        BlockDiagLinear(256, 256, "fp8", torch.float32, groups=3)


_CHECK = r'''
import json
import torch
from dsv4 import ops, quant
from dsv4.ops.block_diag_linear import fp8_block_diag_linear
from dsv4.ops.triton.fp8_linear import fp8_linear_small_m

gen = torch.Generator().manual_seed(52)
res = {}
# groups, rank, K: K = 384 (3 blocks, split 3 below), rank 64 (one tile a group; 128-row scale blocks span two
# groups), 128 (two tiles a group), 192; G = 1 is the plain linear's layout
SHAPES = [(2, 64, 384), (4, 128, 256), (2, 192, 384), (1, 256, 384)]
for groups, rank, k in SHAPES:
    w, s = quant.quant_fp8(torch.randn(groups * rank, k, generator=gen) * torch.logspace(-3, 1, groups * rank)[:, None])
    wd = ops.dequant_weight(w, s, "fp8").double().view(groups, rank, k)
    for m, dt in ((1, torch.bfloat16), (5, torch.float32), (16, torch.bfloat16), (17, torch.bfloat16),
                  (64, torch.float32)):
        x = (torch.randn(m, groups, k, generator=gen) * 3).to(dt)
        exact = torch.einsum("mgd,grd->mgr", x.double(), wd)
        abs_sum = torch.einsum("mgd,grd->mgr", x.double().abs(), wd.abs())
        y32 = fp8_linear_small_m(x.flatten(1), w, s, False, out_dtype=torch.float32, split_k=3 if k == 384 else None,
                                 groups=groups).view(m, groups, rank)
        with torch.no_grad():
            y = fp8_block_diag_linear(x.view(1, m, groups, k), w, s, "fp8")[0]     # the op's plumbing, [b, s, G, K]
        twin = ops.block_diag_linear.twin(x, w, s, "fp8").double()
        ulp = torch.ldexp(torch.ones_like(twin), torch.frexp(twin.abs()).exponent - (8 if dt == torch.bfloat16 else 24))
        # a kernel reading group 0's x for every group: what a wrong group offset gives
        wrong = torch.einsum("md,grd->mgr", x[:, 0].double(), wd)
        res[f"G{groups}-R{rank}-K{k}-M{m}-{dt}"] = {
            "fp32": ((y32.double() - exact).abs() / abs_sum).max().item(),
            "twin": (((y.double() - twin).abs() - ulp).clamp_min(0) / abs_sum).max().item(),
            "wrong_group": ((y32.double() - wrong).abs() / abs_sum).max().item() if groups > 1 else 1.0,
            "dtype": str(y.dtype), "shape": list(y.shape), "want_shape": [m, groups, rank]}
# Batch invariance: each row's fp32 accumulator is the same bits alone or with up to 63 other rows (split given:
# off CUDA `auto_split` is 1; `kernel_plan` keeps the GPU's split independent of M).
w, s = quant.quant_fp8(torch.randn(4 * 64, 384, generator=gen) / 16)
xb = (torch.randn(64, 4 * 384, generator=gen) * 3).bfloat16()
alone = {i: fp8_linear_small_m(xb[i:i + 1], w, s, False, out_dtype=torch.float32, split_k=3, groups=4)
         for i in (0, 15, 16, 63)}
res["batch_invariant"] = {m: all(torch.equal(fp8_linear_small_m(xb[:m], w, s, False, out_dtype=torch.float32,
                                                                split_k=3, groups=4)[i:i + 1], alone[i])
                                 for i in alone if i < m) for m in (1, 16, 17, 64)}
# The traced split sum's partials (`ops.fp8_linear.small_m_traced`, under torch.compile on the GPU): summed in split
# order, the kernel's sum.
parts = fp8_linear_small_m(xb[:5], w, s, False, split_k=3, partials=True, groups=4)
res["partials_sum_equal"] = list(parts.shape) == [3, 5, 256] and torch.equal(
    parts[0] + parts[1] + parts[2], fp8_linear_small_m(xb[:5], w, s, False, split_k=3, out_dtype=torch.float32,
                                                       groups=4))
print(json.dumps(res))
'''


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernel here)")
    from kernel_helpers import interpreted_json

    res = interpreted_json(_CHECK, tmp_path_factory.mktemp("block_diag"))
    assert len(res) == 4 * 5 + 2, sorted(res)          # every case and check ran
    return res


def test_small_m_kernel_with_groups_in_the_interpreter(interpreted):
    for case, r in interpreted.items():
        if case == "batch_invariant":
            assert all(r.values()) and len(r) == 4, r          # a row's bits do not depend on the rows beside it
            continue
        if case == "partials_sum_equal":
            assert r is True
            continue
        assert r["fp32"] <= FP32_CLASS, (case, r)
        assert r["twin"] <= FP32_CLASS, (case, r)
        assert r["wrong_group"] > 100 * FP32_CLASS, (case, r)      # the bound sees a wrong group offset
        assert r["shape"] == r["want_shape"] and r["dtype"] == ("torch.bfloat16" if "bfloat16" in case
                                                                else "torch.float32"), (case, r)


def test_bad_groups_name_the_offender():
    from dsv4.ops.triton.fp8_linear import fp8_linear_small_m

    pytest.importorskip("triton")
    w, s = quant.quant_fp8(torch.randn(256, 128))
    x = torch.randn(2, 2 * 128).bfloat16()
    with pytest.raises(ValueError, match="groups"):
        fp8_linear_small_m(x, w, s, False, groups=3)           # 256 rows in 3 groups
    with pytest.raises(ValueError, match="groups"):
        fp8_linear_small_m(x, w, s, False, groups=8)           # groups of 32 rows: not whole 64-row tiles
    with pytest.raises(ValueError, match="act quant"):
        fp8_linear_small_m(x, w, s, True, groups=2)


def _cuda_like(shape):
    """What the fast path's predicate reads of a CUDA bf16 activation (there is no CUDA tensor on a CPU machine)."""
    return type("CudaLike", (), {"is_cuda": True, "dtype": torch.bfloat16, "shape": shape})()


def test_fast_path_applies_only_where_the_kernel_does():
    """Off CUDA, with grad (training), for a decoded weight, another format, or groups that do not come in whole
    64-row tiles, the twin runs."""
    from dsv4.ops.block_diag_linear import _applies

    w = torch.empty(8 * 1024, 4096, dtype=torch.float8_e4m3fn)
    s = torch.empty(64, 32, dtype=torch.float8_e8m0fnu)
    x = torch.empty(1, 1, 8, 4096, dtype=torch.bfloat16)
    with torch.no_grad():
        assert which("block_diag_linear", x, w, s, "fp8") == "twin"                     # CPU
        assert _applies(_cuda_like(x.shape), w, s, "fp8")
        assert not _applies(_cuda_like(x.shape), w, s, "fp8", dequantized=w)
        assert not _applies(_cuda_like(x.shape), w, s, "plain")
        assert not _applies(_cuda_like((1, 1, 256, 4096)), w, s, "fp8")              # 32 rows a group
    assert not _applies(_cuda_like(x.shape), w, s, "fp8")                            # grad on


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 64, 65, 300])
def test_dispatched_op_on_cuda_at_flash_dims(m):
    """Flash's wo_a (G = 8, R = 1024, K = 4096): the small-M kernel up to 64 rows, the per-call bf16 decode and the
    twin's einsum above; bf16 output class against the twin, and against float64 of the same operands within 2e-3
    of sum|x_k w_k|; nothing kept beside the weight; a row's bits the same alone and in the batch (<= 64 rows)."""
    gen = torch.Generator().manual_seed(53)
    w, s = _weight(8, 1024, 4096, gen)
    x = torch.randn(m, 8, 4096, generator=gen).bfloat16()
    args = (x.cuda(), w.cuda(), s.cuda(), "fp8")
    with torch.inference_mode():
        ops.block_diag_linear(*args)        # first call: cuBLAS's workspace (32 MiB on Hopper) and kernel compiles
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        assert which("block_diag_linear", *args) == "fp8_block_diag_linear"
        got = ops.block_diag_linear(*args)
        alone = ops.block_diag_linear(args[0][-1:], *args[1:])
    torch.cuda.synchronize()
    # nothing kept beside the weight: only the two outputs stay (a bf16 copy of the weight would be 64 MiB)
    held = torch.cuda.memory_allocated() - before - got.nbytes - alone.nbytes
    assert held <= (1 << 20), held
    if m <= 64:
        assert torch.equal(got[-1:], alone)
    got = got.cpu()
    want = ops.block_diag_linear.twin(x, w, s, "fp8")
    assert got.dtype == torch.bfloat16 and got.shape == want.shape == (m, 8, 1024)
    rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert rel <= 1e-2, rel
    exact, abs_sum = _float64(x, w, s)
    err = ((got.double() - exact).abs() / abs_sum).max().item()
    assert err <= 2e-3, err


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 64])
def test_traced_split_sum_is_bit_identical_under_compile(m, monkeypatch):
    """Under torch.compile the op returns the kernel's partials and adds them in the graph (`small_m_traced`, shared
    with the FP8 linear): the eager call's bits, at Flash's wo_a."""
    from dsv4.ops.fp8_linear import TRACED_SUM_MAX_SPLIT
    from dsv4.ops.triton.fp8_linear import kernel_plan

    monkeypatch.delenv("DSV4_FP8_SUM_TRACED", raising=False)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(54)
    w, s = (t.cuda() for t in _weight(8, 1024, 4096, gen))
    x = torch.randn(m, 8, 4096, generator=gen).bfloat16().cuda()
    assert 1 < kernel_plan(m, 8 * 1024, 4096, x.device)[0] <= TRACED_SUM_MAX_SPLIT       # the traced path applies
    with torch.no_grad():
        eager = ops.block_diag_linear(x, w, s, "fp8")
        fn = torch.compile(lambda x: torch.relu(ops.block_diag_linear(x, w, s, "fp8")), fullgraph=True)
        got, code = torch._inductor.utils.run_and_get_code(fn, x)
    assert "fp8_small_m_partials" in "".join(code)
    assert torch.equal(got, torch.relu(eager))
