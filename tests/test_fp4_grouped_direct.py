"""The expert-major FP4 grouped GEMM decoded straight to bf16 (`ops/triton/fp4_grouped_direct.py`).

Tolerances by precision class: every product is exact (FP4 values times a power of two, against x in bf16 or fp32:
bf16 x bf16 and the twin's fp32 x (e2m1 * 2^k) fit fp32's 24 bits), so only the fp32 sums round, in one
accumulator over all of K (n = K adds per output). Any order of an n-term fp32 sum is within
gamma_n = n u / (1 - n u) of sum |p|, so elementwise |got - float64| <= gamma_K * sum |p| (sum |p| = |x| @ |W|^T in
float64), and between two orders 2 gamma_K sum |p|; u = 2^-24 in the interpreter, 2^-23 on the tensor cores (their
fp32 adds truncate). Also relative error (Frobenius) <= 1e-5, the FP4 kernels' budget (tests/test_grouped_prefill.py).
Decoding is checked bit for bit: one-hot rows read every code back exactly, on the fast path (scale bytes 16 .. 128,
the bf16 decode's range, both ends included) and on the per-element fallback (bytes 0 .. 160).
"""

from __future__ import annotations

import re

import pytest
import torch
from kernel_helpers import exact_grouped, kernel_spies, run_in_interpreter

from dsv4.quant import dequant_fp4, fake_quant_fp8, quant_fp4

direct = pytest.importorskip("dsv4.ops.triton.fp4_grouped_direct", reason="needs triton")

_CHECK = """
import torch
from dsv4.ops.triton.fp4_grouped_direct import fp4_grouped_gemm_direct
from dsv4.quant import dequant_fp4, fake_quant_fp8, quant_fp4
from kernel_helpers import exact_grouped as exact


def check(got, x, eid, w, s):
    '''(Frobenius rel. error, max |got - float64| / (gamma_K sum |p|)): the second must be <= 1.'''
    want, mag = exact(x, eid, w, s)
    n = x.shape[1]
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    bound = ((got.double() - want).abs() / (gamma * mag).clamp_min(1e-300)).max().item()
    return ((got.double() - want).norm() / want.norm()).item(), bound


gen = torch.Generator().manual_seed(61)
E, N, K = 8, 80, 256
ws = [quant_fp4(torch.randn(N, K, generator=gen) / 16) for _ in range(E)]
w, s = torch.stack([a for a, _ in ws]), torch.stack([b for _, b in ws])
# 83 rows: experts 0, 2, 5, 7 empty; expert 4 owns rows 4..73 (70: five 16-row tiles, the last partial); N = 80 is
# not a multiple of block_n. x on the FP8 grid over 12 binades of 128-block scales (the MoE's input).
eid = torch.tensor([1] * 3 + [3] + [4] * 70 + [6] * 9)
x = fake_quant_fp8(torch.randn(83, K, generator=gen) * torch.logspace(-6, 6, K)[None], 128)
errs = [check(fp4_grouped_gemm_direct(x, eid, w, s, asm=False, **kw), x, eid, w, s)
        for kw in ({}, {'block_m': 32, 'block_n': 32}, {'block_m': 16, 'block_n': 128, 'xperm': True})]
xb = fake_quant_fp8(torch.randn(83, K, generator=gen), 128).bfloat16()           # bf16 x (the MoE's) + int32 ids
errs += [check(fp4_grouped_gemm_direct(xb, eid.int(), w, s, asm=False, xperm=xp), xb, eid, w, s) for xp in (0, 1)]
# random bytes (every code) under scales in the fast range, and with expert 4's scales partly outside it (bytes 10
# and 140: its programs take the per-element fallback, fp32 x: IEEE dots)
wr = torch.randint(-128, 128, w.shape, dtype=torch.int8, generator=gen)
inside = torch.randint(110, 129, s.shape, dtype=torch.uint8, generator=gen)
outside = inside.clone()
outside[4, :, 1::4], outside[4, 3, 0] = 10, 140
for sb in (inside, outside):
    errs.append(check(fp4_grouped_gemm_direct(x, eid, wr, sb.view(s.dtype), asm=False, block_m=32, xperm=True), x,
                      eid, wr, sb.view(s.dtype)))
# decoding, exactly: one-hot rows read back every code in both nibbles (code (k + row) % 16 at column k)
codes = (torch.arange(256)[None, :] + torch.arange(16)[:, None]) % 16
wq = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8).view(1, 16, 128)
exact_codes = True
for pattern in ([0, 1, 100, 127, 140, 160], [16, 128, 120, 17, 127]):
    sq = torch.tensor(pattern, dtype=torch.uint8)[torch.arange(16 * 8).view(1, 16, 8) % len(pattern)]
    sq = sq.view(torch.float8_e8m0fnu)
    got = fp4_grouped_gemm_direct(torch.eye(256), torch.zeros(256, dtype=torch.long), wq, sq, asm=False,
                                  block_m=64, block_n=16)
    exact_codes &= torch.equal(got, dequant_fp4(wq[0], sq[0]).T)
# a NaN scale (byte 255) in expert 3 gives NaN exactly in its rows' column 7, as float64 does
sn = s.clone().view(torch.uint8)
sn[3, 7, 2] = 255
nan = fp4_grouped_gemm_direct(x, eid, w, sn.view(s.dtype), asm=False).isnan()
exact_codes &= torch.equal(nan, exact(x, eid, w, sn.view(s.dtype))[0].isnan()) and nan.sum().item() == 1
# The MoE's layouts (ops/korder.py), N = 128: x already K-ordered reads the same values (fast path: bit for bit;
# the fallback runs its own loop over K-ordered blocks: against float64); K-ordered output columns are weight rows
# K_ORDER[p] (against float64 permuted); the bf16 store is the fp32 result rounded; out_index scatters the rows
# (row m to row perm[m]).
from dsv4.ops.korder import to_korder
ws = [quant_fp4(torch.randn(128, K, generator=gen) / 16) for _ in range(E)]
wl, sl = torch.stack([a for a, _ in ws]), torch.stack([b for _, b in ws])
wide = sl.clone().view(torch.uint8)
wide[4, :, 1::4] = 10                                              # expert 4's programs: the fallback
perm = torch.randperm(83, generator=gen)
for xx, sb, kw in ((x, sl, {}), (xb, sl, {'block_m': 32, 'xperm': True}),
                   (x, wide.view(sl.dtype), {'block_m': 32, 'block_n': 128})):
    plain = fp4_grouped_gemm_direct(xx, eid, wl, sb, asm=False, **kw)
    xkord = fp4_grouped_gemm_direct(to_korder(xx), eid, wl, sb, asm=False, x_korder=True, **kw)
    errs.append(check(xkord, xx, eid, wl, sb))
    fast = eid != 4 if sb is not sl else torch.ones_like(eid, dtype=torch.bool)
    exact_codes &= torch.equal(xkord[fast], plain[fast]) and (sb is sl or not torch.equal(xkord, plain))
    got = fp4_grouped_gemm_direct(to_korder(xx), eid, wl, sb, asm=False, x_korder=True, out_korder=True,
                                  out_dtype=torch.bfloat16, out_index=perm, **kw)
    full = fp4_grouped_gemm_direct(xx, eid, wl, sb, asm=False, out_korder=True, **kw)
    # (Triton 3.6's interpreter truncates fp32 -> bf16 whatever the rounding asked; the GPU test checks RNE)
    trunc = (full.view(torch.int32) & -65536).view(torch.float32).bfloat16()
    exact_codes &= got.dtype == torch.bfloat16 and (torch.equal(got[perm], full.bfloat16())
                                                    or torch.equal(got[perm], trunc))
    want, mag = exact(xx, eid, wl, sb)
    gamma = K * 2.0**-24 / (1 - K * 2.0**-24)
    errs.append((((full.double() - to_korder(want)).norm() / want.norm()).item(),
                 ((full.double() - to_korder(want)).abs() / (gamma * to_korder(mag)).clamp_min(1e-300)).max().item()))
print(exact_codes, max(r for r, _ in errs), max(b for _, b in errs))
"""


def test_direct_kernel_in_the_interpreter(tmp_path):
    """asm=False (the fp32 twin) through TRITON_INTERPRET=1, x K-ordered by a copy and in the kernel (`xperm`): fp32
    and bf16 x on the FP8 grid, three tiles, empty
    experts, partial row and column tiles, random codes, the fast path and the per-element fallback (scale bytes
    outside 16 .. 128): within 1e-5 and gamma_K sum |p| of float64; every code decoded exactly on both paths; a NaN
    scale gives NaN exactly where float64 does."""
    exact_codes, rel, bound = run_in_interpreter(_CHECK, tmp_path, timeout=300).split()[-3:]
    assert exact_codes == "True"
    assert float(rel) <= 1e-5 and float(bound) <= 1.0, (rel, bound)


def test_korder_copy_is_the_swapped_k_order():
    """`korder.to_korder` (the direct kernel's copy of x) writes each 128-K block's columns in `K_ORDER` (the
    order `_bf16_tile` decodes in), bit for bit, in the dtype asked."""
    from dsv4.ops.korder import K_ORDER, to_korder

    x = torch.randn(5, 384, dtype=torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float32):
        got = to_korder(x, dtype)
        assert got.dtype == dtype and torch.equal(got.view(5, 3, 128), x.to(dtype).view(5, 3, 128)[:, :, K_ORDER])


def test_direct_names_bad_inputs():
    w, s = torch.zeros(3, 16, 64, dtype=torch.int8), torch.zeros(3, 16, 4, dtype=torch.uint8)
    x, eid = torch.zeros(5, 128), torch.zeros(5, dtype=torch.long)
    gemm = direct.fp4_grouped_gemm_direct
    with pytest.raises(ValueError, match="do not match"):
        gemm(x[:, :64], eid, w, s, asm=False)
    with pytest.raises(ValueError, match="asm=True takes bf16 x on CUDA"):
        gemm(x, eid, w, s)
    for kw in ({"block_n": 48}, {"block_m": 512}, {"block_m": 8}):
        with pytest.raises(ValueError, match=r"powers of|block_m=8 >= 16"):
            gemm(x, eid, w, s, asm=False, **kw)
    with pytest.raises(ValueError, match="int32/int64"):
        gemm(x, eid.float(), w, s, asm=False)
    with pytest.raises(ValueError, match="4-byte aligned"):
        gemm(x, eid, torch.zeros(3 * 16 * 64 + 1, dtype=torch.int8)[1:].view(3, 16, 64), s, asm=False)
    assert gemm(x[:0], eid[:0], w, s, asm=False).shape == (0, 16)


def test_direct_compiles_for_hopper_with_the_weight_in_registers():
    """Compiled offline for sm_90 at Flash's shape (K 4096) with the 8k tile (256 tokens x 128 weight rows, 8 warps)
    and the 1k one (32 x 64, 4 warps, x permuted in the kernel), each also with the MoE's layouts (K-ordered x and
    output columns, bf16 rows scattered by an index): the fast path's dot is a bf16 wgmma whose A
    operand, the decoded weight, comes from registers, the decode is the inline `mul.rn.bf16x2`, and nothing spills
    inside the K loops (256 x 128 with x permuted in the kernel does: that mutant fails here)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    for bm, bn, warps, stages, xperm, moe in ((256, 128, 8, 3, False, False), (32, 64, 4, 3, True, False),
                                              (256, 128, 8, 3, False, True), (32, 64, 4, 3, False, True)):
        # moe: the MoE's layouts (K-ordered x and output columns, bf16 rows scattered by an index)
        sig = {"x_ptr": "*bf16", "xk_ptr": "*bf16", "offs_ptr": "*i32", "w_ptr": "*i8", "s_ptr": "*u8",
               "out_ptr": "*bf16" if moe else "*fp32", "index_ptr": "*i64", "N": "i32", "K": "i32"}
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(sig))}       # what a real launch passes
        consts = {"HALF": 2048, "N_SCALES": 128, "BLOCK_M": bm, "BLOCK_N": bn, "IEEE": False, "ASM": True,
                  "LO": direct.FAST_SCALES[0], "HI": direct.FAST_SCALES[1], "XPERM": xperm, "X_KORDER": moe,
                  "OUT_KORDER": moe, "INDEX": moe, "UNROLL": 1, "TILED": False}
        src = ASTSource(direct._fp4_grouped_direct, {**sig, **dict.fromkeys(consts, "constexpr")}, consts, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                                 "num_stages": stages})
        a_types = [line.split(" : ")[-1].split(" * ")[0] for line in kernel.asm["ttgir"].splitlines()
                   if "ttng.warp_group_dot " in line]
        assert a_types and all("dot_op<{opIdx = 0" in t and "xbf16" in t for t in a_types), a_types
        assert "mul.rn.bf16x2" in kernel.asm["ptx"]
        loops = _mma_loops(kernel.asm["cubin"])
        assert loops and not any(re.search(r"\s(LDL|STL)[\s.]", line) for body in loops for line in body)
        # fits an H100's / H200's 227 KiB of shared memory per block (a 128-column fallback step for K-ordered x
        # doubled it to 416 KiB, found on the GPU only: the offline compile does not check)
        assert kernel.metadata.shared <= 232448, (bm, bn, moe, kernel.metadata.shared)
        # the output stores are vector stores with the layouts too (scalar stores: 4x the STG, slower at 1k)
        stores = [m.group(0) for m in re.finditer(r"STG\S*", _sass(kernel.asm["cubin"]))]
        assert stores and all(s.startswith(("STG.E.64", "STG.E.128")) for s in stores), (bm, bn, moe, stores)


def _sass(cubin: bytes) -> str:
    """The kernel's SASS (nvdisasm)."""
    from dsv4.bench.sass import disassemble

    return "\n".join(disassemble(cubin))


def _mma_loops(cubin: bytes) -> list[list[str]]:
    """The SASS lines of each innermost loop that runs a wgmma."""
    from dsv4.bench.sass import disassemble, innermost_loops

    return [body for body in innermost_loops(disassemble(cubin)) if any("HGMMA" in x for x in body)]


def _flash_case(dev, gen, tokens: int, experts: int):
    """Flash's w1/w3 shape (K 4096 -> N 2048) over `experts` experts, `tokens` x top-6 sorted pairs (the rows per
    expert of 256 experts at 256 / experts times the tokens), bf16 x on the FP8 grid as the MoE feeds it."""
    pairs = [quant_fp4(torch.randn(2048, 4096, generator=gen, device=dev) / 64) for _ in range(experts)]
    w, s = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    eid = torch.rand(tokens, experts, generator=gen, device=dev).topk(6, dim=-1).indices.flatten().sort().values
    x = fake_quant_fp8(torch.randn(tokens * 6, 4096, generator=gen, device=dev), 128).bfloat16()
    want, mag = exact_grouped(x, eid, w, s)
    return x, eid, w, s, want, mag


@pytest.mark.gpu
def test_direct_on_cuda_at_flash_dims():
    """Flash w1/w3 at the 8k regime (~190 rows per expert: 2048 tokens over 64 experts) and the 1k regime (~24:
    256 tokens), at the tiles `direct_tiles` picks and others: the inline-PTX bf16 decode within 1e-5 and
    gamma_K sum |p| (u = 2^-23) of float64, and within 2 gamma_K sum |p| of the fp32 twin on the same GPU (the same
    exact products, summed in another order). One-hot rows read every code back exactly under scale bytes 16 .. 128
    (the bf16 decode: the code 0.5 passes through a subnormal bf16 before its scale) and, on the fallback, 0 .. 160.
    x K-ordered by a copy and in the kernel (`xperm`) alike."""
    from dsv4.ops.grouped_linear import direct_tiles

    dev, gen = "cuda", torch.Generator("cuda").manual_seed(62)
    n = 4096
    gamma = n * 2.0**-23 / (1 - n * 2.0**-23)
    for tokens, tiles in ((2048, [(256, 128, 8, 2, False), (128, 128, 8, 3, True)]),
                          (256, [(32, 64, 4, 3, False), (64, 64, 4, 3, True)])):
        x, eid, w, s, want, mag = _flash_case(dev, gen, tokens, 64)
        dispatched = direct_tiles(tokens * 6 * 4, 256)                       # the dispatch at 256 experts
        twin = direct.fp4_grouped_gemm_direct(x, eid, w, s, asm=False, block_m=64, block_n=64, num_warps=4)
        for bm, bn, nw, st, xp in [dispatched, *tiles]:
            got = direct.fp4_grouped_gemm_direct(x, eid, w, s, block_m=bm, block_n=bn, num_warps=nw, num_stages=st,
                                                 xperm=xp)
            assert ((got.double() - want).abs() <= gamma * mag).all(), (tokens, bm, bn)
            assert ((got.double() - twin.double()).abs() <= 2 * gamma * mag).all(), (tokens, bm, bn)
            assert ((got.double() - want).norm() / want.norm()).item() <= 1e-5, (tokens, bm, bn)
    codes = (torch.arange(256, device=dev)[None, :] + torch.arange(16, device=dev)[:, None]) % 16
    wq = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8).view(1, 16, 128)
    eye = torch.eye(256, device=dev, dtype=torch.bfloat16)
    for pattern in ([16, 128, 120, 17, 127], [0, 1, 100, 127, 140, 160]):
        sq = torch.tensor(pattern, dtype=torch.uint8, device=dev)[torch.arange(128, device=dev).view(1, 16, 8)
                                                                   % len(pattern)].view(torch.float8_e8m0fnu)
        for xp in (False, True):
            got = direct.fp4_grouped_gemm_direct(eye, torch.zeros(256, dtype=torch.long, device=dev), wq, sq,
                                                 block_m=64, block_n=64, num_warps=4, xperm=xp)
            assert torch.equal(got, dequant_fp4(wq[0], sq[0]).T), (pattern, xp)


def test_direct_tiles_regimes():
    """The token tile follows the rows per expert (wgmma's N up to 256); None below the dispatch threshold."""
    from dsv4.ops.grouped_linear import direct_tiles

    assert direct_tiles(49152, 256) == (256, 128, 8, 3, False)      # 8k prefill: ~192 rows per expert, one tile
    assert direct_tiles(6144, 256) == (32, 64, 4, 3, True)          # 1k prefill: ~24
    assert direct_tiles(384, 256) is None                    # decode batch 64: the swapped kernel's regime


def test_direct_dispatch(monkeypatch):
    """Spies stand in for the kernels (CPU): from 16 rows per expert, bf16 x and a 4-byte-aligned weight take the
    bf16-decode kernel at `direct_tiles` when DSV4_FP4_DIRECT allows (default: `DIRECT_DEFAULT`); fp32 x (which it
    would round), fewer rows or the switch off fall through to the swapped / expert-major kernels."""
    import importlib

    grouped_linear = importlib.import_module("dsv4.ops.grouped_linear")
    swapped = importlib.import_module("dsv4.ops.triton.fp4_grouped_swapped")
    prefill = importlib.import_module("dsv4.ops.triton.fp4_grouped_prefill")
    seen = kernel_spies(monkeypatch, direct=(direct, "fp4_grouped_gemm_direct"),
                        swapped=(swapped, "fp4_grouped_gemm_swapped"),
                        expert_major=(prefill, "fp4_grouped_gemm_prefill"))
    w, s = torch.zeros(1, 8, 64, dtype=torch.int8), torch.zeros(1, 8, 4, dtype=torch.uint8)
    default = "direct" if grouped_linear.DIRECT_DEFAULT else "swapped"
    for rows, dtype, env, want in ((15, torch.bfloat16, "1", "swapped"), (16, torch.bfloat16, "1", "direct"),
                                   (200, torch.bfloat16, "1", "direct"), (16, torch.float32, "1", "swapped"),
                                   (200, torch.float32, "1", "expert_major"), (16, torch.bfloat16, "0", "swapped"),
                                   (16, torch.bfloat16, None, default)):
        if env is None:
            monkeypatch.delenv("DSV4_FP4_DIRECT", raising=False)
        else:
            monkeypatch.setenv("DSV4_FP4_DIRECT", env)
        grouped_linear._fp4_grouped_gemm_prefill(torch.zeros(rows, 128, dtype=dtype),
                                                 torch.zeros(rows, dtype=torch.long), w, s, False)
        assert seen[-1][0] == want, (rows, dtype, env, seen[-1])
        if want == "direct":
            bm, bn, nw, st, xp = grouped_linear.direct_tiles(rows, 1)
            assert seen[-1][1] == dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=st, xperm=xp,
                                       x_korder=False, out_korder=False, out_dtype=torch.float32, out_index=None,
                                       unroll=1)


@pytest.mark.gpu
def test_direct_dispatch_on_cuda(monkeypatch):
    """Through `grouped_linear` with DSV4_FP4_DIRECT=1 (the default) at the 8k regime (~190 rows per expert): the
    bf16-decode kernel runs and agrees with the expert-major kernel (switch off) within 1e-6 and with the twin within
    1e-5."""
    from dsv4.ops.grouped_linear import grouped_linear

    calls = []
    real = direct.fp4_grouped_gemm_direct
    monkeypatch.setattr(direct, "fp4_grouped_gemm_direct", lambda *a, **k: calls.append(k) or real(*a, **k))
    dev, gen = "cuda", torch.Generator("cuda").manual_seed(63)
    pairs = [quant_fp4(torch.randn(512, 1024, generator=gen, device=dev) / 32) for _ in range(16)]
    w, s = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    eid = torch.randint(0, 16, (3072,), generator=gen, device=dev).sort().values
    x = fake_quant_fp8(torch.randn(3072, 1024, generator=gen, device=dev), 128).bfloat16()
    with torch.no_grad():
        monkeypatch.setenv("DSV4_FP4_DIRECT", "1")
        got = grouped_linear(x, eid, w, s, "fp4")
        assert len(calls) == 1, calls
        monkeypatch.setenv("DSV4_FP4_DIRECT", "0")
        other = grouped_linear(x, eid, w, s, "fp4")
        assert len(calls) == 1
        twin = grouped_linear.twin(x, eid, w, s, "fp4")
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    assert rel(got, other) <= 1e-6
    assert rel(got, twin) <= 1e-5


@pytest.mark.gpu
def test_direct_layouts_on_cuda_at_flash_dims():
    """The MoE's layouts (`dsv4.ops.korder`) at Flash's w1/w3 shape in the 8k and 1k regimes, at the dispatched
    tiles: x given K-ordered, K-ordered output columns, the bf16 store and the row scatter together equal the plain
    call's fp32 result permuted and rounded to nearest even, bit for bit (the same tile data in the same order; only
    where it is stored differs). With some scale bytes outside 16 .. 128 (their programs take the fallback, which
    has its own loop for K-ordered x) within gamma_K sum |p| (u = 2^-23) of float64."""
    from dsv4.ops.grouped_linear import direct_tiles
    from dsv4.ops.korder import to_korder

    dev, gen = "cuda", torch.Generator("cuda").manual_seed(64)
    gamma = 4096 * 2.0**-23 / (1 - 4096 * 2.0**-23)
    for tokens in (2048, 256):
        x, eid, w, s, want, mag = _flash_case(dev, gen, tokens, 64)
        bm, bn, nw, st, xp = direct_tiles(tokens * 6 * 4, 256)
        kw = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=st, xperm=xp)
        plain = direct.fp4_grouped_gemm_direct(x, eid, w, s, **kw)
        perm = torch.randperm(x.shape[0], generator=gen, device=dev)
        got = direct.fp4_grouped_gemm_direct(to_korder(x), eid, w, s, x_korder=True, out_korder=True,
                                             out_dtype=torch.bfloat16, out_index=perm, **kw)
        assert got.dtype == torch.bfloat16 and torch.equal(got[perm], to_korder(plain).bfloat16()), tokens
        wide = s.clone().view(torch.uint8)
        wide[3, :, 1::4] = 10
        got = direct.fp4_grouped_gemm_direct(to_korder(x), eid, w, wide.view(s.dtype), x_korder=True, **kw)
        want, mag = exact_grouped(x, eid, w, wide.view(s.dtype))
        assert ((got.double() - want).abs() <= gamma * mag).all(), tokens


@pytest.mark.gpu
def test_moe_takes_korder_on_cuda_with_the_same_bits(tiny_ckpt, monkeypatch):
    """The MoE's sorted path at prefill size on the GPU (512 pairs over 8 experts: the direct kernel's regime) asks
    for K order (`korder_pays`), and its output equals the same path in element order bit for bit."""
    import dsv4
    import dsv4.model.moe as moe_module

    model = dsv4.load_model(tiny_ckpt, device="cuda", dtype=torch.bfloat16, quant_emulation=True, progress=False)
    moe = model.layers[2].ffn
    x = torch.randn(256, model.cfg.dim, generator=torch.Generator().manual_seed(26)).bfloat16().cuda()
    real, asked = moe_module.korder_pays, []
    with torch.inference_mode():
        weights, ids = moe.gate(x, torch.zeros(256, dtype=torch.long, device="cuda"))
        monkeypatch.setattr(moe_module, "korder_pays", lambda *a: asked.append(real(*a)) or asked[-1])
        got = moe.routed_sorted(x, weights, ids)
        monkeypatch.setattr(moe_module, "korder_pays", lambda *a: False)
        plain = moe.routed_sorted(x, weights, ids)
    assert asked == [True]
    assert torch.equal(got, plain)
