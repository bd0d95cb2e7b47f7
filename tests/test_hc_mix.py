"""The fused mHC pre / head kernel (`ops/triton/hc_mix.py`, dispatched by `ops.hc_pre_mix` / `ops.hc_head_mix`)
against float64 and for batch invariance; the checks and their tolerance are in tests/hc_mix_checks.py.

On CPU the kernel runs in Triton's interpreter (fp32 arithmetic; stage 1's fp32 `tl.dot` is NumPy's there and IEEE
FMAs on the GPU, which the sm_90 compile check below holds it to). The
cases use hc_eps = 1e-3 and 3 Sinkhorn iterations (the checkpoint: 1e-6 and 20) so that a dropped eps or a
swapped Sinkhorn order shows above the fp32 tolerance (after 20 iterations both orders have converged).
"""

from __future__ import annotations

import json

import pytest
import torch
from hc_mix_checks import against_float64, batch_invariant, make_inputs
from kernel_helpers import ROOT, in_interpreter_at_once

from dsv4 import ops
from dsv4.ops.registry import which

pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernel here)")

# D = 4096 (Flash) at 3 tokens only: the interpreter runs one 4096-wide call in ~3 s (128 split programs) whatever
# the token count up to 16 (CI time). 3 tokens cover 1: the same programs (one token block), a first token of the
# same RMS (1e-3); 1 token itself runs at D = 256 (pre and head), and at 4096 on the GPU. 64 tokens at 256.
CASES = [(1, 256, False), (3, 256, False), (64, 256, False), (3, 4096, False),
         (1, 256, True), (3, 4096, True), (64, 256, True)]

# The checks, split over two interpreter processes run at once (the interpreter is single-threaded Python: CI's two
# cores run both in about the time of one); each entry is a Python expression, evaluated in the script below.
# Balanced by measured time (2 cores): "a" the 4096-wide cases (9.0 + 2.8 s) and 64x256 (5.0 s), ~17 s; "b" the
# rest, the invariance check's 12.2 s included, ~16 s.
A = {(3, 4096, False), (3, 4096, True), (64, 256, False)}
_PARTS = {
    "a": {**{f"{t}x{d}{'-head' if head else ''}": f"against_float64({t}, {d}, head={head})"
             for t, d, head in CASES if (t, d, head) in A},
          "fp16": "against_float64(3, 256, dtype=torch.float16)"},
    "b": {**{f"{t}x{d}{'-head' if head else ''}": f"against_float64({t}, {d}, head={head})"
             for t, d, head in CASES if (t, d, head) not in A},
          "invariant": "[batch_invariant(64, 1024, [0, 37, 63]), batch_invariant(20, 256, [0, 19], head=True)]"},
}

_CHECK = f"""
import json, sys
import torch
sys.path.insert(0, {ROOT + "/tests"!r})
from hc_mix_checks import against_float64, batch_invariant, make_inputs
print(json.dumps({{checks}}))
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case of `_PARTS`, two interpreter processes at once; one dict of their results."""
    scripts = {part: _CHECK.replace("{checks}", "{" + ", ".join(f"{k!r}: {v}" for k, v in checks.items()) + "}")
               for part, checks in _PARTS.items()}
    with in_interpreter_at_once(scripts, tmp_path_factory.mktemp("hc_mix"), timeout=600) as futures:
        res = {k: v for f in futures.values() for k, v in json.loads(f.result().strip().splitlines()[-1]).items()}
    assert len(res) == len(CASES) + 2, sorted(res)          # every case ran (the names are distinct)
    return res


def test_kernel_is_the_fp32_class_against_float64(interpreted):
    """Every output (pre, post, comb; y before its rounding) within assert_close's fp32 bounds of float64, at 1, 3
    and 64 tokens at D = 256, 3 at D = 4096 (hc = 4), bf16 and fp16 streams; the op's y is that fp32 y
    rounded once (less than one last-place unit away: the interpreter truncates fp32 -> bf16 where the GPU rounds
    to nearest even)."""
    for case, r in interpreted.items():
        if case == "invariant":
            continue
        assert max(r["ratios"]) <= 1 and r["ulps"] < 1 and r["weights"] and r["shapes"], (case, r)
        assert r["dtype"] == ("torch.float16" if case == "fp16" else "torch.bfloat16")
        assert len(r["ratios"]) == (1 if case.endswith("head") else 4)


def test_token_results_do_not_depend_on_the_batch(interpreted):
    """A token's outputs are bit-identical alone, in a 3-token slice and in the whole batch (64 tokens at
    D = 1024; 20 at D = 256 for the head): tile shapes and the split count never depend on the token count."""
    assert interpreted["invariant"] == [True, True]


def test_dispatch_takes_the_plain_path_off_cuda(monkeypatch):
    fn, scale, base = torch.randn(24, 256), torch.rand(3), torch.randn(24)
    monkeypatch.setenv("DSV4_HC_MIX", "1")
    monkeypatch.setenv("DSV4_HC_MIX_PREFILL", "1")
    with torch.inference_mode():
        for tokens in (2, 65):                                          # decode-sized and a prefill chunk
            h = torch.randn(1, tokens, 4, 64).bfloat16()
            assert which("hc_pre_mix", h, fn, scale, base, 4, 20, 1e-6, 1e-6) == "twin"
            assert which("hc_head_mix", h, fn[:4], scale[:1], base[:4], 1e-6, 1e-6) == "twin"


def test_split_k_stage_is_an_ieee_fp32_dot_for_sm90():
    """Stage 1's dot compiled for sm_90 as a launch specialises it (hc_pre's 24 rows padded to 32, the head's 4 to
    16): FMAs only, no tensor-core instruction. A default-precision fp32 `tl.dot` would run on TF32 MMAs, outside the
    fp32 class, and Triton's interpreter (the CPU tests above) cannot tell the two apart."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv4.ops.triton.hc_mix import BLOCK_K, BLOCK_T, _partials

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    sig = {"h_ptr": "*bf16", "fn_ptr": "*fp32", "part_ptr": "*fp32", "T": "i32", "K": "i32"}
    for n, padded, width in ((24, 32, 32), (4, 16, 8)):
        cs = {"N": n, "NP": padded, "PW": width, "BLOCK_T": BLOCK_T, "BLOCK_K": BLOCK_K}
        ptx = triton.compile(ASTSource(_partials, {**sig, **dict.fromkeys(cs, "constexpr")}, cs),
                             target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        assert "fma.rn.f32" in ptx and "mma" not in ptx, cs


@pytest.mark.gpu
@pytest.mark.parametrize("head", [False, True], ids=["pre", "head"])
def test_kernel_on_cuda_at_flash_dims(head, monkeypatch):
    """Flash: D = 4096, hc = 4, the checkpoint's eps and 20 iterations; dispatch picks the kernel for 1-64 tokens
    at inference only; it is the fp32 class against float64, its y is an fp32 sum rounded to nearest even, it is
    batch-invariant on the GPU too, and it agrees with the plain path (y within one bf16 unit of the largest
    value, weights within 1e-5 of it: the Sinkhorn kernel's fp32 class, tests/test_fast_ops.py)."""
    name, op = ("hc_head_mix", ops.hc_head_mix) if head else ("hc_pre_mix", ops.hc_pre_mix)
    monkeypatch.setenv("DSV4_HC_MIX", "1")
    monkeypatch.delenv("DSV4_HC_MIX_PREFILL", raising=False)
    for tokens in (1, 8, 64):
        r = against_float64(tokens, 4096, iters=20, hc_eps=1e-6, head=head, device="cuda")
        assert max(r["ratios"]) <= 1 and r["rtne"] and r["weights"] and r["shapes"], (tokens, r)
    assert batch_invariant(64, 4096, [0, 5, 37, 63], iters=20, head=head, device="cuda")
    h, *params = make_inputs(65, 4096, 4, head, device="cuda", seed=1)
    rest = (1e-6, 1e-6) if head else (4, 20, 1e-6, 1e-6)
    kernel = "triton_hc_head" if head else "triton_hc_pre"
    with torch.inference_mode():
        assert which(name, h[:, :64], *params, *rest) == kernel
        assert which(name, h, *params, *rest) == "twin"                        # above 64 tokens
        got, want = op(h[:, :64], *params, *rest), op.twin(h[:, :64], *params, *rest)
    assert which(name, h[:, :64], *params, *rest) == "twin"                    # grad enabled: training
    got, want = ([got], [want]) if head else (got, want)
    for a, b, bound in zip(got, want, [2**-7, 1e-5, 1e-5, 1e-5], strict=False):   # y: <= one bf16 unit
        assert a.dtype == b.dtype and a.shape == b.shape
        assert ((a.double() - b.double()).abs().max() / b.double().abs().max()).item() <= bound


@pytest.mark.gpu
@pytest.mark.parametrize("head", [False, True], ids=["pre", "head"])
def test_prefill_chunks_on_cuda_at_flash_dims(head, monkeypatch):
    """DSV4_HC_MIX_PREFILL=1: above 64 tokens (a 2048-token chunk here) dispatch takes the kernel, with the same
    bounds as at decode (fp32 class against float64, y rounded to nearest even; within one bf16 unit / 1e-5 of the
    plain path); DSV4_HC_MIX alone does not turn it on there."""
    name, op = ("hc_head_mix", ops.hc_head_mix) if head else ("hc_pre_mix", ops.hc_pre_mix)
    monkeypatch.setenv("DSV4_HC_MIX", "1")
    monkeypatch.delenv("DSV4_HC_MIX_PREFILL", raising=False)
    h, *params = make_inputs(2048, 4096, 4, head, device="cuda", seed=2)
    rest = (1e-6, 1e-6) if head else (4, 20, 1e-6, 1e-6)
    kernel = "triton_hc_head" if head else "triton_hc_pre"
    with torch.inference_mode():
        assert which(name, h, *params, *rest) == "twin"
        monkeypatch.setenv("DSV4_HC_MIX_PREFILL", "1")
        assert which(name, h, *params, *rest) == kernel
        got, want = op(h, *params, *rest), op.twin(h, *params, *rest)
    r = against_float64(2048, 4096, iters=20, hc_eps=1e-6, head=head, device="cuda")
    assert max(r["ratios"]) <= 1 and r["rtne"] and r["weights"] and r["shapes"], r
    got, want = ([got], [want]) if head else (got, want)
    for a, b, bound in zip(got, want, [2**-7, 1e-5, 1e-5, 1e-5], strict=False):   # y: <= one bf16 unit
        assert a.dtype == b.dtype and a.shape == b.shape
        assert ((a.double() - b.double()).abs().max() / b.double().abs().max()).item() <= bound
