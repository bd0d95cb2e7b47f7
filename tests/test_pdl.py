"""Programmatic dependent launch of the decode kernels (`ops/triton/pdl.py`, DSV4_PDL=1, opt-in).

PDL changes when a kernel's programs start, never what they compute; what can break is the order of memory
accesses. So: offline (sm_90 PTX, no GPU) each PDL kernel reads nothing before its `griddepcontrol.wait` but the
constant weights it prefetches, and releases its dependents only after its last load; on a GPU the results are the
same bits with and without PDL, eagerly and in a replayed CUDA graph whose kernels feed each other (a missing wait
would read a half-written input there).
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton", reason="needs triton")

LOAD = re.compile(r"\bld\.global|cp\.async\.cg|cp\.async\.ca|cp\.async\.bulk\.tensor")


def test_pdl_is_off_the_gpu_and_the_switch_is_checked(monkeypatch):
    from dsv4.ops.triton.pdl import pdl_on

    monkeypatch.setenv("DSV4_PDL", "1")
    assert not pdl_on(torch.device("cpu"))              # the interpreter has no inline assembly
    monkeypatch.setenv("DSV4_PDL", "yes")
    with pytest.raises(ValueError, match="DSV4_PDL"):
        pdl_on(torch.device("cuda"))
    monkeypatch.delenv("DSV4_PDL")
    assert not pdl_on(torch.device("cuda"))              # opt-in


def test_compiled_steps_take_inductors_pdl_with_the_switch(monkeypatch):
    """DSV4_PDL=1 turns inductor's PDL on for the compiled steps; unset, the option is left alone (so
    TORCHINDUCTOR_ENABLE_PDL=1 still measures inductor's alone)."""
    from dsv4.engine import graphs

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["options"]) or fn)
    monkeypatch.delenv("DSV4_PDL", raising=False)
    graphs.compiled(lambda x: x)
    monkeypatch.setenv("DSV4_PDL", "1")
    graphs.compiled(lambda x: x)
    graphs.compiled(lambda x: x, backend="aot_eager")
    assert seen == [{"emulate_precision_casts": True},
                    {"emulate_precision_casts": True, "triton.enable_pdl": True}, None]


def _compile(kernel, sig, consts, pdl):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v.startswith("*")}
    return triton.compile(ASTSource(kernel, {**sig, **dict.fromkeys(consts, "constexpr")}, constexprs=consts,
                                    attrs=attrs), target=GPUTarget("cuda", 90, 32), options={"launch_pdl": pdl})


def _pdl_kernels():
    from dsv4.ops.triton.bf16_small_m import _bf16_small_m
    from dsv4.ops.triton.fp4_decode_fp8mma import _fp4_decode_fp8mma
    from dsv4.ops.triton.fp4_gemv import _fp4_pair_gemv
    from dsv4.ops.triton.fp4_prefill_fp8mma import _x_operand
    from dsv4.ops.triton.fp8_linear import _fp8_linear_small_m
    from dsv4.ops.triton.quant import _act_quant_fp8, _fake_quant_fp8
    from dsv4.ops.triton.sinkhorn import _sinkhorn
    from dsv4.ops.triton.sparse_attention import _combine, _sparse_attention
    from dsv4.ops.triton.splitk import _sum_splits

    fp8 = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "KB_PER_SPLIT": "i32", "xs_ptr": "*fp32", "X_STRIDE": "i32", "GROUP_N": "i32"}
    fp8_consts = {"HW_FP8": True, "BLOCK_N": 64, "BLOCK_M": 16, "GROUPED": False, "F16_MMA": False}
    decode = {"xq_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "eid_ptr": "*i64", "offs_ptr": "*i32", "w_ptr": "*i8",
              "s_ptr": "*u8", "out_ptr": "*fp32", "M": "i32", "N": "i32"}
    decode_consts = {"K": 4096, "HALF": 2048, "N_SCALES": 128, "BLOCKS_PER_SPLIT": 16, "E": 256, "E_POW2": 256,
                     "BLOCK_M": 16, "BLOCK_N": 64, "HW": True, "ASM": True, "TILED": True, "UNROLL": 1, "F16": False}
    attn = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "sink_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*fp32",
            "m_ptr": "*fp32", "l_ptr": "*fp32", "S": "i32", "N": "i32", "K": "i32", "TILES": "i32", "scale": "fp32"}
    attn_consts = {"H": 64, "D": 512, "BLOCK_H": 16, "BLOCK_D": 512, "BLOCK_K": 64, "IEEE": False,
                   "PIPELINED": True, "LSE": False}
    quant = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32"}
    return [
        ("fp8 act quant", True, _fp8_linear_small_m, fp8, {**fp8_consts, "ACT_QUANT": True, "PREQUANT": False}),
        ("fp8 prequant", True, _fp8_linear_small_m, {**fp8, "x_ptr": "*u8"},
         {**fp8_consts, "ACT_QUANT": True, "PREQUANT": True}),
        ("fp8 bf16 x", True, _fp8_linear_small_m, fp8, {**fp8_consts, "ACT_QUANT": False, "PREQUANT": False}),
        ("sum splits", False, _sum_splits, {"part_ptr": "*fp32", "out_ptr": "*bf16", "MN": "i32"},
         {"SPLIT": 4, "BLOCK": 1024}),
        ("x operand", False, _x_operand, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "n_rows": "i32",
                                          "n_cols": "i32"}, {"LUT": False, "F16": False}),
        ("fp4 decode pairs", False, _fp4_decode_fp8mma, decode, {**decode_consts, "PAIRS": True}),
        ("fp4 decode sorted", False, _fp4_decode_fp8mma, decode, {**decode_consts, "PAIRS": False}),
        ("act quant", False, _act_quant_fp8, quant, {"BLOCK": 128, "ROWS": 16}),
        ("fake quant", False, _fake_quant_fp8, {"x_ptr": "*bf16", "y_ptr": "*bf16", "n_rows": "i32", "n_cols": "i32"},
         {"BLOCK": 64, "ROWS": 32}),
        ("sinkhorn", False, _sinkhorn, {"m_ptr": "*fp32", "scale_ptr": "*fp32", "base_ptr": "*fp32", "pre_ptr": "*fp32",
                                        "post_ptr": "*fp32", "comb_ptr": "*fp32", "T": "i32", "eps": "fp32"},
         {"ITERS": 20, "HC": 4, "BLOCK_T": 64}),
        ("bf16 small m", True, _bf16_small_m, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32", "M": "i32",
                                               "N": "i32", "K": "i32", "KB_PER_SPLIT": "i32"},
         {"HW": True, "BLOCK_N": 64, "BLOCK_M": 16}),
        ("sparse attention", False, _sparse_attention, attn, {**attn_consts, "PARTIAL": True}),
        ("sparse attention unsplit", False, _sparse_attention, {**attn, "out_ptr": "*bf16"},
         {**attn_consts, "PARTIAL": False}),
        ("fp4 pair gemv", False, _fp4_pair_gemv, {"x_ptr": "*bf16", "ids_ptr": "*i64", "w_ptr": "*i32", "s_ptr": "*u8",
                                                   "out_ptr": "*fp32", "N": "i32", "K": "i32"},
         {"WORDS": 512, "N_SCALES": 128, "BLOCK_N": 32, "BLOCK_G": 32, "HALF2": False, "ASM": False, "TILED": True}),
        ("combine", False, _combine, {"part_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "sink_ptr": "*fp32",
                                      "out_ptr": "*bf16", "SPLITS": "i32"},
         {"H": 64, "D": 512, "BLOCK_H": 16, "BLOCK_D": 512}),
    ]


@pytest.mark.parametrize("case", range(15))
def test_pdl_kernels_wait_before_their_loads_and_release_after_them(case):
    """sm_90 PTX of each PDL kernel, in program order: (the FP8 linear's weight-slice prefetch,) the wait, every
    global load, the release; the launch flag set. Without PDL none of the three instructions is there."""
    import triton

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    name, prefetches, kernel, sig, consts = _pdl_kernels()[case]
    plain = _compile(kernel, sig, {**consts, "PDL": False}, False)
    assert not re.search(r"griddepcontrol|prefetch", plain.asm["ptx"]) and not plain.metadata.launch_pdl, name
    pdl = _compile(kernel, sig, {**consts, "PDL": True}, True)
    assert pdl.metadata.launch_pdl, name
    lines = pdl.asm["ptx"].splitlines()
    at = {key: [i for i, line in enumerate(lines) if re.search(pattern, line)] for key, pattern in (
        ("wait", r"griddepcontrol\.wait"), ("release", r"griddepcontrol\.launch_dependents"),
        ("prefetch", r"cp\.async\.bulk\.prefetch\.L2"), ("load", LOAD.pattern))}
    assert len(at["wait"]) == 1 and len(at["release"]) == 1 and at["load"], (name, at)
    assert at["wait"][0] < min(at["load"]) and max(at["load"]) < at["release"][0], (name, at)
    assert bool(at["prefetch"]) == prefetches, name
    assert all(i < at["wait"][0] for i in at["prefetch"]), (name, at)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper GPU")
def test_pdl_gives_the_same_bits_eagerly_and_in_a_replayed_graph(monkeypatch):
    """A chain of PDL kernels feeding each other at Flash's shapes: FP8 wq_a-like linear with its split sum -> fake
    quant -> FP8 wq_b-like linear -> on its output the FP4 decode kernels (split-K with its x operand; the pair
    GEMV), the act quant, mHC's Sinkhorn and the split sparse attention with its merge. With DSV4_PDL=1 against 0:
    the same bits eagerly, and in a CUDA graph replayed 20 times on fresh inputs."""
    from dsv4 import quant
    from dsv4.ops.triton.fp4_decode_fp8mma import fp4_decode_fp8mma
    from dsv4.ops.triton.fp4_gemv import fp4_pair_gemv
    from dsv4.ops.triton.fp8_linear import fp8_linear_small_m
    from dsv4.ops.triton.quant import act_quant_fp8, fake_quant_fp8
    from dsv4.ops.triton.sinkhorn import hc_split_sinkhorn
    from dsv4.ops.triton.sparse_attention import sparse_attention

    gen = torch.Generator().manual_seed(61)
    w1, s1 = (t.cuda() for t in quant.quant_fp8(torch.randn(1024, 4096, generator=gen) / 64))
    w2, s2 = (t.cuda() for t in quant.quant_fp8(torch.randn(4096, 1024, generator=gen) / 32))
    E, N = 16, 2048
    w4 = torch.randint(-128, 128, (E, N, 2048), dtype=torch.int8, generator=gen).cuda()
    s4 = torch.randint(118, 125, (E, N, 128), dtype=torch.uint8, generator=gen).cuda().view(torch.float8_e8m0fnu)
    eid = torch.randint(0, E, (8,), generator=gen).cuda()
    hc_scale, hc_base = torch.rand(3, generator=gen).cuda(), torch.randn(24, generator=gen).cuda()
    sink, idx = torch.randn(8, generator=gen).cuda(), torch.randint(0, 16, (1, 8, 128), generator=gen).cuda()

    def chain(x):
        h = fp8_linear_small_m(x, w1, s1, True)                     # split > 1: `_sum_splits` follows
        y = fp8_linear_small_m(fake_quant_fp8(h, 64), w2, s2, True)
        mixes = y[:, :24].float() / 64
        attn = sparse_attention(y.view(1, 8, 8, 512), h.view(1, 16, 512), sink, idx, 0.04, splits=2, check=False)
        return (fp4_decode_fp8mma(y.float(), eid, w4, s4, split=4), fp4_pair_gemv(y, eid, w4, s4),
                act_quant_fp8(y)[0].view(torch.uint8),
                *hc_split_sinkhorn(mixes, hc_scale, hc_base, 4, 20, 1e-6), attn)

    xs = [(torch.randn(8, 4096, generator=gen) * 2).bfloat16().cuda() for _ in range(20)]
    with torch.inference_mode():
        monkeypatch.setenv("DSV4_PDL", "0")
        want = [chain(x) for x in xs]
        assert all(torch.isfinite(w[0]).all() and torch.isfinite(w[1]).all() for w in want)
        monkeypatch.setenv("DSV4_PDL", "1")
        for x, w in zip(xs, want, strict=True):
            assert all(map(torch.equal, chain(x), w))
        static = xs[0].clone()
        chain(static)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(static)
        for x, w in zip(xs, want, strict=True):
            static.copy_(x)
            graph.replay()
            assert all(map(torch.equal, out, w))
