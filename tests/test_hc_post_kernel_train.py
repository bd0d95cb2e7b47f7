"""mHC post's one-pass kernels in training (`ops/triton/hc_post.py` forward + `hc_post_backward`, one custom op
with autograd: `ops.hc_mix._post_train_kernel`, dispatched on CUDA with DSV4_HC_POST_TRAIN=1) against float64
autograd through the twin, and the dispatch.

On CPU the kernels run in Triton's interpreter (no tl.dot here, so bf16 and fp16 run too; numpy truncates fp32 ->
bf16 stores). Tolerances, relative (Frobenius) to float64 autograd of the twin on the same (rounded) inputs and
output gradient:
* dx, dres: each element a sum of hc products in fp32, rounded once to the streams' dtype: <= one unit of it
  (2^-7 bf16 truncated, 2^-10 fp16, ~0 fp32: 1e-6);
* dpost, dcomb (fp32, sums over D of products, partial sums per D block added in order): fp32 class, 1e-5;
* the output as tests/hc_post_checks.py bounds it (here only relative: the same units as dx).
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import ROOT, interpreted_json

from dsv4.ops.registry import which

pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernels here)")

UNIT = {"float32": 1e-6, "bfloat16": 2.0**-7, "float16": 2.0**-10}
FP32_CLASS = 1e-5
# (b, s, D, dtype, hc): D = 96 (one partial block), 600 (3 blocks of 256, the last partial), a partial token block
CASES = [(1, 5, 96, "float32", 4), (2, 9, 600, "float32", 4), (2, 9, 600, "bfloat16", 4), (1, 130, 96, "bfloat16", 4),
         (1, 5, 96, "float16", 4), (2, 3, 64, "bfloat16", 8)]

_CHECK = f"""
import json, sys
import torch
sys.path.insert(0, {ROOT + "/tests"!r})
from hc_post_checks import make_inputs
from dsv4.ops.hc_mix import _post_train_kernel, _post_twin


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grads(fn, inputs, g, dtype=None):
    leaves = [t.detach().clone() if dtype is None else t.detach().to(dtype) for t in inputs]
    for t in leaves:
        t.requires_grad_()
    out = fn(*leaves)
    out.backward(g if dtype is None else g.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


res = {{}}
for b, s, d, dtype, hc in {CASES!r}:
    inputs = make_inputs(b, s, d, getattr(torch, dtype), hc, seed=len(res))
    g = torch.randn(b, s, hc, d, generator=torch.Generator().manual_seed(7)).to(getattr(torch, dtype))
    kernel = grads(_post_train_kernel, inputs, g)
    exact = grads(_post_twin, inputs, g, torch.float64)
    res[f"{{b}}x{{s}}x{{hc}}x{{d}}-{{dtype}}"] = dict(zip(("out", "dx", "dres", "dpost", "dcomb"),
                                                       (rel(a, c) for a, c in zip(kernel, exact))))
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    return interpreted_json(_CHECK, tmp_path_factory.mktemp("hc_post_train"))


@pytest.mark.slow
def test_forward_and_gradients_against_float64(checked):
    assert len(checked) == len(CASES)
    for case, errs in checked.items():
        unit = UNIT[case.split("-")[-1]]
        for name, err in errs.items():
            bound = FP32_CLASS if name in ("dpost", "dcomb") else unit
            assert err <= bound, f"{case}: {name} relative error {err:.2e} > {bound:.1e}"


def test_dispatch_is_cuda_only_and_opt_in(monkeypatch):
    from hc_post_checks import make_inputs

    inputs = [t.requires_grad_() for t in make_inputs(1, 128, 64, torch.bfloat16)]
    monkeypatch.setenv("DSV4_HC_POST_TRAIN", "1")
    assert which("hc_post", *inputs) == "twin"                       # CPU: the twin



def test_backward_compiles_for_hopper_without_a_gpu():
    """The backward's bf16 loads / stores and reductions compile ahead of time to sm_90 (Flash's D = 4096 blocks)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv4.ops.triton.hc_post import BLOCK_D, BLOCK_T, _hc_post_backward

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    sig = {"g_ptr": "*bf16", "x_ptr": "*bf16", "r_ptr": "*bf16", "post_ptr": "*fp32", "comb_ptr": "*fp32",
           "dx_ptr": "*bf16", "dr_ptr": "*bf16", "dpost_ptr": "*fp32", "dcomb_ptr": "*fp32", "T": "i32", "D": "i32"}
    cs = {"HC": 4, "BLOCK_T": BLOCK_T, "BLOCK_D": BLOCK_D}
    kernel = triton.compile(ASTSource(_hc_post_backward, {**sig, **dict.fromkeys(cs, "constexpr")}, constexprs=cs),
                            target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"]

@pytest.mark.gpu
def test_training_kernels_on_cuda(monkeypatch):
    """bf16 at the built-in model's training shape (rows of 256, D = 512): dispatched with DSV4_HC_POST_TRAIN=1
    under autograd (unset: the twin, whatever DSV4_HC_POST says), gradients within the units above (to nearest on
    the GPU: half of them)."""
    from hc_post_checks import make_inputs

    import dsv4

    inputs = [t.requires_grad_() for t in make_inputs(8, 256, 512, torch.bfloat16, device="cuda")]
    monkeypatch.delenv("DSV4_HC_POST_TRAIN", raising=False)
    monkeypatch.setenv("DSV4_HC_POST", "1")                             # inference's switch does not turn it on
    assert which("hc_post", *inputs) == "twin"
    monkeypatch.setenv("DSV4_HC_POST_TRAIN", "1")
    assert which("hc_post", *inputs) == "triton_hc_post_train"
    g = torch.randn(8, 256, 4, 512, device="cuda").bfloat16()
    out = dsv4.ops.hc_post(*inputs)
    out.backward(g)
    exact_leaves = [t.detach().double().requires_grad_() for t in inputs]
    want = dsv4.ops.hc_post.twin(*exact_leaves)
    want.backward(g.double())

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()
    assert rel(out, want) <= 2.0**-8
    for name, a, b in zip(("dx", "dres", "dpost", "dcomb"), inputs, exact_leaves, strict=True):
        bound = FP32_CLASS if name in ("dpost", "dcomb") else 2.0**-8
        assert rel(a.grad, b.grad) <= bound, name
