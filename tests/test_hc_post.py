"""`ops.hc_post` (mHC post, `model/hyper.py`'s hc_post): its twin is the previous formula bit for bit, and the
one-pass Triton kernel (`ops/triton/hc_post.py`) against the twin and float64; tolerances in tests/hc_post_checks.py.

On CPU the kernel runs in Triton's interpreter (numpy: no FMA contraction, fp32 -> bf16 stores truncate).
"""

from __future__ import annotations

import pytest
import torch
from hc_post_checks import compare, make_inputs
from kernel_helpers import ROOT, interpreted_json

from dsv4 import ops
from dsv4.model import hyper
from dsv4.ops.registry import which

# (b, s, D, dtype, hc, strided): D = 96 (< one 128 block, masked), 600 (3 blocks of 256, the last partial), token
# counts 1, 5 (a partial 4-token block), 18, 130 (above MAX_TOKENS, as dispatched); hc 2 and 8: HC is general.
CASES = [(1, 1, 64, "float32", 4, False), (1, 5, 96, "float32", 4, False), (2, 9, 600, "float32", 4, False),
         (1, 1, 64, "bfloat16", 4, False), (2, 3, 128, "bfloat16", 4, False), (2, 9, 600, "bfloat16", 4, False),
         (1, 130, 96, "bfloat16", 4, False), (2, 5, 96, "bfloat16", 4, True), (1, 5, 96, "float16", 4, False),
         (2, 9, 600, "float16", 4, False), (1, 5, 96, "float32", 2, False), (2, 3, 64, "bfloat16", 8, False)]

_CHECK = f"""
import json, sys
import torch
sys.path.insert(0, {ROOT + "/tests"!r})
from hc_post_checks import compare, make_inputs
from dsv4.ops.triton.hc_post import hc_post
res = {{}}
for b, s, d, dtype, hc, strided in {CASES!r}:
    inputs = make_inputs(b, s, d, getattr(torch, dtype), hc, seed=len(res), strided=strided)
    res[f"{{b}}x{{s}}x{{hc}}x{{d}}-{{dtype}}{{'-strided' if strided else ''}}"] = compare(hc_post(*inputs), *inputs,
                                                                                            interpreter=True)
print(json.dumps(res))
"""


def _formula(x, residual, post, comb):
    """model/hyper.py's hc_post before it became a dispatched op (frozen here)."""
    mixed = torch.sum(comb.unsqueeze(-1) * residual.unsqueeze(-2), dim=2)   # [b, s, hc(dst), D]
    return (post.unsqueeze(-1) * x.unsqueeze(-2) + mixed).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_is_the_previous_formula_bit_for_bit(dtype):
    """The model's hc_post, the dispatched op on CPU and its twin all give the previous code's bits (CPU tests
    compare model outputs bit for bit)."""
    inputs = make_inputs(2, 7, 96, dtype)
    want = _formula(*inputs)
    for got in (hyper.hc_post(*inputs), ops.hc_post(*inputs), ops.hc_post.twin(*inputs)):
        assert got.dtype == dtype and torch.equal(got, want)


def test_dispatch_takes_the_twin_off_cuda(monkeypatch):
    monkeypatch.delenv("DSV4_HC_POST", raising=False)                   # the default: on (CUDA only)
    with torch.inference_mode():
        assert which("hc_post", *make_inputs(1, 128, 64, torch.bfloat16)) == "twin"


def test_wrapper_rejects_bad_inputs():
    """Shapes, dtypes and hc are checked with ValueErrors before any launch (so CPU tensors suffice)."""
    kernel = pytest.importorskip("dsv4.ops.triton.hc_post", reason="needs triton")
    x, residual, post, comb = make_inputs(1, 3, 64, torch.bfloat16)
    bad = [((x, residual[0, 0, 0], post, comb), "residual must be"),
           ((x, residual[..., :32], post, comb), "x must have shape"),
           ((x, residual, post[..., :2], comb), "post must have shape"),
           ((x, residual, post, comb.mT[..., :2]), "comb must have shape"),
           ((x, residual[..., :3, :], post[..., :3], comb[..., :3, :3]), "power of two"),
           ((x, residual.half(), post, comb), "share a dtype"),
           ((x.double(), residual.double(), post, comb), "share a dtype"),
           ((x, residual, post.double(), comb), "must be fp32")]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            kernel.hc_post(*args)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernel here)")
    return interpreted_json(_CHECK, tmp_path_factory.mktemp("hc_post"))


def test_kernel_in_the_interpreter(interpreted):
    """Every case: the output's shape and dtype; the twin's fp32 values stored as the interpreter stores them, bit
    for bit (numpy contracts no FMA and the kernel sums in the twin's order: fp32 and fp16 outputs are the twin's
    bits, bf16 ones its fp32 value truncated); every element within one unit of the output dtype (+ SLACK) of the
    twin and within the store's rounding of float64 (bounds: tests/hc_post_checks.py)."""
    assert len(interpreted) == len(CASES)
    for case, r in interpreted.items():
        assert r["shape_ok"] and r["stored_fp32"] and r["twin"] <= 1 and r["f64"] <= 1, (case, r)
        assert r["exact"] == (r["dtype"] != "torch.bfloat16") and r["ulps"] <= 1, (case, r)


@pytest.mark.gpu
def test_kernel_on_cuda_at_flash_dims(monkeypatch):
    """D = 4096, hc = 4, 2048 bf16 tokens: by default at inference the dispatched op launches the kernel
    (once), within one bf16 unit + SLACK of the twin elementwise and within 2^-8 M + 2 FP32 of float64 (rounding to
    nearest on the GPU); 64 tokens (decode), autograd, and DSV4_HC_POST=0 take the twin."""
    from dsv4.ops.triton import hc_post as kernel

    calls = []
    real = kernel.hc_post
    monkeypatch.setattr(kernel, "hc_post", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.delenv("DSV4_HC_POST", raising=False)                   # the default: on
    monkeypatch.delenv("DSV4_HC_POST_TRAIN", raising=False)             # training's pair: opt-in
    inputs = make_inputs(1, 2048, 4096, torch.bfloat16, device="cuda")
    decode = [t[:, :64] for t in inputs]
    with torch.inference_mode():
        assert which("hc_post", *inputs) == "triton_hc_post" and which("hc_post", *decode) == "twin"
        got = ops.hc_post(*inputs)
        assert len(calls) == 1
        ops.hc_post(*decode)
        assert len(calls) == 1
    r = compare(got, *inputs, interpreter=False)
    assert r["shape_ok"] and r["twin"] <= 1 and r["f64"] <= 1, r
    assert which("hc_post", *inputs) == "twin"                                  # grad enabled: training
    ops.hc_post(*inputs)
    monkeypatch.setenv("DSV4_HC_POST", "0")
    with torch.inference_mode():
        assert which("hc_post", *inputs) == "twin"
    assert len(calls) == 1
