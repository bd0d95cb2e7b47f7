"""The tile-major FP4 layout (`dsv4.ops.fp4_layout`): the permutation and its inverse, every reader of FP4 weights
over it (the twins, every Triton kernel in the CPU interpreter) and the model with its expert stacks held in it.

The layout moves bytes only, and every kernel adds the same products in the same order whichever layout it reads,
so the class is bit for bit: each result over the tile-major stack must EQUAL the result over the stored one.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import interpreted_json_at_once

from dsv4 import ops
from dsv4.ops import fp4_layout
from dsv4.quant import quant_fp4


def _stack(e, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pairs = [quant_fp4(torch.randn(n, k, generator=gen) / 8) for _ in range(e)]
    return torch.stack([w for w, _ in pairs]), torch.stack([s for _, s in pairs])


def test_layout_is_a_permutation_with_its_documented_offsets():
    """to_tiled puts byte (r, c) of the rows order at row_offset(r) + byte_offset(c) (the formulas the kernels'
    `_row_at` / `_byte_at` use), to_rows undoes it, and the shapes name the layout."""
    w, _ = _stack(2, 192, 512)
    t = fp4_layout.to_tiled(w)
    assert t.shape == (2, 3, 4, 64, 64) and fp4_layout.is_tiled(t) and not fp4_layout.is_tiled(w)
    assert fp4_layout.rows_shape(t) == (2, 192, 256) and fp4_layout.out_features(t) == 192
    assert torch.equal(fp4_layout.to_rows(t), w) and fp4_layout.to_rows(w) is w
    half = 256
    r = torch.arange(192)[:, None]
    c = torch.arange(half)[None, :]
    at = (r // 64) * 64 * half + (r % 64) * 64 + (c // 64) * 4096 + c % 64
    assert torch.equal(t[1].flatten()[at], w[1])
    # the same offsets over the stack: row e * N + r
    assert torch.equal(t.flatten()[(r + 192) // 64 * 64 * half + (r % 64) * 64 + (c // 64) * 4096 + c % 64], w[1])


def test_layout_refuses_what_it_cannot_hold():
    w, _ = _stack(1, 96, 256)
    with pytest.raises(ValueError, match="whole 64-row"):
        fp4_layout.to_tiled(w)
    t = fp4_layout.to_tiled(_stack(1, 64, 256)[0])
    with pytest.raises(ValueError, match="tile-major already"):
        fp4_layout.to_tiled(t)
    with pytest.raises(ValueError, match="last two dimensions"):
        fp4_layout.rows_shape(t[..., :32])
    assert fp4_layout.can_tile(2048, 4096) and not fp4_layout.can_tile(2048, 4160) and not fp4_layout.can_tile(96, 256)


def test_twins_read_either_layout():
    """`dequant_weight` (every plain twin's decode), the pair and grouped twins and the bf16 stack decode give the
    same values from the tile-major stack, a gathered slice of it and one expert's 4-D view."""
    w, s = _stack(3, 128, 256, seed=1)
    t = fp4_layout.to_tiled(w)
    assert torch.equal(ops.dequant_weight(t[1], s[1], "fp4"), ops.dequant_weight(w[1], s[1], "fp4"))
    assert torch.equal(ops.dequant_fp4_bf16.twin(t, s), ops.dequant_fp4_bf16.twin(w, s))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 256, generator=gen)
    ids = torch.tensor([2, 0, 0, 1, 2, 2, 1])
    assert torch.equal(ops.pair_linear.twin(x, ids, t, s, "fp4"), ops.pair_linear.twin(x, ids, w, s, "fp4"))
    eid = ids.sort().values
    assert torch.equal(ops.grouped_linear.twin(x, eid, t, s, "fp4"), ops.grouped_linear.twin(x, eid, w, s, "fp4"))


_CHECK = """
PART = {part!r}
import json
import torch
from dsv4.ops.fp4_layout import to_tiled
from dsv4.ops.triton.fp4_grouped_prefill import expert_offsets
from dsv4.quant import fake_quant_fp8, quant_fp4
gen = torch.Generator().manual_seed(11)
E, N, K = 5, 64, 256
ws = [quant_fp4(torch.randn(N, K, generator=gen) / 8) for _ in range(E)]
w, s = torch.stack([a for a, _ in ws]), torch.stack([b for _, b in ws])
# expert 3: scale bytes 0 and 200, so its programs take each kernel's other path (exact e8m0 decode, scales out of
# the fast decode's range or too wide for the fp16 / folded paths); the others the fast one
s[3, 5, 1] = torch.tensor(0, dtype=torch.uint8).view(s.dtype)
s[3, 40, 6] = torch.tensor(200, dtype=torch.uint8).view(s.dtype)
t = to_tiled(w)
x = fake_quant_fp8(torch.randn(13, K, generator=gen), 128)          # on the FP8 grid: every kernel's exact input
eid = torch.tensor([0, 0, 1, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4])          # sorted; expert 2 has no rows
pid = torch.tensor([3, 1, 0, 4, 3, 3, 0, 2, 1, 4, 3, 0, 2])          # pairs, any order
res = {{}}


def same(name, fn):
    a, b = fn(t), fn(w)
    res[name] = bool(torch.equal(a, b)) and bool(a.abs().sum() > 0)


if PART == 'grouped':
    from dsv4.ops.triton.fp4_grouped import fp4_grouped_gemm
    from dsv4.ops.triton.fp4_grouped_direct import fp4_grouped_gemm_direct
    from dsv4.ops.triton.fp4_grouped_prefill import fp4_grouped_gemm_prefill
    from dsv4.ops.triton.fp4_grouped_swapped import fp4_grouped_gemm_swapped
    same('row_blocks', lambda v: fp4_grouped_gemm(x, eid, v, s))
    same('expert_major', lambda v: fp4_grouped_gemm_prefill(x, eid, v, s, block_m=16, block_n=64, join=False))
    same('expert_major_packed', lambda v: fp4_grouped_gemm_prefill(x, eid, v, s, block_m=16, packed='twin'))
    same('swapped', lambda v: fp4_grouped_gemm_swapped(x, eid, v, s, packed='twin'))
    same('swapped_korder', lambda v: fp4_grouped_gemm_swapped(x, eid, v, s, packed='twin', korder=True))
    same('direct', lambda v: fp4_grouped_gemm_direct(x, eid, v, s, block_m=16, block_n=64, asm=False))
    same('direct_x_korder', lambda v: fp4_grouped_gemm_direct(x, eid, v, s, block_m=16, block_n=16, asm=False,
                                                                x_korder=True))
else:
    from dsv4.ops.triton.fp4_decode_fp8mma import fp4_decode_fp8mma
    from dsv4.ops.triton.fp4_dequant import dequant_fp4_bf16
    from dsv4.ops.triton.fp4_gemv import fp4_pair_gemv
    from dsv4.ops.triton.fp4_grouped_prefill import fp4_grouped_gemm_prefill
    same('pair_gemv', lambda v: fp4_pair_gemv(x, pid, v, s))
    same('pair_gemv_packed', lambda v: fp4_pair_gemv(x, pid, v, s, packed='twin'))
    same('decode_pairs', lambda v: fp4_decode_fp8mma(x, pid, v, s, split=2))
    same('decode_sorted', lambda v: fp4_decode_fp8mma(x, eid, v, s, offs=expert_offsets(eid, E), block_n=128))
    same('fp8mma', lambda v: fp4_grouped_gemm_prefill(x, eid, v, s, block_m=16, block_n=64, fp8mma=True))
    same('fp8mma_fold', lambda v: fp4_grouped_gemm_prefill(x, eid, v, s, block_m=16, block_n=64, fp8mma='fold'))
    same('dequant', lambda v: dequant_fp4_bf16(v, s).float())
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every FP4 kernel over both layouts, in two interpreter processes at once (CI's 2 cores)."""
    pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernels here)")
    scripts = {part: _CHECK.format(part=part) for part in ("grouped", "pairs")}
    return interpreted_json_at_once(scripts, tmp_path_factory.mktemp("fp4_tiled"))


KERNELS = ["row_blocks", "expert_major", "expert_major_packed", "swapped", "swapped_korder", "direct",
           "direct_x_korder", "pair_gemv", "pair_gemv_packed", "decode_pairs", "decode_sorted", "fp8mma",
           "fp8mma_fold", "dequant"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_fp4_kernel_reads_the_tile_major_layout(interpreted, kernel):
    """Bit for bit the stored layout's result (and not all zeros), the fast and the exact / fallback paths both
    taken (expert 3's scale bytes 0 and 200)."""
    assert interpreted[kernel] is True


def test_the_model_holds_tile_major_stacks_with_the_same_logits(tiny_ckpt, monkeypatch):
    """DSV4_FP4_TILED=1: the experts' FP4 stacks are tile-major in place of the stored order (each expert's weight a
    4-D view of its stack, no other copy), and the model's logits are bit for bit those of the stored layout."""
    import dsv4

    def logits():
        model = dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=True, progress=False)
        model.prepare_fixed_shape_decode(torch.device("cpu"))     # the stacks, built under this environment
        with torch.inference_mode():
            out = model(torch.arange(24).view(2, 12))
        return model.layers[2].ffn, out

    monkeypatch.delenv("DSV4_FP4_TILED", raising=False)
    moe_rows, want = logits()
    monkeypatch.setenv("DSV4_FP4_TILED", "1")
    moe, got = logits()
    w, _ = moe.stacked_experts()["w1"]
    assert fp4_layout.is_tiled(w) and w.shape[1:] == (2, 2, 64, 64)
    assert moe.experts[1].w1.weight.data_ptr() == w[1].data_ptr() and moe.experts[1].w1.weight.dim() == 4
    assert torch.equal(fp4_layout.to_rows(w), moe_rows.stacked_experts()["w1"][0])
    assert torch.isfinite(want).all() and torch.equal(got, want)
    # the stacks' own paths (the CPU forward loops over the experts' 4-D views): pairs and sorted rows
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        x = torch.randn(9, moe.experts[0].w1.in_features, generator=gen)
        routes = moe.gate(x, torch.zeros(9, dtype=torch.long))
        for path in ("routed_pairs", "routed_sorted"):
            assert torch.equal(getattr(moe, path)(x, *routes), getattr(moe_rows, path)(x, *routes)), path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 8, 64, 1024])
def test_dispatched_fp4_calls_are_equal_over_both_layouts_on_cuda(tokens, monkeypatch):
    """At Flash's shapes (K 4096 -> N 2048, 256 experts, top-6), what the MoE dispatches gives bit for bit the same
    result over the tile-major stack as over the stored one: with the decode kernel off, the same kernels (pair
    GEMV, swapped, direct); with it on (DSV4_FP4_DECODE_MMA=1, opt-in, and `decode_sized`), the decode kernel over
    the stored layout with the plan the tile-major call took (its plan differs by layout: 64- against 128-row tiles,
    so another K split and another fp32 summation order)."""
    from dsv4.ops.moe_pairs import decode_fp8mma_plan
    from dsv4.ops.split_sum import sum_splits
    from dsv4.ops.triton.fp4_decode_fp8mma import fp4_decode_fp8mma
    from dsv4.ops.triton.fp4_grouped_prefill import expert_offsets
    from dsv4.quant import fake_quant_fp8

    e, n, k = 256, 2048, 4096
    gen = torch.Generator("cuda").manual_seed(tokens)
    w = torch.randint(-128, 128, (e, n, k // 2), dtype=torch.int8, device="cuda", generator=gen)
    s = torch.randint(118, 125, (e, n, k // 32), dtype=torch.uint8, device="cuda", generator=gen)
    s = s.view(torch.float8_e8m0fnu)
    t = fp4_layout.to_tiled(w)
    eid = torch.rand(tokens, e, device="cuda", generator=gen).topk(6, dim=-1).indices.flatten().sort().values
    m = eid.numel()
    x = fake_quant_fp8(torch.randn(m, k, device="cuda", generator=gen), 128).bfloat16()
    with torch.inference_mode():
        monkeypatch.setenv("DSV4_FP4_DECODE_MMA", "0")
        for op in (ops.pair_linear, ops.grouped_linear):
            if op is ops.pair_linear and tokens > 64:
                continue
            got, want = (op(x, eid, v, s, "fp4", fp8_grid=True) for v in (t, w))
            assert torch.isfinite(want).all() and torch.equal(got, want), op
        monkeypatch.setenv("DSV4_FP4_DECODE_MMA", "1")
        if tokens > 64:
            return
        plan = decode_fp8mma_plan(x, t, True)
        assert plan is not None and plan[2] == 64 and decode_fp8mma_plan(x, w, True)[2] == 128
        want = fp4_decode_fp8mma(x, eid, w, s, split=plan[0], block_m=plan[1], block_n=plan[2],
                                 num_warps=plan[3])
        assert torch.equal(ops.pair_linear(x, eid, t, s, "fp4", fp8_grid=True, decode_sized=True), sum_splits(want))
        want = fp4_decode_fp8mma(x, eid, w, s, offs=expert_offsets(eid, e), split=plan[0], block_m=plan[1],
                                 block_n=plan[2], num_warps=plan[3])
        assert torch.equal(ops.grouped_linear(x, eid, t, s, "fp4", fp8_grid=True, decode_sized=True),
                           sum_splits(want))
