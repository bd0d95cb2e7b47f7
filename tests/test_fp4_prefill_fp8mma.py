"""The expert-major FP4 prefill GEMM on FP8 tensor cores (`ops/triton/fp4_prefill_fp8mma.py`, the `fp8mma` option
of `fp4_grouped_gemm_prefill`) against its twin, the `grouped_linear` reference path.

Precision class, derived. x is on the FP8 grid per 128 block (the MoE's input), so its e4m3 codes and power-of-two
scales give it back exactly; every product of an e4m3 code (4 significant bits) and an e2m1 value (2) is exact in
fp32, and every scaling is by a power of two (exact barring underflow). What is left is the order of the fp32
additions: a 32-term dot per sub-block, 4 sub-block partials per 128-K block (or one 128-term dot when folded),
K / 128 block sums, each product feeding at most n = 128 + 4 + K / 128 additions, so by the standard bound
|got - exact| <= n * 2^-24 * sum_k |x_k w_k|; the twin (float64, rounded to fp32 once) is within 2^-24 |exact|.
In the CPU interpreter the dot is fp32 (IEEE), so that is the check: elementwise, in units of 2^-24 sum |x w|,
<= n + 1 (measured: 0 here; the mutations it must catch give errors of order 2^24). Decoding is checked bit-exactly
(one-hot rows read back every code under scale bytes 0, 1, 100, 127, 140, 160).
On the GPU the FP8 MMA sums a sub-block's products in its own fixed-point accumulator (below fp32; DeepSeek-V3
report, "Increasing Accumulation Precision": ~14 bits; modelled as products aligned to the largest and truncated
to 13 fraction bits): per K = 32 wgmma from zero, at most 32 * 2^-13 * max|p| <= 2^-8 of the sub-block's
sum |x w| (folded: 128 products per block, 2^-6), so the GPU test's class is elementwise <= 2^-8 (folded 2^-6) of
sum |x w| against the twin.
No Frobenius bound follows from it (sum |x w| is ~sqrt(K) times |x w| summed with signs); the bench reports it.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import in_interpreter_at_once

from dsv4 import ops
from dsv4.quant import fake_quant_fp8, quant_fp4

prefill = pytest.importorskip("dsv4.ops.triton.fp4_grouped_prefill", reason="needs triton")

_CHECK = """
import json, sys
import torch
from dsv4 import ops
from dsv4.ops.triton.fp4_grouped_prefill import fp4_grouped_gemm_prefill
from dsv4.quant import fake_quant_fp8, quant_fp4
FOLD = {fold}
gen = torch.Generator().manual_seed(31)
K = 256


def ulps(got, x, eid, w, s, ref=None):
    # max |got - ref| in units of 2^-24 sum |x w| (ref: the exact product, in float64)
    wd = torch.stack([ops.dequant_weight(w[e], s[e], 'fp4') for e in range(w.shape[0])]).double()[eid]
    ref = torch.einsum('mk,mnk->mn', x.double(), wd) if ref is None else ref.double()
    abs_sum = torch.einsum('mk,mnk->mn', x.double().abs(), wd.abs())
    return ((got.double() - ref).abs() / abs_sum * 2**24).max().item()


def gemm(x, eid, w, s, **kw):
    return fp4_grouped_gemm_prefill(x, eid, w, s, fp8mma='fold' if FOLD else True, **kw)


res = {{}}
# 83 rows; experts 0, 2, 5, 7 have none; expert 4 owns rows 4..73: five row tiles at block_m=16 (the first starts
# mid-tile of the row grid, the last is partial); N = 80: a full and a partial 64-row weight tile.
ws = [quant_fp4(torch.randn(80, K, generator=gen) / 16) for _ in range(8)]
w, s = torch.stack([a for a, _ in ws]), torch.stack([b for _, b in ws])
eid = torch.tensor([1] * 3 + [3] + [4] * 70 + [6] * 9)
x = torch.randn(83, K, generator=gen) * 3
x[5, :128] *= 2.0**-20                                  # blocks of one row far apart in scale
x = fake_quant_fp8(x, 128)
out = {{bm: gemm(x, eid, w, s, block_m=bm, block_n=64, num_warps=4) for bm in (16, 32)}}
res['random_ulps'] = [ulps(out[bm], x, eid, w, s) for bm in (16, 32)]
twin = ops.grouped_linear.twin(x, eid, w, s, 'fp4')
res['twin_ulps'] = ulps(out[16], x, eid, w, s, twin)      # the same output (the interpreter is deterministic)
# decoding, exactly: one-hot rows read back every code (both nibbles) of 4 weight tiles: scale bytes 0, 1, 100, 127,
# 140, 160 (a byte 0: the exact e8m0 decode); 118..121 (a 128-K block spans <= 3 binades: folded when FOLD);
# 110 / 121 alternating (11 binades: the fold's limit, still folded); 110 / 122 (12: the guard must send it to
# the per-32 path; folded, a 0.5 would lose its subnormal code).
codes = torch.arange(4 * 64 * K, dtype=torch.int32).view(4, 64, K) % 16
wq = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)
g = torch.arange(64 * K // 32).view(64, K // 32)
sq = torch.stack([torch.tensor([0, 1, 100, 127, 140, 160])[g % 6], 118 + (g * 7 % 4), 110 + 11 * (g % 2),
                  110 + 12 * (g % 2)]).to(torch.uint8).view(torch.float8_e8m0fnu)
# The four are the 64-row weight tiles of one expert, each tile a program that picks its path from its own scales:
# x's operand (one interpreted program per row and 128-K block: most of the check's time) is made for K one-hot
# rows once, not once per expert.
got = gemm(torch.eye(K), torch.zeros(K, dtype=torch.long), wq.view(1, 4 * 64, K // 2), sq.view(1, 4 * 64, K // 32),
           block_m=32, block_n=64, num_warps=4)
res['decode_exact'] = [torch.equal(got[:, e * 64:(e + 1) * 64], ops.dequant_weight(wq[e], sq[e], 'fp4').T)
                       for e in range(4)]
# a NaN scale (byte 255) in the one-row expert 3: its tile also covers expert 4's rows (zeroed), never stored
s[3, 7, 2] = torch.tensor(255, dtype=torch.uint8).view(s.dtype)
nan = gemm(x, eid, w, s, block_m=32, block_n=64, num_warps=4).isnan()
res['nan'] = [torch.equal(nan, ops.grouped_linear.twin(x, eid, w, s, 'fp4').isnan()), nan.sum().item()]
# x's operand: act_quant's codes, each stored at its dot column, and its scales, bit for bit
from dsv4.ops.triton.fp4_prefill_fp8mma import X_ORDER, X_ORDER_LUT, x_operand
from dsv4.quant import act_quant
q, sc = x_operand(x, FOLD)
q0, s0 = act_quant(x, 128)
q0 = q0.view(torch.uint8).view(83, K // 32, 32)[:, :, X_ORDER_LUT if FOLD else X_ORDER].reshape(83, K)
res['x_operand'] = torch.equal(q.view(torch.uint8), q0) and torch.equal(sc, s0.T)
res['empty'] = list(gemm(x[:0], eid[:0], w, s, block_m=32, block_n=64, num_warps=4).shape)
print(json.dumps(res))
"""
N_BOUND = 128 + 4 + 256 // 128 + 1          # the fp32 class at K = 256, in units of 2^-24 sum |x w|


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Both variants at once (per-32 dots; folded 128-K dots where exact), one interpreter process each."""
    import json

    scripts = {name: _CHECK.format(fold=fold) for name, fold in (("per32", False), ("fold", True))}
    with in_interpreter_at_once(scripts, tmp_path_factory.mktemp("fp8mma"), timeout=600) as futures:
        return {name: json.loads(f.result().strip().splitlines()[-1]) for name, f in futures.items()}


@pytest.mark.parametrize("variant", ["per32", "fold"])
def test_fp8mma_is_the_fp32_class_over_ragged_rows_and_empty_experts(interpreted, variant):
    """Against float64 over empty experts, an expert over five row tiles, partial row and weight tiles, a row whose
    128-K blocks differ by 2^20 in scale: <= n + 1 units of 2^-24 sum |x w| (module docstring); x's operand is
    act_quant's codes in the variant's order, bit for bit."""
    r = interpreted[variant]
    assert max(r["random_ulps"]) <= N_BOUND, r
    assert r["twin_ulps"] <= N_BOUND + 1, r
    assert r["empty"] == [0, 80] and r["x_operand"], r


@pytest.mark.parametrize("variant", ["per32", "fold"])
def test_fp8mma_decodes_every_code_and_scale_exactly(interpreted, variant):
    """Every FP4 code under extreme scale bytes (exact e8m0 path), narrow blocks and blocks at the fold's limit (11
    binades: folded where enabled) and past it (12: the guard must take the per-32 path): bit-exact; a NaN scale
    gives the twin's NaNs."""
    r = interpreted[variant]
    assert r["decode_exact"] == [True] * 4, r
    assert r["nan"] == [True, 1], r


def test_x_orders_are_permutations_within_a_sub_block():
    from dsv4.ops.triton import fp4_prefill_fp8mma as mma

    for order in (mma.X_ORDER, mma.X_ORDER_LUT):
        assert sorted(order.tolist()) == list(range(32))
    assert mma.X_ORDER[:4].tolist() == [0, 2, 4, 6] and mma.X_ORDER_LUT[:4].tolist() == [0, 1, 2, 3]


def test_fp8mma_options_are_checked():
    w, s = torch.zeros(3, 64, 64, dtype=torch.int8), torch.zeros(3, 64, 4, dtype=torch.uint8)
    x, eid = torch.zeros(5, 128), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="pick one"):
        prefill.fp4_grouped_gemm_prefill(x, eid, w, s, packed="twin", fp8mma=True)
    with pytest.raises(ValueError, match="block_n"):
        prefill.fp4_grouped_gemm_prefill(x, eid, w, s, block_n=32, fp8mma=True)


def test_fp8mma_compiles_for_hopper_without_a_gpu():
    """The hardware path (FP8 wgmma with the decoded weight in registers, inline-PTX decode) compiles for sm_90:
    per-32 at the dispatched config (32 x 128, 4 warps, 168 registers) with nothing spilled inside its K loops,
    folded at 32 x 64 with no spills at all; `x_operand` in its two orders; the split-K decode kernel."""
    import sys
    from pathlib import Path

    import triton

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
    from grouped_prefill_regs import fp8mma_report

    for block_n, fold, maxnreg in ((128, False, 168), (64, True, None)):
        report = fp8mma_report(32, block_n, 4, fold, maxnreg)
        assert "QGMMA" in report["mma"] and "E4M3" in report["mma"] and not report["k_loop_spills"], report
        assert report["regs"] <= (maxnreg or 255) and (maxnreg or report["spill_bytes"] == 0), report
        assert len(report["loops"]) == 2 + fold, report          # per-32 exact e8m0, [folded,] per-32
    from grouped_prefill_regs import compiled

    from dsv4.ops.triton.fp4_prefill_fp8mma import _x_operand

    for lut in (False, True):
        sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32"}
        assert "cubin" in compiled(_x_operand, sig, {"LUT": lut}, 5, 4).asm
    # the split-K decode kernel (scripts/bench/decode_kernel_sass.py): the FP8 MMA, nothing spilled in the K loops
    from decode_kernel_sass import report as decode_report

    r = decode_report(pairs=True)
    assert "QGMMA" in r["mma"] and not r["k_loop_spills"] and r["spill_bytes"] == 0, r


def test_fp8mma_dispatch_needs_the_fp8_grid_and_the_switch(monkeypatch):
    """`grouped_linear` takes the FP8-MMA variant only for x on the FP8 grid (`fp8_grid`, the MoE's act-quant
    emulation) and with DSV4_FP4_FP8MMA=1; a typo in the switch is an error, not a silent default."""
    import importlib

    module = importlib.import_module("dsv4.ops.grouped_linear")
    monkeypatch.delenv("DSV4_FP4_FP8MMA", raising=False)
    assert not module.fp8mma_applies(True)
    monkeypatch.setenv("DSV4_FP4_FP8MMA", "1")
    assert module.fp8mma_applies(True) and not module.fp8mma_applies(False)
    monkeypatch.setenv("DSV4_FP4_FP8MMA", "yes")
    with pytest.raises(ValueError, match="DSV4_FP4_FP8MMA"):
        module.fp8mma_applies(True)
    assert module.fp8mma_tiles(6144, 256) == module.fp8mma_tiles(49152, 256) == (32, 128, 4, 168)
    assert module.fp8mma_tiles(384, 256) == (16, 128, 4, None)


@pytest.mark.gpu
@torch.inference_mode()
def test_fp8mma_dispatch_on_cuda(monkeypatch):
    """With the switch on, FP8-grid calls take the variant (and others the default kernel): bit-equal to calling
    it directly with the dispatched tiles."""
    import importlib

    module = importlib.import_module("dsv4.ops.triton.fp4_prefill_fp8mma")
    dev, gen = "cuda", torch.Generator("cuda").manual_seed(33)
    pairs = [quant_fp4(torch.randn(256, 512, generator=gen, device=dev) / 16) for _ in range(16)]
    w, s = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    eid = torch.randint(0, 16, (640,), generator=gen, device=dev).sort().values
    x = fake_quant_fp8(torch.randn(640, 512, generator=gen, device=dev), 128).bfloat16()
    taken, real = [], module.fp4_grouped_gemm_fp8mma
    monkeypatch.setattr(module, "fp4_grouped_gemm_fp8mma", lambda *a, **k: taken.append(1) or real(*a, **k))
    monkeypatch.setenv("DSV4_FP4_FP8MMA", "1")
    got = ops.grouped_linear(x, eid, w, s, "fp4", fp8_grid=True)
    ops.grouped_linear(x, eid, w, s, "fp4")
    assert taken == [1]
    assert torch.equal(got, real(x, prefill.expert_offsets(eid, 16), w, s, block_m=32, block_n=128, num_warps=4,
                                 maxnreg=168))


@pytest.mark.gpu
def test_fp8mma_on_cuda_at_flash_dims():
    """Flash w1/w3 shape (K=4096, N=2048, E=256) at the 1k-prefill pair count, bf16 activations FP8-quantised as the
    model feeds them; the hardware FP8 MMA's class (module docstring): elementwise <= 2^-8 (folded 2^-6) of
    sum |x w| against the twin (on a subset of rows); the inline-PTX decode equals the plain-Triton one."""
    from dsv4.ops.triton.fp4_prefill_fp8mma import fp4_grouped_gemm_fp8mma as gemm

    dev, gen = "cuda", torch.Generator("cuda").manual_seed(32)
    pairs = [quant_fp4(torch.randn(2048, 4096, generator=gen, device=dev) / 64) for _ in range(256)]
    w, s = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    eid = torch.rand(1024, 256, generator=gen, device=dev).topk(6, dim=-1).indices.flatten().sort().values
    x = fake_quant_fp8(torch.randn(6144, 4096, generator=gen, device=dev), 128).bfloat16()
    offs = prefill.expert_offsets(eid, 256)
    twin = ops.grouped_linear.twin(x, eid, w, s, "fp4").double()
    rows = torch.arange(0, 6144, 97, device=dev)                     # the float64 abs-sum on a subset of rows
    wd = torch.stack([ops.dequant_weight(w[e], s[e], "fp4") for e in eid[rows].tolist()]).double()
    abs_sum = torch.einsum("mk,mnk->mn", x[rows].double().abs(), wd.abs())
    for fold, bound in ((False, 2.0**-8), (True, 2.0**-6)):
        got = gemm(x, offs, w, s, fold=fold)
        assert torch.equal(got, gemm(x, offs, w, s, fold=fold, asm=False))
        assert ((got[rows].double() - twin[rows]).abs() / abs_sum).max().item() <= bound
