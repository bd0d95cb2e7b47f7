"""The training step's restructured paths against their plain twins: same loss, same gradients.

Each comparison runs one training forward + backward of the tiny model (fp32, QAT emulation on, `prepare_full(qat
=True)`: what `scripts/train_builtin_gpu.py` trains) through the fast path and through its twin, on fresh inputs.
Tolerances: the fp32 model accumulates its products in float64 and rounds once (ops.acc_dtype), so a restructured
product (batched instead of one per expert) almost always rounds to the same fp32 value, and a sum of the same terms
in another association differs by an fp32 rounding: `assert_close` at fp32 defaults (rtol 1.3e-6, atol 1e-5).
Where the restructuring only reorders independent work the comparison is exact (rtol = atol = 0).
"""

from __future__ import annotations

import random

import pytest
import torch

import dsv4
from dsv4 import ops
from dsv4.train.data import Document
from dsv4.train.forward import TrainStep, packed_batch
from dsv4.train.params import prepare_full


@pytest.fixture(scope="module")
def qat_model(tiny_ckpt):
    m = dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=True, progress=False)
    return prepare_full(m, qat=True)


def _docs(lengths, seed):
    rng = random.Random(seed)
    return [Document([rng.randrange(512) for _ in range(n)], [True] * n) for n in lengths]


def loss_and_grads(model, docs, grad_ckpt=False):
    """(main CE + MTP CE, {name: grad}) of one training forward/backward over `docs` packed as one batch."""
    model.zero_grad(set_to_none=True)
    ce, mtp, _, _ = TrainStep(model, grad_ckpt, mtp_weight=1.0)(packed_batch(docs, "cpu"))
    loss = ce + mtp
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same_training(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_batched_routed_experts_match_the_expert_loop(qat_model):
    """All experts in one batched product per matrix (training) == one expert at a time; every routed expert
    receives a gradient through both."""
    docs = _docs([70, 33], seed=11)
    moe = qat_model.layers[1].ffn
    x, ids = torch.randn(5, moe.dim), torch.randint(0, 512, (5,))
    with torch.enable_grad():
        assert moe._routed_path(x, moe.gate(x, ids)[1]) == moe.routed_batched
        with ops.reference_only("moe_batched"):
            assert moe._routed_path(x, moe.gate(x, ids)[1]) == moe.routed_loop
    fast = loss_and_grads(qat_model, docs)
    with ops.reference_only("moe_batched"):
        twin = loss_and_grads(qat_model, docs)
    assert_same_training(fast, twin)
    assert all(f"layers.1.ffn.experts.{e}.w2.weight" in fast[1] for e in range(moe.n_experts))


def test_batched_experts_padded_to_all_rows_match_the_counted_width(qat_model, monkeypatch):
    """`routed_batched` pads every expert's group to all rows under CUDA-graph capture (no host read of the counts):
    the same sum as at the counted width (fp32: the zero rows change nothing but the batched product's shape)."""
    moe = qat_model.layers[1].ffn
    g = torch.Generator().manual_seed(5)
    x, ids = torch.randn(7, moe.dim, generator=g), torch.randint(0, 512, (7,), generator=g)
    with torch.no_grad():
        weights, eids = moe.gate(x, ids)
        counted = moe.routed_batched(x, weights, eids)
        monkeypatch.setattr(type(moe), "PAD_GROUPS_TO_ALL_ROWS", True)
        padded = moe.routed_batched(x, weights, eids)
    assert int(torch.bincount(eids.flatten()).max()) < 7         # the padded width differs from the counted one
    torch.testing.assert_close(padded, counted)


def test_sinkhorn_backward_matches_autograd_of_the_twin():
    """The mHC split + Sinkhorn under autograd takes the hand-written backward: forward bit-identical to the
    twin, gradients equal to autograd's through the twin (fp32 roundings apart), and correct in float64
    (gradcheck, its defaults)."""
    g = torch.Generator().manual_seed(3)
    hc, iters, eps = 4, 20, 1e-6
    mixes = torch.randn(3, 50, (2 + hc) * hc, generator=g) * 2
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn((2 + hc) * hc, generator=g)
    args = [t.clone().requires_grad_(True) for t in (mixes, scale, base)]
    assert ops.registry.which("hc_split_sinkhorn", *args, hc, iters, eps) == "sinkhorn_backward"
    weights = [torch.randn(3, 50, hc, generator=g), torch.randn(3, 50, hc, generator=g),
               torch.randn(3, 50, hc, hc, generator=g)]

    def run(fn):
        ins = [t.detach().clone().requires_grad_(True) for t in args]
        outs = fn(*ins, hc, iters, eps)
        sum((o * w).sum() for o, w in zip(outs, weights, strict=True)).backward()
        return outs, [t.grad for t in ins]

    (fast, fast_grads), (twin, twin_grads) = run(ops.hc_split_sinkhorn), run(ops.ref.hc_split_sinkhorn)
    for a, b in zip(fast, twin, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(fast_grads, twin_grads, strict=True):
        torch.testing.assert_close(a, b)
    ins = [t.detach()[:, :4].double().requires_grad_(True) if t.dim() > 1 else t.detach().double().requires_grad_(True)
           for t in args]
    assert torch.autograd.gradcheck(lambda m, s, b: ops.hc_split_sinkhorn(m, s, b, hc, 5, eps)[2], ins)


def test_sparse_attention_recomputed_in_backward_is_bit_identical(qat_model):
    """Training runs the sparse attention under activation checkpointing: loss and every gradient exactly as
    without (the backward recomputes the same ops on the same inputs)."""
    docs = _docs([45, 20], seed=12)
    q, kv = torch.randn(1, 3, 2, 8, requires_grad=True), torch.randn(1, 5, 8)
    assert ops.registry.which("sparse_attention", q, kv, torch.zeros(2), torch.zeros(1, 3, 2, dtype=torch.long),
                              1.0) == "sparse_attention_recompute"
    fast = loss_and_grads(qat_model, docs)
    with ops.reference_only("attention_recompute"):
        twin = loss_and_grads(qat_model, docs)
    assert_same_training(fast, twin, rtol=0, atol=0)


def test_gradient_checkpointing_with_qat_and_mtp_gives_the_same_training(qat_model):
    """grad_ckpt (every block, the head's loss and the MTP block's recomputed in the backward) on the QAT model with
    MTP: the same loss, and gradients equal up to the order in which shared parameters (embedding, head) sum their
    contributions."""
    docs = _docs([50, 3, 30], seed=13)
    assert_same_training(loss_and_grads(qat_model, docs, grad_ckpt=True), loss_and_grads(qat_model, docs))


def test_split_tail_attention_matches_its_definition():
    """HCA attention in training: the dense tail of compressed entries scored by one product, not gathered per
    query == the definition (the tail appended to the index lists); queries that see no entry, masked window rows
    and a head whose sink dominates included. Forward and gradients at fp32 defaults (two partial sums)."""
    g = torch.Generator().manual_seed(4)
    b, s, h, d, n, e = 1, 40, 4, 16, 50, 9
    q, kv, tail = (torch.randn(*shape, generator=g) for shape in ((b, s, h, d), (b, n, d), (b, e, d)))
    sink = torch.tensor([0.0, 3.0, -2.0, 8.0])
    idx = torch.randint(-1, n, (b, s, 12), generator=g)
    visible = torch.arange(1, s + 1).view(1, s) // 4              # the first 3 queries see no entry
    ins = [t.clone().requires_grad_(True) for t in (q, kv, sink, tail)]
    assert ops.registry.which("sparse_attention_dense_tail", ins[0], ins[1], ins[2], idx, ins[3], visible,
                              0.3) == "split_tail"

    def run(fn):
        ins = [t.detach().clone().requires_grad_(True) for t in (q, kv, sink, tail)]
        out = fn(ins[0], ins[1], ins[2], idx, ins[3], visible, 0.3)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        return out, [t.grad for t in ins]

    fast, twin = run(ops.sparse_attention_dense_tail), run(ops.ref.sparse_attention_dense_tail)
    torch.testing.assert_close(fast[0], twin[0])
    for a, b_ in zip(fast[1], twin[1], strict=True):
        torch.testing.assert_close(a, b_)


def test_training_with_split_tail_attention_matches_the_definition(qat_model):
    """A document long enough for HCA entries (ratio 128): training through the split tail == through the
    definition."""
    docs = _docs([300], seed=14)
    fast = loss_and_grads(qat_model, docs)
    with ops.reference_only("sparse_attention_dense_tail"):
        twin = loss_and_grads(qat_model, docs)
    assert_same_training(fast, twin)


def test_straight_through_function_equals_the_autograd_expression():
    """`straight_through` as one autograd function: the value of `rounded.detach() + (x - x.detach())` bit for bit
    (-0.0, inf and NaN included) and the gradient passed to x unchanged, in fp32 and bf16."""
    from dsv4.quant.act import straight_through

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.tensor([1.3, -0.2, 0.0, -0.0, float("inf"), float("nan"), 5e-30]).to(dtype).requires_grad_(True)
        rounded = torch.tensor([1.25, -0.25, -0.0, -0.0, 448.0, 1.0, 0.0])
        want = rounded.to(dtype) + (x.detach() - x.detach())
        got = straight_through(x, rounded)
        assert torch.equal(got.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        g = torch.linspace(-2, 3, 7).to(dtype)
        got.backward(g)
        assert torch.equal(x.grad, g)


_SINKHORN_KERNEL_CHECK = """
import torch
from dsv4 import ops
from dsv4.ops.triton.sinkhorn import hc_split_sinkhorn, hc_split_sinkhorn_backward
g = torch.Generator().manual_seed(5)
hc, iters, eps = 4, 20, 1e-6
worst = []
for t in (37, 64):
    mixes = torch.randn(t, (2 + hc) * hc, generator=g) * 2
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn((2 + hc) * hc, generator=g)
    gp, gq, gc = torch.randn(t, hc, generator=g), torch.randn(t, hc, generator=g), torch.randn(t, hc, hc, generator=g)
    ins = [x.clone().requires_grad_(True) for x in (mixes, scale, base)]
    outs = ops.ref.hc_split_sinkhorn(*ins, hc, iters, eps)
    ((outs[0] * gp).sum() + (outs[1] * gq).sum() + (outs[2] * gc).sum()).backward()
    got = hc_split_sinkhorn_backward(mixes, scale, base, gp, gq, gc, hc, iters, eps)
    for a, b in zip(hc_split_sinkhorn(mixes, scale, base, hc, iters, eps), outs):
        worst.append(((a - b).abs().max() / b.abs().max()).item())
    for a, x in zip(got, ins):
        worst.append(((a - x.grad).abs().max() / x.grad.abs().max()).item())
print(max(worst))
"""


def test_sinkhorn_triton_backward_in_the_interpreter(tmp_path):
    """The Triton backward of mHC split + Sinkhorn (training on CUDA) on CPU through TRITON_INTERPRET=1, against
    autograd through the twin: fp32 class (the kernel's exp and divisions may differ by an ulp, and the backward
    recomputes each step's input), max error <= 1e-5 of the largest gradient, over two token counts (a partial
    block of tokens included), for the mixes, scale and base gradients and the forward outputs."""
    from kernel_helpers import run_in_interpreter

    pytest.importorskip("triton")
    assert float(run_in_interpreter(_SINKHORN_KERNEL_CHECK, tmp_path, timeout=120).split()[-1]) <= 1e-5


@pytest.mark.gpu
def test_sinkhorn_training_path_on_cuda():
    """On CUDA, training's mHC split + Sinkhorn is the Triton pair: outputs and gradients as autograd through the
    twin, within 1e-5 of the largest value (fp32 class)."""
    g = torch.Generator("cuda").manual_seed(6)
    hc, iters, eps = 4, 20, 1e-6
    mixes = torch.randn(3000, (2 + hc) * hc, generator=g, device="cuda") * 2
    scale, base = torch.rand(3, generator=g, device="cuda") + 0.5, torch.randn((2 + hc) * hc, generator=g,
                                                                                 device="cuda")
    weights = [torch.randn(3000, hc, generator=g, device="cuda"), torch.randn(3000, hc, generator=g, device="cuda"),
               torch.randn(3000, hc, hc, generator=g, device="cuda")]
    ins = [t.clone().requires_grad_(True) for t in (mixes, scale, base)]
    assert ops.registry.which("hc_split_sinkhorn", *ins, hc, iters, eps) == "triton_sinkhorn_train"

    def run(fn):
        x = [t.detach().clone().requires_grad_(True) for t in ins]
        outs = fn(*x, hc, iters, eps)
        sum((o * w).sum() for o, w in zip(outs, weights, strict=True)).backward()
        return [*outs, *(t.grad for t in x)]

    for a, b in zip(run(ops.hc_split_sinkhorn), run(ops.ref.hc_split_sinkhorn), strict=True):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def test_indexer_selects_in_query_chunks_exactly(qat_model):
    """Long sequences score the indexer's queries in chunks (bounded [n, h, t] scores): in fp32 the picks equal
    the one-shot selection exactly, ties included (FP4-rounded queries and keys tie often)."""
    from dsv4.quant import fake_quant_fp4

    indexer = qat_model.layers[1].attn.indexer
    g = torch.Generator().manual_seed(7)
    n, t, h, d = 203, 50, indexer.n_heads, indexer.head_dim
    w = torch.randn(1, n, h, generator=g)
    q = fake_quant_fp4(torch.randn(1, n, h, d, generator=g), 32)
    keys = fake_quant_fp4(torch.randn(1, t, d, generator=g), 32)
    whole = indexer.select(w, q, keys, 0, 7)
    indexer.SELECT_CHUNK_ELEMENTS = 37 * h * t                    # 6 chunks, the last one partial
    try:
        chunked = indexer.select(w, q, keys, 0, 7)
    finally:
        del indexer.SELECT_CHUNK_ELEMENTS
    assert torch.equal(chunked, whole) and (whole >= 0).any() and (whole < 0).any()


def test_masters_copied_back_in_one_foreach_copy_round_like_copy():
    """bf16 parameters get their fp32 masters back through one foreach copy: the same bits as `copy_`."""
    from dsv4.train.optim import MasterWeights

    g = torch.Generator().manual_seed(8)
    params = [torch.nn.Parameter(torch.randn(5, 7, generator=g).bfloat16()), torch.nn.Parameter(torch.randn(3))]
    mw = MasterWeights(params)
    with torch.no_grad():
        for m in mw.masters:
            m.add_(torch.randn(m.shape, generator=g) * 1e-3)
    want = [p.detach().clone().copy_(m.detach()) for p, m in zip(params, mw.masters, strict=True)]
    mw.masters_to_params()
    assert all(torch.equal(p, w) for p, w in zip(params, want, strict=True))


def test_sinkhorn_kernels_compile_once_for_every_token_count():
    """The Triton Sinkhorn pair is not specialised on the token count T: packs of varying length (a T divisible by
    16 now and then) must not compile the kernels again mid-run (issue 17: ~250 ms of host time in one step)."""
    pytest.importorskip("triton")
    from dsv4.ops.triton import sinkhorn

    for kernel in (sinkhorn._sinkhorn, sinkhorn._sinkhorn_bwd):
        assert "T" in kernel.do_not_specialize, kernel


def test_sinkhorn_backward_compiles_for_hopper_without_a_gpu():
    """The backward (its step replay into the scratch buffer: an if / else on the runtime step index) compiles
    ahead of time for sm_90; an earlier version that the interpreter ran did not compile on the GPU."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv4.ops.triton import sinkhorn

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    ptrs = ("m_ptr", "scale_ptr", "base_ptr", "gpre_ptr", "gpost_ptr", "gcomb_ptr", "gz_ptr", "cs_ptr")
    sig = {**dict.fromkeys(ptrs, "*fp32"), "T": "i32", "eps": "fp32"}
    cs = {"ITERS": 20, "HC": 4, "BLOCK_T": 32}
    kernel = triton.compile(ASTSource(sinkhorn._sinkhorn_bwd, {**sig, **dict.fromkeys(cs, "constexpr")},
                                      constexprs=cs), target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"]


@pytest.mark.gpu
def test_sinkhorn_training_pair_compiles_once_on_cuda():
    """On CUDA: the forward and backward kernels run for T = 31920 (divisible by 16), 31921 and 1 with one compiled
    variant each."""
    from dsv4.ops.triton import sinkhorn

    def variants():
        return [sum(len(c[0]) for c in k.device_caches.values()) for k in (sinkhorn._sinkhorn, sinkhorn._sinkhorn_bwd)]

    hc, iters, eps = 4, 20, 1e-6
    scale, base = torch.rand(3, device="cuda") + 0.5, torch.randn((2 + hc) * hc, device="cuda")
    seen = []
    for t in (31921, 31920, 1):
        mixes = torch.randn(t, (2 + hc) * hc, device="cuda")
        sinkhorn.hc_split_sinkhorn(mixes, scale, base, hc, iters, eps)
        sinkhorn.hc_split_sinkhorn_backward(mixes, scale, base, torch.ones(t, hc, device="cuda"),
                                            torch.ones(t, hc, device="cuda"), torch.ones(t, hc, hc, device="cuda"),
                                            hc, iters, eps)
        seen.append(variants())
    assert seen[0] == seen[1] == seen[2], seen


# The act-quant rounding before the bytes work (bench/notes/train_speed.md, "Where a step's bytes go"): x copied to
# fp32 first, the rounded value multiplied in fp32 (then cast to x's dtype by the caller or straight_through).
def _act_quant_fp32_copy(x, block=128):
    from dsv4.quant.act import E4M3_MAX, FP8_AMAX_FLOOR, _blocks, pow2_ceil_scale, to_e4m3

    xb = _blocks(x, block)
    s = pow2_ceil_scale(xb.abs().amax(-1).clamp(min=FP8_AMAX_FLOOR), E4M3_MAX)
    return to_e4m3((xb / s.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX)).flatten(-2), s


def _dequantize_fp32(q, s, block, dtype):
    return (q.float().unflatten(-1, (-1, block)) * s.unsqueeze(-1)).flatten(-2).to(dtype)


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_act_quant_without_the_fp32_copy_gives_the_same_bits(dtype):
    """`act_quant` of a 16-bit x takes |x|'s block maximum in x's dtype and lets x / s promote (no fp32 copy of x);
    `dequantize_blocks` multiplies in bf16 for bf16: the same bits as the fp32 formulas, over every finite bf16
    value (in random blocks), +-0, +-inf, NaN, all-zero and tiny blocks."""
    from dsv4.quant.act import act_quant, dequantize_blocks

    g = torch.Generator().manual_seed(0)
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    every = every[torch.isfinite(every)]
    x = every[torch.randperm(every.numel(), generator=g)][: (every.numel() // 128) * 128].view(-1, 128)
    special = torch.zeros(6, 128)
    special[1, 5], special[2, 7], special[3, 9] = float("inf"), float("nan"), -0.0
    special[4] = torch.randn(128, generator=g) * 1e-30
    special[5] = torch.randn(128, generator=g) * 1e4
    x = torch.cat([x, special, torch.randn(64, 128, generator=g) * 3]).to(dtype)
    q_new, s_new = act_quant(x, 128)
    q_old, s_old = _act_quant_fp32_copy(x, 128)
    assert torch.equal(_bits(s_new), _bits(s_old)) and torch.equal(_bits(q_new), _bits(q_old))
    for out in {dtype, torch.float32}:
        got, want = dequantize_blocks(q_new, s_new, 128, out), _dequantize_fp32(q_old, s_old, 128, out)
        assert got.dtype == want.dtype == out
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan) and torch.equal(_bits(got[~nan]), _bits(want[~nan]))


def test_training_step_bit_identical_without_the_act_quant_fp32_copies(tiny_ckpt, monkeypatch):
    """bf16 training step of the tiny QAT model (every FP8 linear input and the MoE's fake-quant): loss and every
    gradient bit for bit the same with the act-quant rounding's fp32 copies put back."""
    import dsv4.ops.ref as ref
    import dsv4.quant.act as act

    model = prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, quant_emulation=True, progress=False),
                         qat=True)
    docs = _docs([70, 33], seed=5)
    new = loss_and_grads(model, docs)
    for module in (ref, act):
        monkeypatch.setattr(module, "act_quant", _act_quant_fp32_copy)
        monkeypatch.setattr(module, "dequantize_blocks", _dequantize_fp32)
    old = loss_and_grads(model, docs)
    assert torch.isfinite(new[0]) and new[1]
    assert_same_training(new, old, rtol=0, atol=0)
