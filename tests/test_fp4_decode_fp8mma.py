"""The split-K FP8-MMA decode kernel (`ops/triton/fp4_decode_fp8mma.py`) against float64 and the twin.

Precision class (as tests/test_fp4_prefill_fp8mma.py derives it): x on the FP8 grid per 128 block and e2m1 weights
give exact products and power-of-two scalings, so only the order of fp32 additions is left: a 32-term dot per
sub-block, 4 sub-block partials per block, K / 128 / split block sums per split, `split` partials summed by the
caller: n <= 32 + 4 + K / 128 + split additions per output, |got - exact| <= n * 2^-24 * sum |x w| in the CPU
interpreter (fp32 dots). On the GPU the FP8 MMA's own accumulation (below fp32, the reference kernel's) bounds a
sub-block's partial by 2^-8 of its sum |x w|: that is the GPU test's class.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import exact_grouped, interpreted_json_at_once

pytest.importorskip("dsv4.ops.triton.fp4_decode_fp8mma", reason="needs triton")

K = 256
N_BOUND = 32 + 4 + K // 128 + 2 + 1          # the fp32 class at K = 256 with up to 2 splits, units of 2^-24 sum |x w|

_CHECK = """
PART = {part!r}
import json
import torch
from kernel_helpers import exact_grouped
from dsv4 import ops
from dsv4.ops.triton.fp4_decode_fp8mma import fp4_decode_fp8mma
from dsv4.ops.triton.fp4_prefill_fp8mma import X_ORDER
from dsv4.ops.triton.fp4_grouped_prefill import expert_offsets
from dsv4.quant import fake_quant_fp8, quant_fp4
gen = torch.Generator().manual_seed(5)
K = 256
ws = [quant_fp4(torch.randn(80, K, generator=gen) / 16) for _ in range(9)]
w, s = torch.stack([a for a, _ in ws]), torch.stack([b for _, b in ws])
s[2, 3, 5] = torch.tensor(0, dtype=torch.uint8).view(s.dtype)       # 2^-127: the exact e8m0 decode
s[6, 70, 6] = torch.tensor(1, dtype=torch.uint8).view(s.dtype)


def ulps(got, x, eid):
    ref, mag = exact_grouped(x, eid, w, s)
    return ((got.double() - ref).abs() / mag * 2**24).max().item()


res = {{}}
x = torch.randn(19, K, generator=gen) * 3
x[4, :128] *= 2.0**-20                                   # blocks of one row far apart in scale
x = fake_quant_fp8(x, 128)
# pairs, any order (experts repeat, 2 and 6 among them)
pid = torch.tensor([6, 2, 2, 0, 8, 6, 1, 2, 3, 4, 5, 7, 6, 0, 2, 8, 1, 3, 4])
# sorted: experts 0, 3-5, 7, 8 have no rows, expert 2 has 17 (two 16-row tiles)
eid = torch.tensor([1] + [2] * 17 + [6])
offs = expert_offsets(eid, 9)
if PART == 'unroll':
    # two blocks a step (`unroll`): the same additions in the same order, bit for bit; the swapped and direct
    # fp16 / bf16 kernels too
    from dsv4.ops.triton.fp4_grouped_direct import fp4_grouped_gemm_direct
    from dsv4.ops.triton.fp4_grouped_swapped import fp4_grouped_gemm_swapped
    res['unroll'] = [torch.equal(fp4_decode_fp8mma(x, pid, w, s, unroll=2), fp4_decode_fp8mma(x, pid, w, s)),
                     torch.equal(fp4_grouped_gemm_swapped(x, eid, w, s, packed="twin", unroll=2),
                                 fp4_grouped_gemm_swapped(x, eid, w, s, packed="twin")),
                     torch.equal(fp4_grouped_gemm_direct(x, eid, w, s, block_m=16, block_n=16, asm=False, unroll=2),
                                 fp4_grouped_gemm_direct(x, eid, w, s, block_m=16, block_n=16, asm=False))]
    # the tile-major layout gives the stored layout's result (64 of the rows: whole tiles), the programs with
    # scale bytes 0 / 1 (experts 2, 6: the exact decode) included; every other kernel: tests/test_fp4_tiled.py
    from dsv4.ops.fp4_layout import to_tiled
    w64, s64 = w[:, :64].contiguous(), s[:, :64].contiguous()
    res['tiled'] = [torch.equal(fp4_decode_fp8mma(x, pid, to_tiled(w64), s64, split=2),
                                fp4_decode_fp8mma(x, pid, w64, s64, split=2)),
                    torch.equal(fp4_decode_fp8mma(x, eid, to_tiled(w64), s64, offs=offs),
                                fp4_decode_fp8mma(x, eid, w64, s64, offs=offs))]
    print(json.dumps(res))
    raise SystemExit
res['pairs'] = [ulps(fp4_decode_fp8mma(x, pid, w, s, split=sp, block_m=bm).sum(0), x, pid)
              for sp, bm in ((1, 16), (2, 8))]
res['sorted'] = [ulps(fp4_decode_fp8mma(x, eid, w, s, offs=offs, split=2).sum(0), x, eid)]
twin = ops.grouped_linear.twin(x, eid, w, s, 'fp4')
res['twin'] = ulps(twin, x, eid)
# block_n 128 over N = 80 (one partial tile), 32-row tiles
res['wide'] = ulps(fp4_decode_fp8mma(x, eid, w, s, offs=offs, split=2, block_n=128, block_m=32).sum(0), x, eid)
# the partials are per split: each split alone is that K range's product
p = fp4_decode_fp8mma(x, pid, w, s, split=2)
xk = x.clone()
xk[:, 128:] = 0
res['split0'] = ulps(p[0], xk, pid)
res['empty'] = list(fp4_decode_fp8mma(x[:0], eid[:0], w, s, offs=expert_offsets(eid[:0], 9)).shape)
# a NaN scale (byte 255) reaches exactly the twin's outputs
s[6, 7, 2] = torch.tensor(255, dtype=torch.uint8).view(s.dtype)
nan = fp4_decode_fp8mma(x, eid, w, s, offs=offs, split=2).sum(0).isnan()
res['nan'] = [torch.equal(nan, ops.grouped_linear.twin(x, eid, w, s, 'fp4').isnan()), nan.sum().item()]
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The checks in two interpreter processes at once (the unroll comparisons apart): CI's 2 cores."""
    scripts = {part: _CHECK.format(part=part) for part in ("core", "unroll")}
    return interpreted_json_at_once(scripts, tmp_path_factory.mktemp("decode_fp8mma"))


def test_decode_fp8mma_is_the_fp32_class_in_every_mapping(interpreted):
    """Pairs in any order (experts repeated), sorted rows with empty experts and a two-tile expert, 1-2 splits,
    64- and 128-row weight tiles over N = 80, scale bytes 0 and 1: within n + 1 units of 2^-24 sum |x w| of the
    exact product (the twin is within 1)."""
    r = interpreted
    assert max(r["pairs"]) <= N_BOUND and max(r["sorted"]) <= N_BOUND and r["wide"] <= N_BOUND, r
    assert r["twin"] <= 1, r
    assert r["split0"] <= N_BOUND, r
    assert r["empty"] == [1, 0, 80], r
    assert r["unroll"] == [True, True, True], r
    assert r["tiled"] == [True, True], r


def test_decode_fp8mma_nan_scale_reaches_the_twins_outputs(interpreted):
    """Scale byte 255 of expert 6's weight row 7: output column 7 of its one row is NaN, as the twin's, and no other."""
    assert interpreted["nan"] == [True, 1], interpreted


def test_decode_fp8mma_checks_its_options():
    from dsv4.ops.triton.fp4_decode_fp8mma import fp4_decode_fp8mma

    w, s = torch.zeros(3, 64, 128, dtype=torch.int8), torch.zeros(3, 64, 8, dtype=torch.uint8)
    x, eid = torch.zeros(5, 256), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="split"):
        fp4_decode_fp8mma(x, eid, w, s.view(torch.float8_e8m0fnu), split=3)
    with pytest.raises(ValueError, match="do not fit"):
        fp4_decode_fp8mma(x[:, :128], eid, w, s.view(torch.float8_e8m0fnu))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_decode_fp8mma_on_cuda_at_flash_dims(tokens):
    """Flash's expert shapes (K 4096 -> N 2048, 256 experts), the decode batches' pair and sorted mappings: within
    the FP8 MMA's class (2^-8 of each sub-block's sum |x w|, so 2^-8 of sum |x w| elementwise) of float64, and the
    sorted mapping equal to the pair mapping up to the fp32 summation order (the same products and partials)."""
    from dsv4.ops.triton.fp4_decode_fp8mma import fp4_decode_fp8mma
    from dsv4.ops.triton.fp4_grouped_prefill import expert_offsets
    from dsv4.quant import fake_quant_fp8

    gen = torch.Generator("cuda").manual_seed(tokens)
    E, N, Kf = 256, 2048, 4096
    w = torch.randint(-128, 128, (E, N, Kf // 2), dtype=torch.int8, device="cuda", generator=gen)
    s = torch.randint(118, 125, (E, N, Kf // 32), dtype=torch.uint8, device="cuda", generator=gen)
    s = s.view(torch.float8_e8m0fnu)
    eid = torch.rand(tokens, E, device="cuda", generator=gen).topk(6, dim=-1).indices.flatten().sort().values
    x = fake_quant_fp8(torch.randn(eid.numel(), Kf, device="cuda", generator=gen), 128).bfloat16()
    ref, mag = exact_grouped(x, eid, w, s)
    with torch.inference_mode():
        pairs = fp4_decode_fp8mma(x, eid, w, s, split=4).sum(0)
        grouped = fp4_decode_fp8mma(x, eid, w, s, offs=expert_offsets(eid, E), split=4).sum(0)
    assert ((pairs.double() - ref).abs() / mag).max().item() <= 2**-8
    assert ((grouped.double() - pairs.double()).abs() / mag).max().item() <= 2**-20


def test_decode_plan_splits_to_a_wave_and_only_on_the_fp8_grid(monkeypatch):
    """The plan: None off the FP8 grid or with the switch off (DSV4_FP4_DECODE_MMA=0; unset: off); K split
    (dividing K / 128, at most 8) until a batch-1 call (8 rows) runs 264 programs: 16 weight-row blocks of 128 ->
    4, 32 of 64 over the tile-major layout -> 2, 64 -> 1. The split comes from the weight's shape alone, whatever
    the call's rows (batch invariance): the old plan took it from the rows, and a token alone and in a batch summed
    differently."""
    from dsv4.ops.moe_pairs import decode_fp8mma_plan

    w = torch.zeros(256, 2048, 2048, dtype=torch.int8)
    tiled = torch.zeros(256, 32, 32, 64, 64, dtype=torch.int8)
    wide = torch.zeros(256, 64, 32, 64, 64, dtype=torch.int8)            # N 4096 tile-major
    monkeypatch.setenv("DSV4_FP4_DECODE_MMA", "1")
    for rows in (1, 6, 48, 384):
        x = torch.zeros(rows, 4096, dtype=torch.bfloat16)
        assert decode_fp8mma_plan(x, w, True) == (4, 16, 128, 4)
        assert decode_fp8mma_plan(x, tiled, True) == (2, 16, 64, 4)
        assert decode_fp8mma_plan(x, wide, True) == (1, 16, 64, 4)
        assert decode_fp8mma_plan(x[:, :384], w, True) == (1, 16, 128, 4)    # 3 blocks: no split divides
        assert decode_fp8mma_plan(x, w, False) is None
    monkeypatch.delenv("DSV4_FP4_DECODE_MMA")                                # unset: off over either layout
    assert decode_fp8mma_plan(x, tiled, True) is None and decode_fp8mma_plan(x, w, True) is None
    monkeypatch.setenv("DSV4_FP4_DECODE_MMA", "0")
    assert decode_fp8mma_plan(x, tiled, True) is None and decode_fp8mma_plan(x, w, True) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k", [(2048, 4096), (4096, 2048)])
@pytest.mark.parametrize("tiled", [True, False])
def test_decode_kernel_is_batch_invariant_on_cuda(monkeypatch, n, k, tiled):
    """DSV4_FP4_DECODE_MMA=1: a token's 6 pair rows give the same bits alone (`pair_linear` at batch 1) as inside a
    64-token batch, through `pair_linear` (pairs in token order) and `grouped_linear` (sorted rows): the plan's
    split comes from the weight's shape, not from the call's rows (h100_s32 call A: it did, and test_engine's
    requests alone and batched decoded differently)."""
    from dsv4 import ops
    from dsv4.ops import fp4_layout
    from dsv4.quant import fake_quant_fp8

    monkeypatch.setenv("DSV4_FP4_DECODE_MMA", "1")
    e, tokens = 256, 64
    gen = torch.Generator("cuda").manual_seed(n + tiled)
    w = torch.randint(-128, 128, (e, n, k // 2), dtype=torch.int8, device="cuda", generator=gen)
    s = torch.randint(118, 125, (e, n, k // 32), dtype=torch.uint8, device="cuda", generator=gen)
    s = s.view(torch.float8_e8m0fnu)
    w = fp4_layout.to_tiled(w) if tiled else w
    eid = torch.rand(tokens, e, device="cuda", generator=gen).topk(6, dim=-1).indices.flatten()
    x = fake_quant_fp8(torch.randn(eid.numel(), k, device="cuda", generator=gen), 128).bfloat16()
    order = eid.argsort(stable=True)
    with torch.inference_mode():
        alone = ops.pair_linear(x[:6], eid[:6], w, s, "fp4", fp8_grid=True, decode_sized=True)
        batch = ops.pair_linear(x, eid, w, s, "fp4", fp8_grid=True, decode_sized=True)
        grouped = ops.grouped_linear(x[order], eid[order], w, s, "fp4", fp8_grid=True,
                                     decode_sized=True)[order.argsort()]
    assert torch.isfinite(alone).all()
    assert torch.equal(batch[:6], alone) and torch.equal(grouped[:6], alone)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_decode_kernel_is_dispatched_from_both_ops(monkeypatch, tokens):
    """With DSV4_FP4_DECODE_MMA=1, `pair_linear` (pairs in token order) and `grouped_linear` (sorted rows, the MoE's
    bf16 output scattered to pair order) run the kernel for FP8-grid x of decode-sized steps (`decode_sized`, the
    MoE's word) and stay within its class of float64; without `decode_sized` neither runs it."""
    import importlib

    from dsv4 import ops
    from dsv4.quant import fake_quant_fp8

    # the modules (`from dsv4.ops import grouped_linear` is the op: dsv4.ops re-exports it under the module's name)
    grouped_linear = importlib.import_module("dsv4.ops.grouped_linear")
    moe_pairs = importlib.import_module("dsv4.ops.moe_pairs")

    monkeypatch.setenv("DSV4_FP4_DECODE_MMA", "1")
    calls = []

    def counted(*args):
        calls.append(args[4] is None)
        return kernel(*args)
    kernel = moe_pairs._fp4_decode_fp8mma
    monkeypatch.setattr(moe_pairs, "_fp4_decode_fp8mma", counted)
    monkeypatch.setattr(grouped_linear, "_fp4_decode_fp8mma", counted)
    gen = torch.Generator("cuda").manual_seed(tokens + 100)
    E, N, Kf = 256, 2048, 4096
    w = torch.randint(-128, 128, (E, N, Kf // 2), dtype=torch.int8, device="cuda", generator=gen)
    s = torch.randint(118, 125, (E, N, Kf // 32), dtype=torch.uint8, device="cuda", generator=gen)
    s = s.view(torch.float8_e8m0fnu)
    ids = torch.rand(tokens, E, device="cuda", generator=gen).topk(6, dim=-1).indices.flatten()
    x = fake_quant_fp8(torch.randn(ids.numel(), Kf, device="cuda", generator=gen), 128).bfloat16()
    ref, mag = exact_grouped(x, ids, w, s)
    with torch.inference_mode():
        pairs = ops.pair_linear(x, ids, w, s, "fp4", fp8_grid=True, decode_sized=True)
        order = ids.argsort(stable=True)
        grouped = ops.grouped_linear(x[order], ids[order], w, s, "fp4", fp8_grid=True, out_dtype=torch.bfloat16,
                                     out_index=order, decode_sized=True)
        # not decode-sized (the caller's step has more than DECODE_KERNEL_MAX_TOKENS tokens): the other kernels
        ops.pair_linear(x, ids, w, s, "fp4", fp8_grid=True)
        ops.grouped_linear(x[order], ids[order], w, s, "fp4", fp8_grid=True)
    assert calls == [True, False], calls          # pairs, then sorted rows: the kernel ran both times, and only them
    assert ((pairs.double() - ref).abs() / mag).max().item() <= 2**-8
    # bf16 output: one more rounding, 2^-9 of |y| <= 2^-9 of sum |x w|
    assert ((grouped.double() - ref).abs() / mag).max().item() <= 2**-8 + 2**-9


def test_unroll_switch_is_checked_and_capped(monkeypatch):
    """DSV4_FP4_UNROLL (the direct / swapped kernels' blocks per step, for the bench's A/B): 1 unset, capped by what
    divides K / 128, anything else an error (a typo must not measure the wrong path)."""
    from dsv4.ops.grouped_linear import unroll_from_env

    monkeypatch.delenv("DSV4_FP4_UNROLL", raising=False)
    assert unroll_from_env(4096) == 1
    monkeypatch.setenv("DSV4_FP4_UNROLL", "4")
    assert (unroll_from_env(4096), unroll_from_env(256), unroll_from_env(128)) == (4, 2, 1)
    monkeypatch.setenv("DSV4_FP4_UNROLL", "3")
    with pytest.raises(ValueError, match="DSV4_FP4_UNROLL"):
        unroll_from_env(4096)
