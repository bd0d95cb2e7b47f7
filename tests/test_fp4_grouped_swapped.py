"""The expert-major FP4 grouped GEMM with swapped operands (`ops/triton/fp4_grouped_swapped.py`): out^T = W x^T,
the packed path's arithmetic with the decoded weight as the dot's left operand. Not dispatched.

Tolerances by precision class:
* against float64 (x @ dequant_fp4(W)^T in plain PyTorch): every product is exact (FP4 values times powers of two,
  x on the FP8 grid per 128 block, hence exact in fp16 after `fp16_blocks`), only the fp32 sums round: relative
  error (Frobenius) <= 1e-5, the FP4 kernels' budget (tests/test_grouped_prefill.py);
* against the existing packed kernel (`fp4_grouped_gemm_prefill(packed=...)`): the same exact products and the same
  power-of-two scalings, summed in fp32 in another order inside each 128-K block's dot. Any order of an n-term fp32
  sum is within gamma_n = n u / (1 - n u) of sum |p| (u = 2^-24, n = 128 + K / 128 adds per output: a block's dot,
  then the blocks), so elementwise |a - b| <= 2 gamma_n sum |p| (sum |p| = |x| @ |W|^T in float64), a bound that
  holds whatever the order; and relative error (Frobenius) <= 1e-6 (~17 fp32 ulps; measured 0 in the interpreter,
  ~3e-8 between tile configs of the FP4 kernels on the H200: bench/results/h200_grouped_decode.log).
* `korder=True` against element order: K permuted within each 128-K block (x's fp16 copy likewise), the same
  products summed in another order: the same two bounds; bit for bit where the fallback runs (it ignores korder).
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import exact_grouped, in_interpreter_at_once, kernel_spies

from dsv4.quant import fake_quant_fp8, quant_fp4

swapped = pytest.importorskip("dsv4.ops.triton.fp4_grouped_swapped", reason="needs triton")

_CHECK = """
import pathlib

import torch
from dsv4.ops.triton.fp4_grouped_prefill import fp4_grouped_gemm_prefill
from dsv4.ops.triton.fp4_grouped_swapped import fp4_grouped_gemm_swapped
from dsv4.quant import dequant_fp4, fake_quant_fp8, quant_fp4
from kernel_helpers import exact_grouped as exact


def rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def against_packed(got, base, mag, K):
    '''(Frobenius rel. error, max |got - base| / (2 gamma_n sum |p|)): the second must be <= 1.'''
    n = 128 + K // 128
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    return rel(got, base), ((got.double() - base.double()).abs() / (2 * gamma * mag).clamp_min(1e-300)).max().item()


KORDER = False                      # the test runs this script once as is and once with True
gen = torch.Generator().manual_seed(51)
E, N, K = 8, 80, 256
ws = [quant_fp4(torch.randn(N, K, generator=gen) / 16) for _ in range(E)]
w, s = torch.stack([a for a, _ in ws]), torch.stack([b for _, b in ws])
# 83 rows: experts 0, 2, 5, 7 empty; expert 4 owns rows 4..73 (70: five 16-row tiles, the last partial); N = 80 is
# not a multiple of block_n 32, 64 or 128. x on the FP8 grid over 12 binades of 128-block scales (the MoE's input).
eid = torch.tensor([1] * 3 + [3] + [4] * 70 + [6] * 9)
x = fake_quant_fp8(torch.randn(83, K, generator=gen) * torch.logspace(-6, 6, K)[None], 128)
to_exact, to_packed, exact_codes, saved = [], [], True, []
tiles = ({}, {'block_m': 32, 'block_n': 32}, {'block_n': 128})
want, mag = exact(x, eid, w, s)
for kw in tiles:
    got = fp4_grouped_gemm_swapped(x, eid, w, s, packed='twin', korder=KORDER, **kw)
    to_exact.append(rel(got, want))
    saved.append((got, mag))
    base = fp4_grouped_gemm_prefill(x, eid, w, s, packed='twin', block_m=kw.get('block_m', 16),
                                    block_n=kw.get('block_n', 64), num_warps=4)
    to_packed.append(against_packed(got, base, mag, K))
# bf16 x (the MoE's dtype; the fast path dots over fp16 x / s only) and int32 ids
xb = fake_quant_fp8(torch.randn(83, K, generator=gen), 128).bfloat16()
to_exact.append(rel(fp4_grouped_gemm_swapped(xb, eid.int(), w, s, packed='twin', korder=KORDER),
                    exact(xb, eid, w, s)[0]))
# random bytes (every code); scales within 24 binades per 128 block (fast path) or, for expert 4, one group per block
# 40 binades below the others: its programs take the default decode (fp32 x: IEEE fp32 dots)
wr = torch.randint(-128, 128, w.shape, dtype=torch.int8, generator=gen)
narrow = torch.randint(110, 134, s.shape, dtype=torch.uint8, generator=gen)
wide = narrow.clone()
wide[4, :, 1::4] = 80
for sb in (narrow, wide):
    want, mag = exact(x, eid, wr, sb.view(s.dtype))
    got = fp4_grouped_gemm_swapped(x, eid, wr, sb.view(s.dtype), packed='twin', block_m=32, korder=KORDER)
    to_exact.append(rel(got, want))
    saved.append((got, mag))
    base = fp4_grouped_gemm_prefill(x, eid, wr, sb.view(s.dtype), packed='twin', block_m=32, num_warps=4)
    to_packed.append(against_packed(got, base, mag, K))
# decoding, exactly: one-hot rows read back every code in both nibbles (code (k + row) % 16 at column k) under scale
# bytes spanning 0 .. 160 (the default decode) and 120 .. 126 (the fast path); 256 rows = four 64-row tiles
codes = (torch.arange(256)[None, :] + torch.arange(16)[:, None]) % 16
wq = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8).view(1, 16, 128)
for pattern in ([0, 1, 100, 127, 140, 160], [120, 126, 123, 121, 125]):
    sq = torch.tensor(pattern, dtype=torch.uint8)[torch.arange(16 * 8).view(1, 16, 8) % len(pattern)]
    sq = sq.view(torch.float8_e8m0fnu)
    got = fp4_grouped_gemm_swapped(torch.eye(256), torch.zeros(256, dtype=torch.long), wq, sq, packed='twin',
                                   block_m=64, block_n=16, korder=KORDER)
    exact_codes &= torch.equal(got, dequant_fp4(wq[0], sq[0]).T)
# a NaN scale (byte 255) in expert 3 (fast path: its block's other scales near 255) and in expert 4 (default decode)
for e, others in ((3, 250), (4, 127)):
    sn = s.clone().view(torch.uint8)
    sn[e, 7, 0:4] = others
    sn[e, 7, 2] = 255
    nan = fp4_grouped_gemm_swapped(x, eid, w, sn.view(s.dtype), packed='twin', korder=KORDER).isnan()
    exact_codes &= torch.equal(nan, exact(x, eid, w, sn.view(s.dtype))[0].isnan())
    exact_codes &= nan.sum().item() == (eid == e).sum().item()
torch.save(saved, pathlib.Path(__file__).with_name('saved.pt'))
print(exact_codes, max(to_exact), max(r for r, _ in to_packed), max(b for _, b in to_packed))
"""


def test_swapped_kernel_in_the_interpreter(tmp_path):
    """packed='twin' through TRITON_INTERPRET=1 (set before triton is imported, hence a subprocess), fp32 and bf16 x
    on the FP8 grid, in element order and with `korder` (two processes at once): within 1e-5 of float64 and within
    the order-of-summation bounds of the existing packed kernel (the module docstring), over empty experts,
    partial row and column tiles, random codes, the fast path and the default-decode fallback (scales 40 binades
    apart); every code decoded exactly on both paths; NaN scales give NaN exactly where float64 does. korder
    against element order: the same bound (the same products, summed in another order), and bit for bit on the
    rows whose programs all take the fallback (expert 4 under the wide scales), which korder does not touch."""
    scripts = {name: _CHECK.replace("KORDER = False", f"KORDER = {name == 'korder'}") for name in ("plain", "korder")}
    with in_interpreter_at_once(scripts, tmp_path, timeout=300) as runs:
        outs = {name: run.result().split() for name, run in runs.items()}
    for out in outs.values():
        exact_codes, to_exact, to_packed, bound = out[-4:]
        assert exact_codes == "True", out
        assert float(to_exact) <= 1e-5 and float(to_packed) <= 1e-6 and float(bound) <= 1.0, out
    plain, korder = (torch.load(tmp_path / name / "saved.pt") for name in ("plain", "korder"))
    n = 128 + 256 // 128
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    for (a, mag), (b, _) in zip(plain, korder, strict=True):
        assert ((a.double() - b.double()).abs() <= 2 * gamma * mag).all()
        assert ((a.double() - b.double()).norm() / a.double().norm()).item() <= 1e-6
    eid = torch.tensor([1] * 3 + [3] + [4] * 70 + [6] * 9)                # _CHECK's; the last saved case: wide
    assert torch.equal(plain[-1][0][eid == 4], korder[-1][0][eid == 4])
    assert not torch.equal(plain[-2][0], korder[-2][0])                   # (the orders do differ on the fast path)


def test_korder_x_copy_is_fp16_blocks_permuted():
    """`fp16_blocks_korder` = `fp16_blocks` with each 128-K block's columns in `K_ORDER` (a permutation) and the
    same scales, bit for bit; and K_ORDER is what `_korder_tile` assumes: dot column p = 32i + 16a + 8b + 2c + t
    holds nibble 2a + b + 4t of int32 word 4c + i (element 8 word + nibble) in the packed bytes."""
    from dsv4.ops.korder import K_ORDER as order
    from dsv4.ops.triton.fp4_grouped_prefill import fp16_blocks

    assert sorted(order.tolist()) == list(range(128))
    for p in range(128):
        i, a, b, c, t = p // 32, p // 16 % 2, p // 8 % 2, p // 2 % 4, p % 2
        assert order[p].item() == 8 * (4 * c + i) + 2 * a + b + 4 * t
    gen = torch.Generator().manual_seed(53)
    x = fake_quant_fp8(torch.randn(7, 512, generator=gen) * torch.logspace(-5, 5, 512)[None], 128).bfloat16()
    xh, s = fp16_blocks(x)
    kh, ks = swapped.fp16_blocks_korder(x)
    assert torch.equal(ks, s) and torch.equal(kh.view(7, 4, 128), xh.view(7, 4, 128)[:, :, order])


def test_swapped_names_bad_inputs():
    w, s = torch.zeros(3, 16, 64, dtype=torch.int8), torch.zeros(3, 16, 4, dtype=torch.uint8)
    x, eid = torch.zeros(5, 128), torch.zeros(5, dtype=torch.long)
    gemm = swapped.fp4_grouped_gemm_swapped
    with pytest.raises(ValueError, match="do not match"):
        gemm(x[:, :64], eid, w, s, packed="twin")
    for kw in ({}, {"packed": False}, {"packed": "yes"}):                    # packed=True (the default): CUDA only
        with pytest.raises(ValueError, match="packed must be"):
            gemm(x, eid, w, s, **kw)
    w3, s3 = torch.zeros(3, 16, 192, dtype=torch.int8), torch.zeros(3, 16, 12, dtype=torch.uint8)
    with pytest.raises(ValueError, match="power of two"):                    # K / 128 = 3
        gemm(torch.zeros(5, 384), eid, w3, s3, packed="twin")
    with pytest.raises(ValueError, match="powers of"):
        gemm(x, eid, w, s, packed="twin", block_n=48)
    with pytest.raises(ValueError, match="int32/int64"):
        gemm(x, eid.float(), w, s, packed="twin")
    with pytest.raises(ValueError, match="4-byte aligned"):                # korder reads int32 words
        gemm(x, eid, torch.zeros(3 * 16 * 64 + 1, dtype=torch.int8)[1:].view(3, 16, 64), s, packed="twin",
             korder=True)
    assert gemm(x[:0], eid[:0], w, s, packed="twin").shape == (0, 16)


def _fp16_mma_loop_opcodes(cubin: bytes) -> list[str]:
    """Opcodes of the innermost loop(s) of the SASS (nvdisasm) that run an fp16 wgmma (HGMMA without .BF16: the
    fast path's K loop; the fallback's wgmmas are bf16 in these compiles)."""
    from dsv4.bench.sass import disassemble, innermost_loops, opcodes

    return [op for body in innermost_loops(disassemble(cubin))
            if any("HGMMA" in x and ".BF16" not in x for x in body) for op in opcodes(body)]


def test_swapped_compiles_for_hopper_with_the_weight_in_registers():
    """Compiled offline for sm_90 at Flash's shape (K 4096) with the decode-batch tile (16 tokens x 64 weight rows,
    4 warps) and a larger one, in element order and with KORDER: the dots of both paths (fp16: fast path, bf16:
    fallback) are wgmmas whose A operand, the decoded weight, comes from registers (a dot-operand layout, not a
    shared-memory descriptor). Element order: the PTX holds the packed decode. KORDER: the fast path's K loop reads
    the weight with 128-bit shared-memory loads, no byte loads (LDS.U8) and no byte permutes (PRMT), where element
    order has 32 LDS.U8 and ~80 PRMT per thread and block (the module docstring). Only a GPU can time it
    (scripts/bench/grouped_prefill.py --only swapped)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    sig = {"x_ptr": "*bf16", "xh_ptr": "*fp16", "xs_ptr": "*fp32", "offs_ptr": "*i32", "w_ptr": "*i8",
           "s_ptr": "*u8", "out_ptr": "*fp32", "N": "i32", "K": "i32"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(sig))}           # what a real launch passes
    for (bm, bn, warps), korder in ((c, k) for c in ((16, 64, 4), (32, 128, 8)) for k in (False, True)):
        consts = {"HALF": 2048, "N_SCALES": 128, "BLOCK_M": bm, "BLOCK_N": bn, "IEEE": False, "ASM": True,
                  "KORDER": korder, "UNROLL": 1, "TILED": False}
        src = ASTSource(swapped._fp4_grouped_swapped, {**sig, **dict.fromkeys(consts, "constexpr")}, consts, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                                 "num_stages": 3})
        a_types = [line.split(" : ")[-1].split(" * ")[0] for line in kernel.asm["ttgir"].splitlines()
                   if "ttng.warp_group_dot " in line]                    # (the pipeliner may peel copies)
        assert all("dot_op<{opIdx = 0" in t for t in a_types), a_types
        assert any("xf16" in t for t in a_types) and any("xbf16" in t for t in a_types), a_types
        assert kernel.asm["cubin"] and "mul.rn.f16x2" in kernel.asm["ptx"]
        if korder:
            ops = _fp16_mma_loop_opcodes(kernel.asm["cubin"])
            assert "LDS.128" in ops and "LDS.U8" not in ops and "PRMT" not in ops, sorted(set(ops))
    # over the tile-major layout (`dsv4.ops.fp4_layout`) the weight still arrives as 16-byte copies (the address
    # helpers' // and % keep Triton's contiguity): the same loads as the stored layout's, a K loop no longer
    loads = {}
    for tiled in (False, True):
        consts = {"HALF": 2048, "N_SCALES": 128, "BLOCK_M": 16, "BLOCK_N": 64, "IEEE": False, "ASM": True,
                  "KORDER": True, "UNROLL": 1, "TILED": tiled}
        src = ASTSource(swapped._fp4_grouped_swapped, {**sig, **dict.fromkeys(consts, "constexpr")}, consts, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        loop = _fp16_mma_loop_opcodes(kernel.asm["cubin"])
        loads[tiled] = (sorted(op for op in loop if op.startswith(("LDG", "LDS"))), len(loop))
    assert loads[True][0] == loads[False][0] and loads[True][1] <= loads[False][1], loads


@pytest.mark.gpu
def test_swapped_on_cuda_at_flash_decode_dims():
    """Flash w1/w3 (K 4096 -> N 2048, 256 experts) at decode batch 64 (384 pairs sorted by expert), bf16 x on the
    FP8 grid as the MoE feeds it, in element order and with `korder` (a 32 x 128 tile too): the inline PTX equals
    the 'twin' decode bit for bit (same arithmetic, same dots); against the existing packed kernel at its
    dispatched decode tile (16 x 64, 4 warps) within the order-of-summation bounds (module docstring; the bound
    with u = 2^-23, for the tensor cores' truncating fp32 adds); within 1e-5 of float64."""
    from dsv4.ops.triton.fp4_grouped_prefill import fp4_grouped_gemm_prefill

    dev, gen = "cuda", torch.Generator("cuda").manual_seed(52)
    pairs = [quant_fp4(torch.randn(2048, 4096, generator=gen, device=dev) / 64) for _ in range(256)]
    w, s = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    eid = torch.rand(64, 256, generator=gen, device=dev).topk(6, dim=-1).indices.flatten().sort().values
    x = fake_quant_fp8(torch.randn(384, 4096, generator=gen, device=dev), 128).bfloat16()
    base = fp4_grouped_gemm_prefill(x, eid, w, s, block_m=16, block_n=64, num_warps=4, packed=True)
    want, mag = exact_grouped(x, eid, w, s)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    n = 128 + 4096 // 128
    gamma = n * 2.0**-23 / (1 - n * 2.0**-23)
    for kw in ({}, {"korder": True}, {"korder": True, "block_m": 32, "block_n": 128, "num_warps": 8}):
        got = swapped.fp4_grouped_gemm_swapped(x, eid, w, s, **kw)
        assert torch.equal(got, swapped.fp4_grouped_gemm_swapped(x, eid, w, s, packed="twin", **kw)), kw
        assert ((got.double() - base.double()).abs() <= 2 * gamma * mag).all(), kw
        assert rel(got, base) <= 1e-6, kw
        assert rel(got, want) <= 1e-5, kw



def test_swapped_tiles_regimes():
    """The opt-in swapped dispatch covers decode batches and 1k prefill, not 8k (where it measured slower)."""
    from dsv4.ops.grouped_linear import swapped_tiles

    assert swapped_tiles(384, 256) == (16, 64, 4)            # decode batch 64, top-6
    assert swapped_tiles(6144, 256) == (32, 64, 4)           # 1k prefill
    assert swapped_tiles(49152, 256) is None                 # 8k prefill: the 128 x 128 expert-major tiles


def test_swapped_dispatch_on_by_default(monkeypatch):
    """Spies stand in for the kernels (CPU): below 96 rows per expert the swapped kernel runs unless
    DSV4_FP4_SWAPPED=0, K-ordered for a 4-byte-aligned weight, with `swapped_tiles`; from 96 rows per expert the
    expert-major kernel; other values of the switch raise."""
    import importlib

    grouped_linear = importlib.import_module("dsv4.ops.grouped_linear")
    prefill = importlib.import_module("dsv4.ops.triton.fp4_grouped_prefill")
    seen = kernel_spies(monkeypatch, swapped=(swapped, "fp4_grouped_gemm_swapped"),
                        expert_major=(prefill, "fp4_grouped_gemm_prefill"))
    w, s = torch.zeros(1, 8, 64, dtype=torch.int8), torch.zeros(1, 8, 4, dtype=torch.uint8)
    for rows, env, want in ((15, None, "swapped"), (95, None, "swapped"), (96, None, "expert_major"),
                            (15, "1", "swapped"), (15, "0", "expert_major"), (95, "0", "expert_major")):
        if env is None:
            monkeypatch.delenv("DSV4_FP4_SWAPPED", raising=False)
        else:
            monkeypatch.setenv("DSV4_FP4_SWAPPED", env)
        grouped_linear._fp4_grouped_gemm_prefill(torch.zeros(rows, 128), torch.zeros(rows, dtype=torch.long), w, s,
                                                 False)
        assert seen[-1][0] == want, (rows, env, seen[-1])
        if want == "swapped":
            tiles = grouped_linear.swapped_tiles(rows, 1)
            assert seen[-1][1] == dict(block_m=tiles[0], block_n=tiles[1], num_warps=tiles[2], korder=True,
                                       unroll=1)
    monkeypatch.setenv("DSV4_FP4_SWAPPED", "yes")
    with pytest.raises(ValueError, match="DSV4_FP4_SWAPPED"):
        grouped_linear._fp4_grouped_gemm_prefill(torch.zeros(15, 128), torch.zeros(15, dtype=torch.long), w, s, False)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [384, 6144])
def test_swapped_dispatch_switch_on_cuda(rows, monkeypatch):
    """By default (DSV4_FP4_SWAPPED unset) `grouped_linear` below 96 rows per expert (decode batch 64: 384 pairs;
    1k prefill: 6144) runs the swapped kernel at `swapped_tiles`, K-ordered, where the bf16-decode kernel does not
    take the call (DSV4_FP4_DIRECT=0 here: by default it takes 1k prefill); DSV4_FP4_SWAPPED=0 the expert-major
    kernel. Within 1e-5 of the twin (FP4 products exact, fp32 sums) and within 1e-6 of the expert-major kernel
    (same products, another order of fp32 sums)."""
    from dsv4.ops.grouped_linear import grouped_linear

    calls = []
    real = swapped.fp4_grouped_gemm_swapped
    monkeypatch.setattr(swapped, "fp4_grouped_gemm_swapped", lambda *a, **k: calls.append(k) or real(*a, **k))
    dev, gen = "cuda", torch.Generator("cuda").manual_seed(53)
    pairs = [quant_fp4(torch.randn(512, 1024, generator=gen, device=dev) / 32) for _ in range(64)]
    w, s = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    rows = rows // 4                                     # 64 experts here: the same rows per expert as 256 at Flash
    eid = torch.randint(0, 64, (rows,), generator=gen, device=dev).sort().values
    x = fake_quant_fp8(torch.randn(rows, 1024, generator=gen, device=dev), 128).bfloat16()
    monkeypatch.delenv("DSV4_FP4_SWAPPED", raising=False)
    monkeypatch.setenv("DSV4_FP4_DIRECT", "0")          # from 16 rows per expert bf16 x takes fp4_grouped_direct
    with torch.no_grad():
        got = grouped_linear(x, eid, w, s, "fp4")
        assert len(calls) == 1 and calls[0]["korder"], calls
        monkeypatch.setenv("DSV4_FP4_SWAPPED", "0")
        default = grouped_linear(x, eid, w, s, "fp4")
        assert len(calls) == 1
        twin = grouped_linear.twin(x, eid, w, s, "fp4")
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    assert rel(got, default) <= 1e-6
    assert rel(got, twin) <= 1e-5
