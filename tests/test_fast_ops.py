"""Fast ops against their plain twins (the definition) and a float64 reference.

Tolerances by precision class are given per test (the FP8 linear has its own file, tests/test_fp8_linear.py).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from kernel_helpers import in_interpreter_at_once

from dsv4 import ops
from dsv4.ops.registry import which
from dsv4.quant import fake_quant_fp8, quant_fp4, quant_fp8


def _weights(fmt, out_f, in_f, gen):
    w = torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5
    return quant_fp8(w) if fmt == "fp8" else quant_fp4(w)


def test_dispatch_uses_the_twin_on_cpu_and_inside_reference_only(monkeypatch):
    calls = []
    ops.registry.register("linear", "spy", lambda *a, **k: True, lambda *a, **k: calls.append(1) or "fast")
    try:
        gen = torch.Generator().manual_seed(6)
        weight, scale = _weights("fp8", 128, 128, gen)
        x = torch.randn(1, 128, generator=gen).bfloat16()
        assert ops.linear(x, weight, scale, "fp8", True) == "fast"
        assert which("linear", x, weight, scale, "fp8", True) == "spy"
        with ops.reference_only():
            assert which("linear", x, weight, scale, "fp8", True) == "twin"
            assert isinstance(ops.linear(x, weight, scale, "fp8", True), torch.Tensor)
        with ops.reference_only("linear"):                                   # per op: to bisect a difference
            assert isinstance(ops.linear(x, weight, scale, "fp8", True), torch.Tensor)
            assert not ops.registry.fast_enabled("linear") and ops.registry.fast_enabled("pair_linear")
            with ops.reference_only("pair_linear"):                          # nesting adds
                assert not ops.registry.fast_enabled("linear") and not ops.registry.fast_enabled("pair_linear")
            assert ops.registry.fast_enabled("pair_linear")
        with ops.reference_only("pair_linear"):
            assert ops.linear(x, weight, scale, "fp8", True) == "fast"
        monkeypatch.setenv("DSV4_FAST_OPS", "0")
        assert isinstance(ops.linear(x, weight, scale, "fp8", True), torch.Tensor)
        assert len(calls) == 2
    finally:
        ops.registry._FAST["linear"] = [f for f in ops.registry._FAST["linear"] if f[0] != "spy"]



@ops.registry.custom_op("test_registry_double", lambda x: torch.empty_like(x))
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _plain_only(t: torch.Tensor) -> None:
    """What a kernel launcher does: it needs a real tensor's data pointer (a FakeTensor or FunctionalTensor under
    tracing has none: the GPU suite's compiled training step failed this way, sparse_attention_train's backward)."""
    if type(t) is not torch.Tensor:
        raise RuntimeError(f"traced into the kernel: {type(t).__name__}")


@ops.registry.custom_op("test_registry_triple", lambda x: torch.empty_like(x))
def _triple(x: torch.Tensor) -> torch.Tensor:
    _plain_only(x)
    return x * 3


@ops.registry.custom_op("test_registry_triple_backward", lambda g: torch.empty_like(g))
def _triple_backward(g: torch.Tensor) -> torch.Tensor:
    _plain_only(g)
    return g * 3


def _triple_grad(ctx, g):
    # torch 2.11 (the GPU machine's) reports is_compiling() False while AOT autograd traces a custom op's backward
    # (2.13 reports True): the state under which the GPU suite's compiled training step reached a Triton launcher
    with mock.patch.object(torch.compiler, "is_compiling", lambda: False):
        return _triple_backward(g)


_triple.register_autograd(_triple_grad, setup_context=lambda ctx, inputs, output: None)


def test_a_removed_switch_in_the_environment_is_named_not_ignored(monkeypatch):
    """An A/B script that still sets a removed switch would compare the default with itself: each one set is named
    in a warning (at `import dsv4.ops`), the others are not."""
    for name in ops.registry.REMOVED_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DSV4_FP8_FUSED_SUM", "1")
    monkeypatch.setenv("DSV4_MOE_TRANSIENT", "0")
    with pytest.warns(UserWarning, match="DSV4_FP8_FUSED_SUM is set but has no effect") as record:
        assert ops.registry.warn_removed_switches() == ["DSV4_FP8_FUSED_SUM", "DSV4_MOE_TRANSIENT"]
    assert len(record) == 2 and "thirty-eighth session" in str(record[0].message)
    monkeypatch.delenv("DSV4_FP8_FUSED_SUM")
    monkeypatch.delenv("DSV4_MOE_TRANSIENT")
    assert ops.registry.warn_removed_switches() == []


def test_custom_op_is_bypassed_in_eager_inference_only():
    """A fast op's decorated name runs the function itself in eager inference (the custom op's dispatch is host
    time: ~35 us a call on a GPU machine, and the 1k prefill is host-bound), and the torch custom op with
    autograd on (training kernels register their backward on it) and under torch.compile (an opaque node)."""
    def op_calls(fn):
        # the profiler records custom ops without being a dispatch mode (a mode on the stack means tracing)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return [e.name for e in prof.events() if e.name.startswith("dsv4::test_registry_double")]

    x = torch.arange(4.0)
    for mode, expect_op in [(torch.inference_mode, False), (torch.no_grad, False), (torch.enable_grad, True)]:
        with mode():
            assert torch.equal(_double(x), 2 * x)
            assert bool(op_calls(lambda: _double(x))) is expect_op, mode
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda t: _double(t) + 1, backend=backend, fullgraph=True)
    with torch.inference_mode():
        assert torch.equal(compiled(x), 2 * x + 1)
    assert any("test_registry_double" in str(n.target) for g in graphs for n in g.graph.nodes), graphs


def test_custom_op_backward_stays_opaque_when_compiled():
    """A backward that calls a fast op runs with grad off, yet under AOT autograd's tracing its arguments are fake
    tensors: the op (not the kernel's function) must be called there, or the trace reaches the launcher."""
    x = torch.arange(4.0, requires_grad=True)
    torch._dynamo.reset()
    loss = torch.compile(lambda t: _triple(t).sum(), backend="aot_eager", fullgraph=True)(x)
    loss.backward()
    assert torch.equal(x.grad, torch.full((4,), 3.0))
    with torch.no_grad():  # and in eager, no_grad still runs the function itself
        assert torch.equal(_triple_backward(torch.ones(2)), torch.full((2,), 3.0))


def test_trace_constant_is_dynamos_assume_constant_result():
    """The registry's import-free mark is the one torch's decorator sets, and Dynamo honours it: the switch is read
    once, when the graph is traced, never at the graph's later calls."""
    from dsv4.ops.registry import trace_constant

    def a():
        return True

    def b():
        return True

    assert vars(trace_constant(a)) == vars(torch._dynamo.assume_constant_result(b)) != {}
    reads = []

    @trace_constant
    def switch() -> bool:
        reads.append(1)
        return True

    torch._dynamo.reset()
    f = torch.compile(lambda t: t * 2 if switch() else t, backend="eager", fullgraph=True)
    assert [f(torch.ones(2)).sum().item() for _ in range(3)] == [4.0] * 3 and reads == [1]


# ------------------------------------------------------------------------------------------------ routed pairs
def _expert_stack(fmt, e, out_f, in_f, gen):
    pairs = [_weights(fmt, out_f, in_f, gen) for _ in range(e)]
    return torch.stack([w for w, _ in pairs]), torch.stack([s for _, s in pairs])


def test_pair_linear_twin_is_each_rows_expert_product():
    gen = torch.Generator().manual_seed(8)
    w, s = _expert_stack("fp4", 5, 64, 256, gen)
    x = torch.randn(7, 256, generator=gen)
    ids = torch.tensor([4, 0, 0, 3, 1, 4, 2])
    got = ops.pair_linear.twin(x, ids, w, s, "fp4")
    for p, e in enumerate(ids.tolist()):
        want = (x[p].double() @ ops.dequant_weight(w[e], s[e], "fp4").double().T).float()
        assert torch.equal(got[p], want)


@pytest.mark.parametrize("n_tokens", [1, 5])
def test_routed_pairs_equal_the_expert_loop(tiny_ckpt, n_tokens):
    """Same experts, same roundings (expert outputs in the compute dtype, summed in fp32): only the order of the
    fp32 sum over a token's k experts differs (pairs: selection order; loop: expert order)."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, quant_emulation=True, progress=False)
    moe = model.layers[2].ffn
    x = torch.randn(n_tokens, model.cfg.dim, generator=torch.Generator().manual_seed(9)).bfloat16()
    weights, ids = moe.gate(x, torch.zeros(n_tokens, dtype=torch.long))
    loop = moe.routed_loop(x, weights, ids)
    pairs = moe.routed_pairs(x, weights, ids)
    assert moe.experts[3].w1.weight.data_ptr() == moe.stacked_experts()["w1"][0][3].data_ptr()   # views, no copy
    assert torch.allclose(pairs, loop, rtol=2**-20, atol=1e-6), (pairs - loop).abs().max()
    assert torch.equal(moe.routed_loop(x, weights, ids), loop)                # the loop still sees the same weights


@pytest.mark.parametrize("n_tokens", [1, 37])
def test_routed_grouped_gemm_equals_the_expert_loop(tiny_ckpt, n_tokens):
    """Prefill-sized steps: sorted pairs, one grouped GEMM per matrix over bf16 expert copies. Same roundings as
    the loop (bf16 expert outputs, fp32 sums in expert order), GEMM summation order aside: rel. error <= 2**-7."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, quant_emulation=True, progress=False)
    moe = model.layers[3].ffn
    x = torch.randn(n_tokens, model.cfg.dim, generator=torch.Generator().manual_seed(12)).bfloat16()
    weights, ids = moe.gate(x, torch.zeros(n_tokens, dtype=torch.long))
    loop = moe.routed_loop(x, weights, ids)
    grouped = moe.routed_grouped(x, weights, ids)
    rel = ((grouped - loop).abs() / loop.abs().clamp_min(1e-2)).max().item()
    assert rel <= 2**-7, rel


try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


_GEMV_CHECK = """
import torch
from dsv4 import ops
from dsv4.ops.triton.fp4_gemv import fp4_pair_gemv
from dsv4.quant import quant_fp4
gen = torch.Generator().manual_seed(10)
ws = [quant_fp4(torch.randn(40, 256, generator=gen) / 16) for _ in range(3)]
w, s = torch.stack([a for a, _ in ws]), torch.stack([b for _, b in ws])
x, ids = torch.randn(4, 256, generator=gen), torch.tensor([2, 0, 2, 1])
errs = []
for w, s in [(w, s), (torch.randint(-128, 128, w.shape, dtype=torch.int8, generator=gen),
                      torch.randint(100, 140, s.shape, dtype=torch.uint8, generator=gen).view(s.dtype))]:
    want = ops.pair_linear.twin(x, ids, w, s, 'fp4')
    for kw in ({'block_g': 4}, {}):
        got = fp4_pair_gemv(x, ids, w, s, **kw)  # {}: the defaults, block_g cut to K/32 = 8
        errs.append(((got - want).norm() / want.norm()).item())
print(max(errs))
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Both interpreter checks of this file (TRITON_INTERPRET=1 is read when triton is imported, hence
    subprocesses), run at once: one core each (the fused one is further down)."""
    scripts = {"gemv": _GEMV_CHECK, "fused": _FUSED_CHECK}
    with in_interpreter_at_once(scripts, tmp_path_factory.mktemp("fast_ops"), timeout=300) as runs:
        yield runs


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (its CPU interpreter runs the kernel here)")
def test_fp4_pair_gemv_kernel_in_the_interpreter(interpreted):
    """The kernel's logic on CPU through the interpreter, with fp32 activations (the interpreter's bf16 is not
    trustworthy in triton 3.6), over quantised weights and over random bytes (every code, -0 included; N not a
    multiple of the block: the row mask). fp32 products of exact FP4 values accumulated in fp32, in another order
    than the float64 twin: relative error <= 1e-5."""
    out = interpreted["gemv"].result()
    assert float(out.split()[-1]) <= 1e-5, out


@pytest.mark.gpu
def test_fp4_pair_gemv_on_cuda_at_flash_dims():
    gen = torch.Generator().manual_seed(11)
    w, s = _expert_stack("fp4", 8, 2048, 4096, gen)
    x = fake_quant_fp8(torch.randn(12, 4096, generator=gen), 128).bfloat16()
    ids = torch.randint(0, 8, (12,), generator=gen)
    args = (x.cuda(), ids.cuda(), w.cuda(), s.cuda(), "fp4")
    with torch.inference_mode():
        assert which("pair_linear", *args) == "triton_fp4_pair_gemv"
        got = ops.pair_linear(*args).cpu()
    want = ops.pair_linear.twin(x, ids, w, s, "fp4")
    assert ((got.double() - want.double()).norm() / want.double().norm()).item() <= 1e-5


# ------------------------------------------------------------------------------------------------ fused kernels
_FUSED_CHECK = """
import torch
from dsv4 import ops, quant
from dsv4.ops.triton.quant import act_quant_fp8, e8m0_to_float, fake_quant_fp8
from dsv4.quant.e8m0 import e8m0_to_float as e8m0_twin
from dsv4.ops.triton.sinkhorn import hc_split_sinkhorn
gen = torch.Generator().manual_seed(13)
x = torch.randn(53, 512, generator=gen) * torch.logspace(-6, 3, 53).unsqueeze(1)    # 53: a partial tile of rows
x[0, :128] = 0
x[2, :128] = torch.linspace(-1, 1, 128) * 448 * 2**-3          # amax exactly 448 * 2^k
x[3, :4] = torch.tensor([-1e-7, 2.0**-9 * 1.5, -2.0**-9 * 2.5, 447.9])
bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
exact = all(torch.equal(fake_quant_fp8(x.to(dt), b).view(bits[dt]), quant.fake_quant_fp8(x.to(dt), b).view(bits[dt]))
            for dt in bits for b in (32, 64, 128))
q, s = act_quant_fp8(x)
qw, sw = quant.act_quant(x, 128)
exact = (exact and torch.equal(q.view(torch.uint8), qw.view(torch.uint8)) and torch.equal(s, sw)
         and s.stride() == (1, 53))
every_byte = torch.arange(256, dtype=torch.uint8).view(torch.float8_e8m0fnu)[torch.randperm(256)].view(8, 32)
exact = exact and torch.equal(e8m0_to_float(every_byte).view(torch.int32), e8m0_twin(every_byte).view(torch.int32))
m = torch.randn(70, 24, generator=gen) * 3
scale, base = torch.tensor([0.1, 0.2, 0.3]), torch.randn(24, generator=gen) * 0.5
rel = max(((a - b).abs() / a.abs().clamp_min(1e-6)).max().item() for a, b in
          zip(ops.ref.hc_split_sinkhorn(m, scale, base, 4, 20, 1e-6), hc_split_sinkhorn(m, scale, base, 4, 20, 1e-6)))
print(exact, rel)
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (its CPU interpreter runs the kernels here)")
def test_fused_kernels_in_the_interpreter(interpreted):
    """fake-quant FP8: bit-identical to the definition (exact integer/fp32 arithmetic, +-0 included), bf16 and
    fp32, blocks 32, 64 and 128, and the act quant's codes and column-major scales (fp32 x), over 53 rows (tiles of
    2048 elements: a partial last tile of rows); the e8m0 decode of all 256 bytes (NaN bits included). Sinkhorn:
    fp32 class, relative error <= 1e-5 (exp/division ulps differ)."""
    out = interpreted["fused"].result()
    exact, rel = out.split()[-2:]
    assert exact == "True" and float(rel) <= 1e-5, out


@pytest.mark.gpu
def test_fused_kernels_on_cuda_at_flash_dims():
    from dsv4 import quant

    gen = torch.Generator().manual_seed(14)
    x = (torch.randn(256, 4096, generator=gen) * 5).bfloat16()
    m = torch.randn(512, 24, generator=gen) * 3
    scale, base = torch.tensor([0.1, 0.2, 0.3]), torch.randn(24, generator=gen) * 0.5
    sinkhorn_args = (m.cuda(), scale.cuda(), base.cuda(), 4, 20, 1e-6)
    with torch.inference_mode():
        assert which("fake_quant_fp8", x.cuda(), 128) == "triton_fake_quant_fp8"
        assert which("hc_split_sinkhorn", *sinkhorn_args) == "triton_sinkhorn"
        got = ops.fake_quant_fp8(x.cuda(), 128).cpu()
        assert torch.equal(got.view(torch.int16), quant.fake_quant_fp8(x, 128).view(torch.int16))
        got = ops.hc_split_sinkhorn(*sinkhorn_args)
    want = ops.ref.hc_split_sinkhorn(m, scale, base, 4, 20, 1e-6)
    for a, b in zip(want, got, strict=True):
        assert ((a - b.cpu()).abs() / a.abs().clamp_min(1e-6)).max().item() <= 1e-5


def test_head_is_held_as_stored_in_a_bf16_model(tiny_ckpt):
    """A bf16 model holds the head in bf16 (as stored, once: no fp32 copy, no bf16 copy); fp32 models hold fp32.
    The twin upcasts the bf16 weight, so it computes the reference's fp32 product of the same values."""
    import dsv4

    bf16 = dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, progress=False)
    fp32 = dsv4.load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    assert bf16.head.weight.dtype == torch.bfloat16 and fp32.head.weight.dtype == torch.float32
    assert torch.equal(bf16.head.weight.float(), fp32.head.weight)
    y = torch.randn(3, bf16.cfg.dim).bfloat16()
    assert torch.equal(ops.logits(y, bf16.head.weight), ops.logits.twin(y, fp32.head.weight))   # CPU: the twin
    assert not any(k.startswith("_dsv4") for k in vars(bf16.head.weight))


@pytest.mark.gpu
def test_head_logits_on_cuda_at_flash_dims():
    """bf16-operand GEMM with fp32 accumulation and output vs the fp32 twin and float64: the same exact products
    summed in another order, fp32-accumulation class over K = 4096: a random-walk estimate sqrt(K) * 2^-24 = 3.8e-6
    relative (measured on the H200: 4.5e-6 against float64), so <= 1e-5 (Frobenius) against both, the bound the
    FP4 GEMV kernels of this file use."""
    gen = torch.Generator().manual_seed(11)
    w = (torch.randn(129280, 4096, generator=gen) / 64).bfloat16().cuda()
    y = torch.randn(4, 4096, generator=gen).bfloat16().cuda()
    with torch.inference_mode():
        assert which("logits", y, w) == "bf16_operand_logits"
        assert which("logits", y, w.float()) == "twin"                  # an fp32-held head (training): the twin
        got = ops.logits(y, w)
        twin = ops.logits.twin(y, w)
    exact = y.double() @ w.double().T
    assert got.dtype == torch.float32 and got.shape == (4, 129280)
    assert ((got.double() - exact).norm() / exact.norm()).item() <= 1e-5
    assert ((got - twin).double().norm() / twin.double().norm()).item() <= 1e-5
