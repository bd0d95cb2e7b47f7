"""`ops.indexer_scores`, the lightning indexer's scores (`ops/indexer_scores.py`): the twin is the formula the model
used before the op existed (over keys padded to `KEYS_ALIGN`), bit for bit; the Triton kernel
(`ops/triton/indexer_scores.py`) against the twin's roundings emulated in float64, within the precision class that
tests/indexer_scores_checks.py derives: in Triton's CPU interpreter (one subprocess, ~5 s) and on CUDA at the
builtin and Flash dims. Mutation-checked: dropping the relu, the w factor, either rounding, or moving the mask or the
block skip by one fails the interpreter cases."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import ROOT, interpreted_json

from dsv4 import ops
from dsv4.ops.registry import which

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _formula_before_the_op(w, q, keys, visible):
    """`Indexer.weighted_scores` and `select`'s mask as they were written before `ops.indexer_scores`, over the keys
    padded to `KEYS_ALIGN` (since v11: the scores of the same keys must not depend on how many others there are; the
    padding moves fp32 head sums by their summation order, measured here on CPU, and no 16-bit score)."""
    from dsv4.ops.ref import KEYS_ALIGN

    acc = ops.acc_dtype(q.dtype) if q.dtype == torch.float32 else q.dtype
    t = keys.shape[1]
    keys = torch.nn.functional.pad(keys, (0, 0, 0, -t % KEYS_ALIGN))
    dots = torch.einsum("bshd,btd->bsht", q.to(acc), keys.to(acc)).to(q.dtype)
    score = (dots.relu() * w.unsqueeze(-1)).sum(dim=2)[..., :t]
    return score.masked_fill(torch.arange(t) >= visible.unsqueeze(-1), float("-inf"))


def _inputs(b, s, t, h, d, dtype, seed):
    """Weights of both signs at the model's scale (1/sqrt(h*d)), unit queries and keys."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(b, s, h, generator=g) * (h * d) ** -0.5).to(dtype)
    return w, torch.randn(b, s, h, d, generator=g).to(dtype), torch.randn(b, t, d, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_twin_is_the_formula_bit_for_bit(dtype):
    w, q, keys = _inputs(2, 37, 23, 16, 128, dtype, seed=1)
    visible = torch.arange(5, 5 + 37).unsqueeze(0).expand(2, -1) // 4          # rows with 1..10 of 23 visible
    visible = visible.clone()
    visible[1, :3] = 0                                                           # rows that see nothing
    got = ops.indexer_scores(w, q, keys, visible)
    want = _formula_before_the_op(w, q, keys, visible)
    assert got.dtype == dtype and torch.equal(got, want)
    unmasked = ops.indexer_scores(w, q, keys)
    assert torch.equal(unmasked, _formula_before_the_op(w, q, keys, torch.full((2, 37), 23)))


def test_dispatch_takes_the_twin_on_cpu(monkeypatch):
    monkeypatch.setenv("DSV4_INDEXER_KERNEL", "1")
    w, q, keys = _inputs(1, 4, 8, 16, 128, torch.bfloat16, seed=2)
    assert which("indexer_scores", w, q, keys, None) == "twin"


# The kernel in Triton's CPU interpreter (a subprocess: TRITON_INTERPRET is read when triton is imported), fp16 and
# fp32 operands (the interpreter's bf16 tl.dot is wrong). Each case: b, s, t, h, d, dtype, start (visibility of
# queries at positions start..; None: unmasked), seed, FP4-quantised q and keys, block sizes (none: the defaults).
KERNEL_CASES = {
    "builtin-h16-ragged-masked": (2, 150, 70, 16, 128, "float16", 130, 0, False, dict(block_s=64, block_t=32)),
    "flash-h64-masked-skipped_blocks": (1, 40, 100, 64, 128, "float16", 250, 1, False, dict(block_s=32, block_t=32)),
    "t_below_topk-rows_seeing_nothing": (1, 20, 5, 16, 128, "float16", 0, 2, False, {}),
    "unmasked-decode_rows": (4, 1, 77, 16, 128, "float16", None, 3, False, {}),
    "fp4-ties": (1, 64, 60, 16, 128, "float16", 200, 4, True, dict(block_s=32, block_t=32)),
    "fp32-ieee_dots": (1, 33, 45, 16, 64, "float32", 100, 5, False, dict(block_s=32, block_t=32)),
}

_CHECK = f"""
import json, sys
import torch
sys.path.insert(0, {ROOT + "/tests"!r})
from indexer_scores_checks import against_emulation
res = {{name: against_emulation(b, s, t, h, d, getattr(torch, dt), start, seed, fp4, **blocks)
        for name, (b, s, t, h, d, dt, start, seed, fp4, blocks) in {KERNEL_CASES!r}.items()}}
import dsv4.ops
from dsv4.ops.triton.indexer_scores import indexer_scores
from indexer_scores_checks import causal_visible, make_inputs
w, q, keys = make_inputs(2, 20, 30, 16, 64, torch.float16)
for vis in (causal_visible(2, 20, 50), None):       # the registered custom op (what dispatch calls) = the launcher
    res.setdefault("custom_op", []).append(torch.equal(torch.ops.dsv4.indexer_scores(w, q, keys, vis),
                                                       indexer_scores(w, q, keys, vis)))
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernel here)")
    return interpreted_json(_CHECK, tmp_path_factory.mktemp("indexer_scores"))


def test_custom_op_runs_the_kernel(interpreted):
    assert interpreted["custom_op"] == [True, True]


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_is_in_the_class_of_the_emulated_twin(interpreted, case):
    """Within the derived bound (tests/indexer_scores_checks.py: 4 spacings of the dtype at the sum of the terms'
    magnitudes) of the twin's roundings in float64; -inf exactly at the invisible entries (rows seeing nothing:
    all -inf); the top-k the same but for near-ties. fp16: >= 98% of the outputs bit-equal to the emulation (a
    head's dot moves only within fp32 noise of a rounding boundary: 99.6-100% measured; any missing rounding makes
    most outputs differ); fp32 dots are no rounding boundary away from their accumulation error, so not there."""
    r = interpreted[case]
    assert r["same_inf"] and r["worst"] <= 1 and r["topk_near_ties_only"], r
    if KERNEL_CASES[case][5] == "float16":
        assert r["equal"] >= 0.98, r
    if KERNEL_CASES[case][8]:                           # FP4 values: every dot and sum exact, so no moved head
        assert r["equal"] == 1 and r["topk_same"], r


def test_launcher_names_bad_input():
    pytest.importorskip("triton")
    from dsv4.ops.triton.indexer_scores import indexer_scores

    w, q, keys = _inputs(1, 4, 8, 2, 32, torch.float16, seed=3)
    cases = [((w, q[0], keys), "want w"), ((w, q, keys[..., :16]), "want w"), ((w.float(), q, keys), "one dtype"),
             ((w, q[..., :24], keys[..., :24]), "power of two"), ((w, q, keys, torch.zeros(1, 4)), "visible"),
             ((w, q, keys, torch.zeros(1, 3, dtype=torch.int32)), "visible")]
    for args, words in cases:
        with pytest.raises(ValueError, match=words):
            indexer_scores(*args)


def test_kernel_compiles_for_hopper_without_a_gpu():
    """The bf16 path (what the interpreter cannot run: tl.dot layouts, the rounding conversions, the head loop)
    compiles ahead of time to sm_90 at Flash's 64 heads, masked and not, prefill and decode tile heights."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv4.ops.triton.indexer_scores import _indexer_scores

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    ints = ["S", "T", "sq_b", "sq_s", "sq_h", "sk_b", "sk_t", "sw_b", "sw_s", "sw_h", "sv_b", "sv_s", "so_b", "so_s"]
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "w_ptr": "*bf16", "vis_ptr": "*i64", "out_ptr": "*bf16",
           **dict.fromkeys(ints, "i32")}
    for masked, block_s in ((True, 128), (False, 16)):
        cs = {"H": 64, "D": 128, "MASKED": masked, "IEEE": False, "BLOCK_S": block_s, "BLOCK_T": 128}
        kernel = triton.compile(ASTSource(_indexer_scores, {**sig, **dict.fromkeys(cs, "constexpr")}, constexprs=cs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 2})
        assert "cvt.rn.bf16x2.f32" in kernel.asm["ptx"], cs        # round to nearest even, as torch


@pytest.mark.gpu
@pytest.mark.parametrize("heads,topk,n,t,start", [(16, 4, 4096, 2048, 4096), (64, 512, 4096, 2048, 4096),
                                                  (64, 512, 8192, 2048, 0)],
                         ids=["builtin-chunk", "flash-chunk", "flash-prefill_8k"])
def test_kernel_on_cuda_against_the_twin(monkeypatch, heads, topk, n, t, start):
    """bf16 at the builtin (16 heads, top-4) and Flash (64 heads, top-512) dims, queries at positions start..
    (prefill from 0: half the key blocks skipped): the switch routes `ops.indexer_scores` to the kernel; against
    the twin on the same inputs the -inf pattern is identical, the scores are within twice the class (both are in
    it), >= 95% of them bit-equal, and the top-k picks agree but for near-ties; against the float64 emulation the
    kernel is in the class itself. Unit-variance and FP4-quantised (tie-heavy, the model's) queries and keys."""
    from indexer_scores_checks import causal_visible, compare, emulated, make_inputs

    for fp4 in (False, True):
        w, q, keys = make_inputs(1, n, t, heads, 128, torch.bfloat16, seed=heads, device="cuda", fp4=fp4)
        visible = causal_visible(1, n, start, "cuda")
        monkeypatch.setenv("DSV4_INDEXER_KERNEL", "1")
        with torch.inference_mode():
            assert which("indexer_scores", w, q, keys, visible) == "triton_indexer_scores"
            got = ops.indexer_scores(w, q, keys, visible)
        monkeypatch.setenv("DSV4_INDEXER_KERNEL", "0")
        assert which("indexer_scores", w, q, keys, visible) == "twin"
        twin = ops.indexer_scores(w, q, keys, visible)
        want, absum = emulated(w, q, keys, visible)
        mine = compare(got, want, absum, torch.bfloat16, heads, topk)
        assert mine["same_inf"] and mine["worst"] <= 1 and mine["topk_near_ties_only"], (fp4, mine)
        pair = compare(got, twin.double(), absum, torch.bfloat16, heads, topk, units=2)
        assert pair["same_inf"] and pair["worst"] <= 1 and pair["equal"] >= 0.95, (fp4, pair)
        assert pair["topk_near_ties_only"], (fp4, pair)


@pytest.mark.gpu
def test_dispatch_keeps_the_twin_under_autograd(monkeypatch):
    from dsv4.ops.indexer_scores import KERNEL_MIN_ROWS

    # KERNEL_MIN_ROWS queries: fewer stay on the twin whatever the grad mode (decode; the test predates that rule)
    w, q, keys = (x.cuda() for x in _inputs(1, KERNEL_MIN_ROWS, 16, 16, 128, torch.bfloat16, seed=4))
    monkeypatch.setenv("DSV4_INDEXER_KERNEL", "1")
    assert which("indexer_scores", w, q.requires_grad_(), keys, None) == "twin"
    with torch.no_grad():
        assert which("indexer_scores", w, q, keys, None) == "triton_indexer_scores"
