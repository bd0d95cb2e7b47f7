"""The sorted-pairs MoE path: `grouped_linear` (twin + Triton FP4 grouped GEMM) and `MoE.routed_sorted`.

Tolerances by precision class: the kernel multiplies exact values (FP4 weights times powers of two, fp32 or
FP8-quantised bf16 activations) with fp32 accumulation, in another order than the float64 twin: relative error
(Frobenius) <= 1e-5. `routed_sorted` on CPU runs the same per-row twin as `routed_pairs`, so the two are
bit-identical (any slip in the sort/unsort would show), and against the expert loop only the order of the fp32
sum over a token's k experts may differ: the `routed_pairs` tolerance (rtol 2**-20, atol 1e-6).
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import run_in_interpreter

from dsv4 import ops
from dsv4.ops.registry import which
from dsv4.quant import fake_quant_fp8, quant_fp4

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def _fp4_stack(e, out_f, in_f, gen, device="cpu"):
    pairs = [quant_fp4(torch.randn(out_f, in_f, generator=gen, device=device) * in_f ** -0.5) for _ in range(e)]
    return torch.stack([w for w, _ in pairs]), torch.stack([s for _, s in pairs])


def test_grouped_twin_is_each_rows_expert_product():
    """Rows over several twin chunks (32 rows each), unsorted ids: every row is its own expert's product."""
    gen = torch.Generator().manual_seed(20)
    w, s = _fp4_stack(5, 48, 128, gen)
    ids = torch.randint(0, 5, (70,), generator=gen)
    x = torch.randn(70, 128, generator=gen)
    got = ops.grouped_linear.twin(x, ids, w, s, "fp4")
    assert torch.equal(got, ops.pair_linear.twin(x, ids, w, s, "fp4"))
    for p in (0, 33, 69):
        e = ids[p].item()
        assert torch.equal(got[p], (x[p].double() @ ops.dequant_weight(w[e], s[e], "fp4").double().T).float())
    assert ops.grouped_linear.twin(x[:0], ids[:0], w, s, "fp4").shape == (0, 48)


_KERNEL_CHECK = """
import torch
from dsv4 import ops
from dsv4.ops.triton.fp4_grouped import fp4_grouped_gemm
from dsv4.quant import quant_fp4
gen = torch.Generator().manual_seed(21)
ws = [quant_fp4(torch.randn(80, 256, generator=gen) / 16) for _ in range(7)]
w, s = torch.stack([a for a, _ in ws]), torch.stack([b for _, b in ws])
# 41 rows (not a multiple of 16): block 0 holds experts 0, 2, 3, 5 (1 and 4 absent), expert 5 spans 3 blocks,
# the last block is partial; N = 80 is not a multiple of block_n = 32.
eid = torch.tensor([0] * 3 + [2] * 5 + [3] + [5] * 30 + [6] * 2)
x = torch.randn(41, 256, generator=gen)
want = ops.grouped_linear.twin(x, eid, w, s, 'fp4')
errs = [fp4_grouped_gemm(x, eid, w, s, block_n=32), fp4_grouped_gemm(x, eid.int(), w, s, block_n=64, block_k=256)]
perm = torch.randperm(41, generator=gen)                  # unsorted rows: slower, still right
errs.append(fp4_grouped_gemm(x[perm], eid[perm], w, s, block_n=32) - want[perm] + want)
# decoding, exactly: one-hot rows read back every code (both nibbles) under scale bytes 0 (2^-127), 1, ..., 160
codes = torch.arange(16 * 128 * 8, dtype=torch.int32).view(16, 128, 8) % 16
wq = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8).view(torch.int8).view(1, 16, 4 * 128)
sq = torch.tensor([0, 1, 100, 127, 140, 160], dtype=torch.uint8)[torch.arange(16 * 32).view(1, 16, 32) % 6]
sq = sq.view(torch.float8_e8m0fnu)
eye = torch.eye(1024)[:128]
got = torch.cat([fp4_grouped_gemm(eye.roll(128 * i, 1), torch.zeros(128, dtype=torch.long), wq, sq) for i in range(8)])
exact = torch.equal(got, ops.dequant_weight(wq[0], sq[0], 'fp4').T)
w[3, 5, 40:56], s[3, 7, 2] = 0, torch.tensor(255, dtype=torch.uint8).view(s.dtype)    # NaN scale, zero block
nan = fp4_grouped_gemm(x, eid, w, s, block_n=32).isnan()
exact &= torch.equal(nan, ops.grouped_linear.twin(x, eid, w, s, 'fp4').isnan()) and nan.sum().item() == 1
print(exact, *[((got - want).norm() / want.norm()).item() for got in errs])
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (its CPU interpreter runs the kernel here)")
def test_fp4_grouped_gemm_kernel_in_the_interpreter(tmp_path):
    """The kernel's logic on CPU through TRITON_INTERPRET=1 (set before triton is imported, hence a subprocess;
    PYTHONPATH so it imports this checkout's dsv4), with fp32 activations (the interpreter's bf16 tl.dot is wrong
    in triton 3.6). fp32 products of exact values, fp32 accumulation in another order: rel. error <= 1e-5. The
    FP4/e8m0 decoding itself (every code, both nibbles, scale bytes 0 to 160) read back exactly via one-hot rows."""
    out = run_in_interpreter(_KERNEL_CHECK, tmp_path, timeout=300)
    exact, *errs = out.split()[-4:]
    assert exact == "True" and max(float(v) for v in errs) <= 1e-5, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_sorted_equals_pairs_and_the_expert_loop(tiny_ckpt, dtype):
    """Hash-routed (layer 0) and top-k (layer 2) MoE layers, one token and 40 tokens (80 pairs, past the
    sorted-path threshold): bit-identical to `routed_pairs`, the loop within the pair tolerance."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, dtype=dtype, quant_emulation=True, progress=False)
    gen = torch.Generator().manual_seed(22)
    for layer in (0, 2):
        moe = model.layers[layer].ffn
        for n in (1, 40):
            x = torch.randn(n, model.cfg.dim, generator=gen).to(dtype)
            weights, ids = moe.gate(x, torch.randint(0, model.cfg.vocab_size, (n,), generator=gen))
            got = moe.routed_sorted(x, weights, ids)
            assert got.dtype == torch.float32 and got.shape == (n, model.cfg.dim)
            assert torch.equal(got, moe.routed_pairs(x, weights, ids))
            loop = moe.routed_loop(x, weights, ids)
            assert torch.allclose(got, loop, rtol=2**-20, atol=1e-6), (layer, n, (got - loop).abs().max())


def test_fixed_shape_steps_pick_sorted_from_the_threshold(tiny_ckpt, monkeypatch):
    """The fixed-shape path (CUDA inference or a compiled step; here: compiling faked) takes `routed_sorted` for
    FP4 experts from SORTED_PATH_MIN_PAIRS pairs on, `routed_pairs` below."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, quant_emulation=True, progress=False)
    moe = model.layers[2].ffn
    calls = []
    for name in ("routed_sorted", "routed_pairs", "routed_loop"):
        real = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    k = model.cfg.n_activated_experts
    threshold = moe.SORTED_PATH_MIN_PAIRS // k
    gen = torch.Generator().manual_seed(23)
    with torch.no_grad():
        for n in (threshold, threshold - 1):
            moe(torch.randn(1, n, model.cfg.dim, generator=gen).bfloat16(), torch.zeros(1, n, dtype=torch.long))
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        for n in (threshold, threshold - 1):
            moe(torch.randn(1, n, model.cfg.dim, generator=gen).bfloat16(), torch.zeros(1, n, dtype=torch.long))
    assert calls == ["routed_loop", "routed_loop", "routed_sorted", "routed_pairs"]


def test_fp4_calls_are_decode_sized_by_the_steps_tokens(tiny_ckpt, monkeypatch):
    """The MoE tells its FP4 calls whether the FP8-MMA decode kernel may take them by the step's tokens (at most
    `DECODE_KERNEL_MAX_TOKENS`), the same answer for every call of the step, whatever each call's rows: a step and
    the prefill bucket it is padded to then take the same kernel class (ops/moe_pairs.py)."""
    import dsv4
    from dsv4.ops import moe_pairs

    model = dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, quant_emulation=True, progress=False)
    moe = model.layers[2].ffn
    seen = []
    for op in ("pair_linear", "grouped_linear"):
        real = getattr(ops, op)
        monkeypatch.setattr(ops, op, lambda *a, _f=real, **kw: seen.append(kw["decode_sized"]) or _f(*a, **kw))
    assert moe_pairs.DECODE_KERNEL_MAX_TOKENS == 256 and moe.decode_sized(256) and not moe.decode_sized(257)
    monkeypatch.setattr(moe_pairs, "DECODE_KERNEL_MAX_TOKENS", 6)      # the tiny model's steps, same rule
    monkeypatch.setattr("dsv4.model.moe.DECODE_KERNEL_MAX_TOKENS", 6)
    gen = torch.Generator().manual_seed(26)
    with torch.no_grad():
        for n in (6, 7):
            x = torch.randn(n, model.cfg.dim, generator=gen).bfloat16()
            weights, ids = moe.gate(x, torch.zeros(n, dtype=torch.long))
            for path in (moe.routed_pairs, moe.routed_sorted):
                seen.clear()
                path(x, weights, ids)
                assert seen == [n <= 6] * 3, (n, path.__name__, seen)


def test_prefill_buckets_must_not_straddle_the_decode_kernel_edge():
    """Buckets on both sides of DECODE_KERNEL_MAX_TOKENS must include it (else a step padded across it would change
    kernel class); the engine's buckets (powers of two from 256) always do."""
    from dsv4.engine.prefill_graphs import DEFAULT_BUCKETS, buckets_up_to, check_bucket_edges

    for sizes in (DEFAULT_BUCKETS, (64, 128), (256,), (512, 1024), (128, 256, 512), buckets_up_to(300),
                  buckets_up_to(200)):
        check_bucket_edges(sizes)
    with pytest.raises(ValueError, match="straddle 256 tokens"):
        check_bucket_edges((128, 512))


@pytest.mark.gpu
@torch.inference_mode()                             # the fast paths apply without autograd only
def test_fp4_grouped_gemm_on_cuda_at_flash_dims():
    """Flash w1/w3 shape (K=4096, N=2048, E=256), decode batch 64 x top-6 = 384 sorted pairs, bf16 activations
    that are FP8-quantised (as the model feeds them). Error budget: operands are exact in bf16 and their products
    exact in fp32; only fp32 accumulation rounding remains (K=4096 terms, ~sqrt(K) * 2^-24 relative, worst-case
    ordering well under 1e-5): relative error (Frobenius) <= 1e-5 against the twin and against float64.
    Also captured in a CUDA graph and replayed with other expert ids (no host synchronisation inside)."""
    dev = "cuda"
    gen = torch.Generator(dev).manual_seed(24)
    w, s = _fp4_stack(256, 2048, 4096, gen, dev)
    ids = torch.rand(64, 256, generator=gen, device=dev).topk(6, dim=-1).indices.flatten()
    eid = ids.sort(stable=True).values
    x = fake_quant_fp8(torch.randn(384, 4096, generator=gen, device=dev), 128).bfloat16()
    assert which("grouped_linear", x, eid, w, s, "fp4") == "triton_fp4_grouped_gemm"
    got = ops.grouped_linear(x, eid, w, s, "fp4")
    twin = ops.grouped_linear.twin(x, eid, w, s, "fp4")
    exact = torch.empty(384, 2048, dtype=torch.float64, device=dev)
    for e in eid.unique().tolist():
        rows = (eid == e).nonzero().flatten()
        exact[rows] = x[rows].double() @ ops.dequant_weight(w[e], s[e], "fp4").double().T
    for want in (twin.double(), exact):
        assert ((got.double() - want).norm() / want.norm()).item() <= 1e-5
    graph, eid_in = torch.cuda.CUDAGraph(), eid.clone()
    ops.grouped_linear(x, eid_in, w, s, "fp4")                               # compile before capture
    with torch.cuda.graph(graph):
        out = ops.grouped_linear(x, eid_in, w, s, "fp4")
    eid_in.copy_(((eid + 1) % 256).sort().values)
    graph.replay()
    want = ops.grouped_linear.twin(x, eid_in, w, s, "fp4")
    assert ((out.double() - want.double()).norm() / want.double().norm()).item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("mma", ["0", "1"])
def test_routed_sorted_with_the_kernel_equals_the_expert_loop_on_cuda(tiny_ckpt, monkeypatch, mma):
    """The whole sorted path with the Triton kernel (bf16) against the loop (cuBLAS over bf16 copies). With the
    fp32-accumulating kernels (DSV4_FP4_DECODE_MMA=0): same roundings, the GEMM summation order aside, which can flip
    a bf16 rounding of an expert output: rel. error <= 2**-7 per element (the `routed_grouped` class). With the
    FP8-MMA decode kernel (the default over the tile-major stacks at decode sizes: the reference's FP8 x FP8
    arithmetic, its accumulation below fp32 within a 32-K sub-block, tests/test_fp4_decode_fp8mma.py) the
    differences also flip FP8 codes of the hidden state's act-quant (steps of 2^-3 relative), so the class is
    normwise: ||got - loop|| <= 2**-7 ||loop||."""
    import dsv4

    monkeypatch.setenv("DSV4_FP4_DECODE_MMA", mma)
    model = dsv4.load_model(tiny_ckpt, device="cuda", dtype=torch.bfloat16, quant_emulation=True, progress=False)
    moe = model.layers[2].ffn
    x = torch.randn(40, model.cfg.dim, generator=torch.Generator().manual_seed(25)).bfloat16().cuda()
    with torch.inference_mode():
        weights, ids = moe.gate(x, torch.zeros(40, dtype=torch.long, device="cuda"))
        loop = moe.routed_loop(x, weights, ids)
        got = moe.routed_sorted(x, weights, ids)
    if mma == "1":
        rel = ((got.double() - loop.double()).norm() / loop.double().norm()).item()
    else:
        rel = ((got - loop).abs() / loop.abs().clamp_min(1e-2)).max().item()
    assert rel <= 2**-7, rel


@pytest.mark.gpu
def test_cuda_steps_pick_the_sorted_path(tiny_ckpt, monkeypatch):
    """CUDA inference: fixed-shape steps from SORTED_PATH_MIN_PAIRS pairs and prefill-sized steps (more than
    PAIR_PATH_MAX_PAIRS pairs) take `routed_sorted` (FP4 read as stored); prefill with `grouped_linear` off takes
    the bf16 grouped GEMM over per-call decoded experts."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, device="cuda", dtype=torch.bfloat16, quant_emulation=True, progress=False)
    moe = model.layers[2].ffn
    calls = []
    for name in ("routed_sorted", "routed_pairs", "routed_grouped", "routed_loop"):
        real = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    k, gen = model.cfg.n_activated_experts, torch.Generator().manual_seed(26)
    sizes = (moe.SORTED_PATH_MIN_PAIRS // k - 1, moe.SORTED_PATH_MIN_PAIRS // k, moe.PAIR_PATH_MAX_PAIRS // k + 1)
    with torch.inference_mode():
        for n in sizes:
            x = torch.randn(1, n, model.cfg.dim, generator=gen).bfloat16().cuda()
            moe(x, torch.zeros(1, n, dtype=torch.long, device="cuda"))
        with ops.reference_only("grouped_linear"):
            moe(x, torch.zeros(1, n, dtype=torch.long, device="cuda"))
    assert calls == ["routed_pairs", "routed_sorted", "routed_sorted", "routed_grouped"]


def test_bf16_expert_stacks_are_per_call(tiny_ckpt):
    """The bf16 grouped path decodes the experts for the call and keeps nothing (no resident copies), and the
    decoded stack equals each expert's dequantised weight."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, progress=False)
    moe = model.layers[2].ffn
    stack = moe._bf16_stack("w1")
    assert torch.equal(stack[3].float(), moe.experts[3].w1.dequantized())
    assert not any(isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 and v.shape == stack.shape
                   for v in moe.__dict__.values())


@pytest.mark.gpu
@pytest.mark.parametrize("rows_per_expert", [1, 100])
def test_prefill_sized_calls_take_the_expert_major_kernel(rows_per_expert, monkeypatch):
    """From 1 row per expert on average the dispatch runs the expert-major kernel (64- and 128-row tiles), within
    the same budget of the twin (1e-5, see above); below it, the 16-row-block kernel."""
    import importlib

    module = importlib.import_module("dsv4.ops.grouped_linear")       # (dsv4.ops.grouped_linear is the op)
    dev = "cuda"
    gen = torch.Generator(dev).manual_seed(25)
    w, s = _fp4_stack(16, 256, 512, gen, dev)
    m = 16 * rows_per_expert
    eid = torch.randint(0, 16, (m,), generator=gen, device=dev).sort().values
    x = fake_quant_fp8(torch.randn(m, 512, generator=gen, device=dev), 128).bfloat16()
    taken = []
    for name in ("_fp4_grouped_gemm", "_fp4_grouped_gemm_prefill"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: taken.append(name) or real(*a))
    with torch.inference_mode():
        got = ops.grouped_linear(x, eid, w, s, "fp4")
        ops.grouped_linear(x[:8], eid[:8], w, s, "fp4")                 # 8 rows over 16 experts: below
    assert taken == ["_fp4_grouped_gemm_prefill", "_fp4_grouped_gemm"]
    want = ops.grouped_linear.twin(x, eid, w, s, "fp4").double()
    assert ((got.double() - want).norm() / want.norm()).item() <= 1e-5


def test_expert_major_tiles_follow_rows_per_expert():
    """The tile table of the expert-major kernel (see `expert_major_tiles`): 128 x 128 from 96 rows per expert,
    64 x 64 below; with the packed decode, 16 x 64 (4 warps) below 16 rows per expert."""
    import importlib

    tiles = importlib.import_module("dsv4.ops.grouped_linear").expert_major_tiles
    assert tiles(384, 256, False) == tiles(6144, 256, False) == tiles(6144, 256, True) == (64, 64, 8)
    assert tiles(49152, 256, False) == tiles(49152, 256, True) == (128, 128, 8)
    assert tiles(384, 256, True) == tiles(4095, 256, True) == (16, 64, 4)
