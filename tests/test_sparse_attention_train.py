"""The fused training sparse attention (`ops/triton/sparse_attention_train.py`: forward with log-sum-exp, fused
backward; one custom op with autograd, `ops.attention.sparse_attention_train`) against the twin's autograd
(`ops.ref.sparse_attention`) and float64, and its dispatch (on CUDA by default; DSV4_SPARSE_ATTN_TRAIN=0 off).

On CPU the kernels run in Triton's interpreter (one subprocess, fp32 inputs: triton 3.6's interpreter computes bf16
tl.dot wrongly), so the probabilities' and ds's bf16 rounding before the dots is checked on the GPU only.

Tolerances by precision class:
* fp32 (interpreter): the twin's operations reordered (tiles, online softmax, fp32 atomics for dkv): relative
  (Frobenius) error vs float64 <= 1e-5 for the output and each gradient (measured ~2e-7).
* bf16 (GPU, the built-in model's training shape): the output in the inference kernel's class (<= 3e-3 vs float64,
  tests/test_sparse_attention_kernel.py); the gradients' dots take bf16 p / ds (flash-attention's rounding, one
  bf16 rounding of each factor: ~2^-9 relative) and the twin's autograd rounds its bf16 gradients too: <= 1e-2
  vs float64, and the kernel no further from float64 than twice the twin plus 2e-3.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import interpreted_json

import dsv4
from dsv4.ops import ref

pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernels here)")

FP32_CLASS = 1e-5

_CHECK = r'''
import json
import torch
from dsv4.ops import ref
from dsv4.ops.attention import sparse_attention_train


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grads(fn, q, kv, sink, idx, do, dtype, scale):
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, kv, sink)]
    o = fn(*leaves, idx, scale)
    o.backward(do.to(dtype))
    return [o.detach()] + [t.grad for t in leaves]


def case(seed, b, s, h, d, n, k, masked, first_masked=0):
    gen = torch.Generator().manual_seed(seed)
    q, kv = torch.randn(b, s, h, d, generator=gen), torch.randn(b, n, d, generator=gen)
    sink, do = torch.randn(h, generator=gen), torch.randn(b, s, h, d, generator=gen)
    idx = torch.randint(0, n, (b, s, k), generator=gen, dtype=torch.int32)      # repeats: counted twice
    idx = torch.where(torch.rand(idx.shape, generator=gen) < masked, -1, idx)
    idx[..., :first_masked] = -1                    # leading tiles see nothing yet (the finfo.min reference)
    idx[..., -1] = torch.randint(0, n, (b, s), generator=gen)                   # every list sees a row
    scale = d ** -0.5
    kernel = grads(sparse_attention_train, q, kv, sink, idx, do, torch.float32, scale)
    twin = grads(ref.sparse_attention, q, kv, sink, idx, do, torch.float32, scale)
    exact = grads(ref.sparse_attention, q, kv, sink, idx, do, torch.float64, scale)
    names = ("out", "dq", "dkv", "dsink")
    out = {f"{n}_vs_f64": rel(a, c) for n, a, c in zip(names, kernel, exact)}
    out.update({f"twin_{n}_vs_f64": rel(a, c) for n, a, c in zip(names, twin, exact)})
    return out


def compiled_equal():
    """The op traced by torch.compile (aot_eager: what inductor would get) gives the eager op's values and
    gradients exactly (the interpreter runs programs one after another: atomics in one order)."""
    gen = torch.Generator().manual_seed(9)
    q, kv, sink = torch.randn(1, 6, 8, 32, generator=gen), torch.randn(1, 20, 32, generator=gen), torch.randn(8)
    idx = torch.randint(-1, 20, (1, 6, 40), generator=gen, dtype=torch.int32)
    idx[..., 0] = 3
    do = torch.randn(1, 6, 8, 32, generator=gen)
    f = sparse_attention_train
    eager = grads(f, q, kv, sink, idx, do, torch.float32, 0.2)
    compiled = grads(torch.compile(f, backend="aot_eager", fullgraph=True), q, kv, sink, idx, do, torch.float32, 0.2)
    return all(torch.equal(a, b) for a, b in zip(eager, compiled))


print(json.dumps({
    "multi_tile_repeats": case(0, 2, 5, 8, 64, 40, 70, 0.3),
    "two_head_blocks_first_tiles_masked": case(1, 1, 3, 70, 32, 50, 100, 0.2, first_masked=40),
    "d128_one_tile": case(2, 2, 4, 8, 128, 24, 16, 0.0),
    "compiled_equal": compiled_equal(),
}))
'''


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    return interpreted_json(_CHECK, tmp_path_factory.mktemp("sat"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multi_tile_repeats", "two_head_blocks_first_tiles_masked", "d128_one_tile"])
def test_output_and_gradients_match_float64_at_fp32_class(checked, name):
    for key, err in checked[name].items():
        assert err <= FP32_CLASS, f"{name}: {key} relative error {err:.2e}"


@pytest.mark.slow
def test_the_op_traces_under_torch_compile(checked):
    assert checked["compiled_equal"]



def test_kernels_compile_for_hopper_without_a_gpu():
    """The bf16 path (the inference kernel storing the lse; the backward's dots with bf16 operands, the transposed
    dkv dots, the fp32 atomics, the pipelined `for` loops) compiles ahead of time to sm_90: what the interpreter
    (fp32 dots, `while` loops) does not check. At the built-in model's training dims (8 heads of 128) and Flash's
    (64 heads of 512)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv4.ops.triton.sparse_attention import _sparse_attention
    from dsv4.ops.triton.sparse_attention_train import _backward

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    common = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "sink_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*bf16"}
    tail = {"S": "i32", "N": "i32", "K": "i32"}
    forward = {**common, "m_ptr": "*fp32", "l_ptr": "*fp32", **tail, "TILES": "i32", "scale": "fp32"}
    backward = {**common, "lse_ptr": "*fp32", "do_ptr": "*bf16", "dq_ptr": "*bf16", "dkv_ptr": "*fp32",
                "dsink_ptr": "*fp32", **tail, "scale": "fp32"}
    for h, d, block_h in ((8, 128, 16), (64, 512, 64)):
        for kernel, sig, extra in ((_sparse_attention, forward, {"PARTIAL": False, "LSE": True}),
                                   (_backward, backward, {})):
            cs = {"H": h, "D": d, "BLOCK_H": block_h, "BLOCK_D": d, "BLOCK_K": 32, "IEEE": False, "PIPELINED": True,
                  **extra}
            compiled = triton.compile(ASTSource(kernel, {**sig, **dict.fromkeys(cs, "constexpr")}, constexprs=cs),
                                      target=GPUTarget("cuda", 90, 32))
            assert compiled.asm["cubin"], (kernel.__name__, cs)

def _train_inputs(device, dtype, rows=8, row_len=256, h=8, d=128, k=128, seed=0):
    """Lists shaped like the built-in model's CSA layer on rows packs: a 64-token window (its own row included)
    and top-k picks among the compressed entries, padded to k with -1."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, row_len, h, d, generator=gen).to(device, dtype)
    n = row_len + row_len // 4
    kv = torch.randn(rows, n, d, generator=gen).to(device, dtype)
    sink = torch.randn(h, generator=gen).to(device)
    t = torch.arange(row_len)
    window = t[:, None] - torch.arange(64)[None, :]                                        # [s, 64]
    window = torch.where(window >= 0, window, -1)
    picks = torch.randint(row_len, n, (rows, row_len, 16), generator=gen)
    idx = torch.full((rows, row_len, k), -1, dtype=torch.int32)
    idx[..., :64] = window
    idx[..., 64:80] = picks
    do = torch.randn(rows, row_len, h, d, generator=gen).to(device, dtype)
    return q, kv, sink, idx.to(device), do


def _grads(fn, q, kv, sink, idx, do, dtype):
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, kv, sink)]
    o = fn(*leaves, idx, q.shape[-1] ** -0.5)
    o.backward(do.to(dtype))
    return [o.detach()] + [t.grad for t in leaves]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
def test_bf16_training_shape_on_cuda():
    from dsv4.ops.attention import sparse_attention_train

    q, kv, sink, idx, do = _train_inputs("cuda", torch.bfloat16)
    exact = _grads(ref.sparse_attention, q, kv, sink, idx, do, torch.float64)
    kernel = _grads(sparse_attention_train, q, kv, sink, idx, do, torch.bfloat16)
    twin = _grads(ref.sparse_attention, q, kv, sink, idx, do, torch.bfloat16)
    for name, a, b, c in zip(("out", "dq", "dkv", "dsink"), kernel, twin, exact, strict=True):
        err, twin_err = _rel(a, c), _rel(b, c)
        print(f"{name}: kernel {err:.2e}, twin {twin_err:.2e} vs float64")
        assert err <= (3e-3 if name == "out" else 1e-2), f"{name}: {err:.2e}"
        assert err <= 2 * twin_err + 2e-3, f"{name}: kernel {err:.2e} vs twin {twin_err:.2e}"


def test_training_dispatch_is_cuda_only(monkeypatch):
    q, kv, sink, idx, _ = _train_inputs("cpu", torch.float32, rows=1, row_len=64)
    leaves = [t.detach().clone().requires_grad_() for t in (q, kv, sink)]
    which = dsv4.ops.registry.which
    monkeypatch.delenv("DSV4_SPARSE_ATTN_TRAIN", raising=False)                               # the default: on
    assert which("sparse_attention", *leaves, idx, 0.1) == "sparse_attention_recompute"       # CPU: the twin
    monkeypatch.setenv("DSV4_SPARSE_ATTN_TRAIN", "0")
    assert which("sparse_attention", *leaves, idx, 0.1) == "sparse_attention_recompute"
    with torch.no_grad():
        assert which("sparse_attention", *leaves, idx, 0.1) == "twin"


@pytest.mark.gpu
def test_training_dispatch_takes_the_kernel_on_cuda(monkeypatch):
    """By default, under autograd on CUDA (bf16) both sparse attention ops take the fused training op
    (DSV4_SPARSE_ATTN_TRAIN=0: the twin recomputed); the dense tail through the definition's layout gives the
    definition's gradients (float64 twin)."""
    q, kv, sink, idx, do = _train_inputs("cuda", torch.bfloat16, rows=2, row_len=256)
    leaves = [t.detach().clone().requires_grad_() for t in (q, kv, sink)]
    monkeypatch.setenv("DSV4_SPARSE_ATTN_TRAIN", "0")
    assert dsv4.ops.registry.which("sparse_attention", *leaves, idx, 0.1) == "sparse_attention_recompute"
    monkeypatch.delenv("DSV4_SPARSE_ATTN_TRAIN")
    scale = q.shape[-1] ** -0.5
    assert dsv4.ops.registry.which("sparse_attention", *leaves, idx, scale) == "triton_sparse_attention_train"
    tail = torch.randn(2, 2, q.shape[-1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    visible = (torch.arange(256, device="cuda") + 1).div(128, rounding_mode="floor").expand(2, 256).contiguous()
    args = (*leaves, idx, tail, visible, scale)
    assert dsv4.ops.registry.which("sparse_attention_dense_tail", *args) == "triton_dense_tail_train"
    got = dsv4.ops.sparse_attention_dense_tail(*args)
    got.backward(do)
    with dsv4.ops.registry.reference_only("sparse_attention_dense_tail"):
        exact_leaves = [t.detach().double().requires_grad_() for t in (*leaves, tail)]
        want = dsv4.ops.sparse_attention_dense_tail(*exact_leaves[:3], idx, exact_leaves[3], visible, scale)
        want.backward(do.double())
    assert _rel(got, want) <= 3e-3
    for a, b in zip([*leaves, tail], exact_leaves, strict=True):
        assert _rel(a.grad, b.grad) <= 1e-2
