"""Linears of one input run as one call (`model/pairs.py`: attention's wq_a / wkv and the shared expert's w1 / w3 as
one FP8 linear, the compressors' wkv / wgate as one fp32-product GEMM).

Packing re-homes the two weights (and scales) into one buffer: the parameters keep their names and values and
become views of it (nothing held twice). The paired call quantises x once and multiplies both weights: on CPU the
twin's fp32 arithmetic, so each output agrees with its own linear's to fp32 summation order (assert_close's fp32
defaults); on CUDA the FP8 linear's bf16 output class (relative 1e-2, tests/test_fp8_linear.py), the kernel's split
plan seeing the wider N. Where a pair cannot or must not be used (formats, rows off the 128-row scale blocks,
autograd, a weight re-assigned since packing) the two linears run as they are.
"""

from __future__ import annotations

import pytest
import torch

from dsv4 import ops, quant
from dsv4.model.pairs import can_pair, pack, pack_pairs, paired, paired_widened, unpack_pairs
from dsv4.model.primitives import Linear


def _fp8_linear(k: int, n: int, gen: torch.Generator) -> Linear:
    lin = Linear(k, n, "fp8", torch.float32)
    lin.weight.data, lin.scale.data = quant.quant_fp8(torch.randn(n, k, generator=gen) * 0.05)
    return lin


def _pair(gen, k=256, n1=256, n2=128):
    return _fp8_linear(k, n1, gen), _fp8_linear(k, n2, gen)


def test_packing_keeps_names_values_and_one_copy():
    gen = torch.Generator().manual_seed(0)
    a, b = _pair(gen)
    before = {n: t.clone() for lin, p in ((a, "a"), (b, "b")) for n, t in
              ((f"{p}.weight", lin.weight), (f"{p}.scale", lin.scale))}
    assert pack(a, b)
    after = {"a.weight": a.weight, "a.scale": a.scale, "b.weight": b.weight, "b.scale": b.scale}
    for name, t in after.items():
        assert t.dtype == before[name].dtype and torch.equal(t.view(torch.uint8), before[name].view(torch.uint8)), name
    # one storage per kind, the two parameters its two ends
    assert a.weight.untyped_storage().data_ptr() == b.weight.untyped_storage().data_ptr()
    assert a.weight.untyped_storage().nbytes() == a.weight.numel() + b.weight.numel()
    assert a.scale.untyped_storage().data_ptr() == b.scale.untyped_storage().data_ptr()
    assert not a.weight.requires_grad and not b.scale.requires_grad


@pytest.mark.parametrize("emulation", [True, False])
def test_paired_call_is_each_linear(emulation, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    a, b = _pair(gen)
    a.quant_emulation = b.quant_emulation = emulation
    x = torch.randn(3, 5, 256, generator=gen)
    with torch.no_grad():
        want = a(x), b(x)
        assert pack(a, b)
        got = paired(a, b, x)
    assert [g.shape for g in got] == [(3, 5, 256), (3, 5, 128)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    # not a pass-through: one call over the buffer (a spy on the op)
    calls, real = [], ops.linear
    monkeypatch.setattr(ops, "linear", lambda *args, **kw: calls.append(tuple(args[1].shape)) or real(*args, **kw))
    with torch.no_grad():
        paired(a, b, x)
    assert calls == [(384, 256)]


def test_falls_back_where_the_pair_must_not_be_used():
    gen = torch.Generator().manual_seed(2)
    a, b = _pair(gen)
    assert pack(a, b)
    x = torch.randn(2, 256, generator=gen)
    with torch.enable_grad():                       # autograd: the two linears (the buffer is not a parameter)
        ga, gb = paired(a, b, x)
    with torch.no_grad():
        torch.testing.assert_close(ga, a(x))
        torch.testing.assert_close(gb, b(x))
        a.weight = torch.nn.Parameter(a.weight.clone(), requires_grad=False)      # re-homed since packing
        a.weight.data.view(torch.uint8)[0] ^= 1                                    # and changed
        ya, yb = paired(a, b, x)
        assert torch.equal(ya, a(x)) and torch.equal(yb, b(x))                    # the new weight, not the buffer
        b.quant_emulation = False                   # the pair's linears disagree on act quant: separately
        a2, b2 = _pair(gen)
        assert pack(a2, b2)
        b2.quant_emulation = False
        ya, yb = paired(a2, b2, x)
        assert torch.equal(ya, a2(x)) and torch.equal(yb, b2(x))


def test_what_can_pair():
    gen = torch.Generator().manual_seed(3)
    a, b = _pair(gen)
    assert can_pair(a, b)
    assert not can_pair(*_pair(gen, n1=192))                        # first's rows not whole 128-row blocks
    assert not can_pair(a, _fp8_linear(128, 128, gen))              # another input width
    assert not can_pair(Linear(256, 256, "plain", torch.float32), b)
    assert can_pair(Linear(256, 100, "plain", torch.float32), Linear(256, 60, "plain", torch.float32))
    assert not can_pair(Linear(256, 100, "plain", torch.float32), Linear(256, 60, "plain", torch.bfloat16))
    assert not can_pair(Linear(256, 256, "fp4", torch.float32), Linear(256, 128, "fp4", torch.float32))
    with torch.device("meta"):
        m1, m2 = Linear(256, 256, "fp8", torch.float32), Linear(256, 128, "fp8", torch.float32)
    assert not can_pair(m1, m2) and not pack(m1, m2)


def test_plain_pair_is_each_product_and_can_be_forgotten(monkeypatch):
    """The compressors' pair (plain weights, fp32 products through `widened_dense`): each output the product of
    its own weight (fp32 summation order), one call over the buffer; `unpack_pairs` (training) forgets the pair:
    the two calls again, the parameters still the same values."""
    gen = torch.Generator().manual_seed(6)
    a, b = Linear(256, 100, "plain", torch.float32), Linear(256, 60, "plain", torch.float32)
    a.weight.data, b.weight.data = torch.randn(100, 256, generator=gen), torch.randn(60, 256, generator=gen)
    x = torch.randn(2, 7, 256, generator=gen)
    with torch.no_grad():
        want = ops.widened_dense(x, a.weight), ops.widened_dense(x, b.weight)
        assert pack(a, b) and a.weight.untyped_storage().data_ptr() == b.weight.untyped_storage().data_ptr()
        got = paired_widened(a, b, x)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
        calls, real = [], ops.widened_dense
        monkeypatch.setattr(ops, "widened_dense", lambda x, w: calls.append(tuple(w.shape)) or real(x, w))
        paired_widened(a, b, x)
        assert calls == [(160, 256)]
        unpack_pairs(torch.nn.ModuleList([a, b]))
        calls.clear()
        paired_widened(a, b, x)
        assert calls == [(100, 256), (60, 256)]


def test_pack_pairs_on_a_model_keeps_its_logits(tiny_model_fp32):
    """The loader packs a CUDA model's pairs; packed on CPU here, the tiny model (its wq_a / wkv and shared w1 / w3
    in whole 128-row blocks, every compressor's wkv / wgate) gives the unpacked model's logits within fp32
    summation order, and its state dict has the same names and values."""
    import copy

    model = copy.deepcopy(tiny_model_fp32)
    ids = torch.randint(2, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    n_blocks = len(model.layers) + len(getattr(model, "mtp", []))
    n_compressors = sum(type(m).__name__ == "Compressor" for m in model.modules())
    assert n_compressors > 0
    assert pack_pairs(model) == 2 * n_blocks + n_compressors
    assert set(model.state_dict()) == set(state)
    bits = lambda t: t.view(torch.uint8) if t.element_size() == 1 else t         # noqa: E731 (FP8 / e8m0 bytes)
    assert all(torch.equal(bits(t), bits(state[n])) for n, t in model.state_dict().items())
    with torch.no_grad():
        got = model(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_loader_packs_on_cuda_and_the_step_keeps_the_fp8_class(tiny_ckpt):
    """Loaded on CUDA the pairs are packed; the paired call against its two linears run one by one on the same
    packed weights: the FP8 linear's bf16 output class (relative 1e-2), at decode and prefill row counts; the
    compressors' pair the fp32 class (relative 1e-5)."""
    import dsv4

    model = dsv4.load_model(tiny_ckpt, device="cuda", dtype=torch.bfloat16, quant_emulation=True, progress=False)
    attn = model.layers[0].attn
    assert attn.wq_a.__dict__.get("_pair") is not None
    gen = torch.Generator().manual_seed(5)
    for rows in (1, 8, 64, 300):
        x = torch.randn(1, rows, model.cfg.dim, generator=gen).bfloat16().cuda()
        with torch.inference_mode():
            got = paired(attn.wq_a, attn.wkv, x)
            want = attn.wq_a(x), attn.wkv(x)
        for g, w in zip(got, want, strict=True):
            rel = ((g.double() - w.double()).norm() / w.double().norm()).item()
            assert rel <= 1e-2, (rows, rel)
    # a compressor's pair: fp32 products on the bf16 tensor cores either way, fp32 sums in another order
    comp = next(m for m in model.modules() if type(m).__name__ == "Compressor")
    assert comp.wkv.__dict__.get("_pair") is not None
    for rows in (1, 64, 300):
        x = torch.randn(1, rows, model.cfg.dim, generator=gen).bfloat16().cuda()
        with torch.inference_mode():
            got = paired_widened(comp.wkv, comp.wgate, x)
            want = ops.widened_dense(x, comp.wkv.weight), ops.widened_dense(x, comp.wgate.weight)
        for g, w in zip(got, want, strict=True):
            rel = ((g.double() - w.double()).norm() / w.double().norm()).item()
            assert g.dtype == torch.float32 and rel <= 1e-5, (rows, rel)


def test_packed_model_compiles_to_the_same_graphs_with_the_same_bits(tmp_path):
    """Traced with the pairs packed (as on CUDA), the decode step is still one graph (compile_scope="step") and a
    graph per block kind ("block": the packed buffers are graph inputs like the weights, so the HCA layers still
    share one), bit-identical to the uncompiled packed step (aot_eager on CPU)."""
    from compile_helpers import five_layer_model, graph_counter
    from test_compiled_decode import _decode

    model = five_layer_model(tmp_path)
    assert pack_pairs(model) > 0
    want = _decode(model, "cpu", False, steps=3)
    for scope, n_graphs in (("block", 4), ("step", 1)):
        torch._dynamo.reset()
        counting, graphs = graph_counter()
        got = _decode(model, "cpu", counting, steps=3, scope=scope)
        assert torch.equal(got, want), scope
        assert len(graphs) == n_graphs, (scope, len(graphs))
    # the traced step reads the packed buffers: each layer's two FP8 pairs' scale grids [2, 2] (two 128-row
    # blocks of 256 columns), where unpacked there are none
    scales = [n.meta.get("example_value") for n in graphs[0].graph.nodes if n.op == "placeholder"]
    packed = [v for v in scales if isinstance(v, torch.Tensor) and v.dtype == torch.float8_e8m0fnu
              and tuple(v.shape) == (2, 2)]
    assert len(packed) == 2 * len(model.layers)
