"""The K order the MoE carries end to end (`dsv4.ops.korder`, `grouped_linear`'s layout arguments).

Everything here is a permutation or a rounding the plain path also does, so the checks are bit for bit: the twin
with layouts equals the plain twin with the same permutations applied around it, and `MoE.routed_sorted` in K
order equals it in element order (the per-128 act quant and SwiGLU cannot tell the orders apart). The kernel's own
layouts are checked in tests/test_fp4_grouped_direct.py (interpreter, and on the GPU).
"""

from __future__ import annotations

import pytest
import torch

from dsv4 import ops
from dsv4.ops.korder import K_ORDER, from_korder, to_korder
from dsv4.quant import quant_fp4


def test_to_korder_permutes_each_block_and_from_korder_inverts_it():
    x = torch.randn(3, 384)
    k = to_korder(x, torch.float64)
    assert k.dtype == torch.float64 and torch.equal(k.view(3, 3, 128), x.double().view(3, 3, 128)[:, :, K_ORDER])
    assert torch.equal(from_korder(to_korder(x)), x)
    assert sorted(K_ORDER.tolist()) == list(range(128))
    with pytest.raises(ValueError, match="multiple of 128"):
        to_korder(torch.zeros(2, 96))


def test_grouped_twin_layouts_are_the_plain_product_permuted():
    """x_korder reads x back in element order, out_korder writes K-ordered columns, out_dtype rounds, out_index
    scatters row m to row out_index[m]; bad layout arguments are named."""
    gen = torch.Generator().manual_seed(5)
    pairs = [quant_fp4(torch.randn(256, 128, generator=gen) / 8) for _ in range(3)]
    w, s = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    x = torch.randn(10, 128, generator=gen)
    eid = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    perm = torch.randperm(10, generator=gen)
    twin = ops.grouped_linear.twin
    plain = twin(x, eid, w, s, "fp4")
    got = twin(to_korder(x), eid, w, s, "fp4", x_korder=True, out_korder=True, out_dtype=torch.bfloat16,
               out_index=perm)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[perm], to_korder(plain).bfloat16())
    assert torch.equal(twin(to_korder(x), eid, w, s, "fp4", x_korder=True), plain)
    with pytest.raises(ValueError, match="out_index"):
        twin(x, eid, w, s, "fp4", out_index=perm[:5])
    with pytest.raises(ValueError, match="out_dtype"):
        twin(x, eid, w, s, "fp4", out_dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of 128"):
        twin(x, eid, w[:, :96], s[:, :96], "fp4", out_korder=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_sorted_in_korder_equals_element_order(tiny_ckpt, monkeypatch, dtype):
    """The MoE's sorted path with K order forced (here on the twins) gives the same bits as without: x permuted
    per token before the gather, K-ordered w1 / w3 columns, SwiGLU and the per-128 FP8 act quant on them, w2
    reading them, the un-sort fused into w2's output."""
    import dsv4
    import dsv4.model.moe as moe_module

    model = dsv4.load_model(tiny_ckpt, dtype=dtype, quant_emulation=True, progress=False)
    gen = torch.Generator().manual_seed(23)
    seen = []
    for layer in (0, 2):
        moe = model.layers[layer].ffn
        x = torch.randn(40, model.cfg.dim, generator=gen).to(dtype)
        weights, ids = moe.gate(x, torch.randint(0, model.cfg.vocab_size, (40,), generator=gen))
        monkeypatch.setattr(moe_module, "korder_pays", lambda *a: False)
        plain = moe.routed_sorted(x, weights, ids)
        monkeypatch.setattr(moe_module, "korder_pays", lambda *a: seen.append(a) or True)
        got = moe.routed_sorted(x, weights, ids)
        assert len(seen) == 1 + (layer == 2) and torch.equal(got, plain), layer


def test_korder_pays_only_where_the_direct_kernel_runs(tiny_ckpt):
    """On the CPU (no kernel) never; the CUDA side is tests/test_fp4_grouped_direct.py's GPU MoE test."""
    from dsv4.ops.grouped_linear import korder_pays

    w = torch.empty(256, 2048, 2048, dtype=torch.int8, device="meta")
    assert not korder_pays(49152, torch.zeros(8192, 4096, dtype=torch.bfloat16), w, "fp4", True)
