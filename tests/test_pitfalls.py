"""One focused test per pitfall of spec §8: each fails if that mistake is reintroduced.

Float64 formulas written here are the independent definitions; tolerances are fp32-level unless stated.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv4 import ops
from dsv4.config import ModelConfig, tiny_config
from dsv4.loader import build_model
from dsv4.model.attention import block_indices, window_indices
from dsv4.model.hyper import hc_head, hc_pre
from dsv4.model.moe import Gate
from dsv4.model.rope import Rotary, yarn_correction_range

FLASH = ModelConfig.preset("flash")


def rope_reference(x: torch.Tensor, pos: int, freqs: torch.Tensor) -> torch.Tensor:
    """Interleaved rotation of x's last len(freqs)*2 dims in float64, at the reference's fp32 angles
    (the angle pos * f is one fp32 product; at pos 5000 its rounding alone moves cos by ~1e-4)."""
    out = x.double().clone()
    angles = (torch.tensor(float(pos)) * freqs.float()).double().tolist()
    for j, angle in enumerate(angles):
        a, b = out[..., -2 * len(freqs) + 2 * j], out[..., -2 * len(freqs) + 2 * j + 1]
        c, s = math.cos(angle), math.sin(angle)
        out[..., -2 * len(freqs) + 2 * j], out[..., -2 * len(freqs) + 2 * j + 1] = a * c - b * s, a * s + b * c
    return out


# §8.1 -------------------------------------------------------------------------------------------------------
def test_rope_is_interleaved_on_the_last_dims_not_rotate_half():
    rot = Rotary(FLASH, compressed=False)
    x = torch.randn(3, 512, dtype=torch.float64).float()
    y = rot(x, rot.cis(torch.tensor([7, 100, 5000])).unsqueeze(0).expand(1, 3, -1)[0])
    for row, pos in enumerate((7, 100, 5000)):
        torch.testing.assert_close(y[row].double(), rope_reference(x[row], pos, rot.freqs), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, :448], x[:, :448]), "only the last 64 dims rotate"


def test_attention_output_is_derotated_by_the_query_position(tiny_model_fp32):
    """A token attending only to itself: with the inverse rotation, its output cannot depend on its position."""
    attn = tiny_model_fp32.layers[0].attn
    x = torch.randn(1, 1, tiny_model_fp32.cfg.dim)

    def alone_at(p):
        cis = attn.rotary.cis(torch.tensor([[p]]))
        q, kv = attn.queries(x, cis)[0], attn.window_kv(x, cis)
        o = ops.sparse_attention(q, kv, attn.attn_sink, torch.zeros(1, 1, 1, dtype=torch.long), attn.softmax_scale)
        return attn.output(o, cis)

    with torch.no_grad():
        outs = [alone_at(p) for p in (0, 13, 1000)]
        assert not torch.allclose(attn.rotary(outs[0], attn.rotary.cis(torch.tensor([[13]]))), outs[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-5)


# §8.2 / §8.4 ------------------------------------------------------------------------------------------------
def test_sparse_attention_shares_k_and_v_and_puts_the_sink_only_in_the_denominator():
    torch.manual_seed(0)
    b, s, h, d, n = 1, 3, 4, 16, 5
    q, kv = torch.randn(b, s, h, d, dtype=torch.float64), torch.randn(b, n, d, dtype=torch.float64)
    sink = torch.randn(h, dtype=torch.float64) * 3
    idx = torch.tensor([[[0, -1, 2], [1, 3, 4], [-1, -1, 4]]])
    got = ops.sparse_attention(q, kv, sink, idx, 0.25)
    for i in range(s):
        rows = [r for r in idx[0, i].tolist() if r >= 0]
        z = 0.25 * torch.einsum("hd,kd->hk", q[0, i], kv[0, rows])
        w = z.exp() / (z.exp().sum(-1, keepdim=True) + sink.exp().unsqueeze(-1))
        torch.testing.assert_close(got[0, i], w @ kv[0, rows], rtol=1e-10, atol=1e-12)


def test_sink_is_not_part_of_the_running_max():
    """With bf16 KV the kernel rounds exp(z - M) to bf16: M = max of the scores makes a lone key's probability
    exactly 1, while putting a dominant sink into M would round exp(z - sink) and be off by ~1e-3."""
    q = torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16)
    kv = torch.ones(1, 1, 8, dtype=torch.bfloat16)
    sink = torch.tensor([1.3])                       # z = 0 < sink; exp(-1.3) is not a bf16 number
    got = ops.sparse_attention(q, kv, sink, torch.zeros(1, 1, 1, dtype=torch.long), 1.0).float()
    want = 1 / (1 + math.exp(1.3))
    assert abs(got[0, 0, 0, 0].item() - want) < 2e-3 * want    # bf16 output rounding only
    o32 = ops.sparse_attention(q.float(), kv, sink, torch.zeros(1, 1, 1, dtype=torch.long), 1.0)
    assert abs(o32[0, 0, 0, 0].item() - want) < 1e-6


# §8.3 -------------------------------------------------------------------------------------------------------
def test_q_gets_a_weightless_per_head_rsqrt_norm_in_the_compute_dtype(tiny_ckpt):
    import dsv4

    model = dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, quant_emulation=True, progress=False)
    attn = model.layers[1].attn
    x = torch.randn(1, 64, model.cfg.dim, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    pos = torch.arange(64)
    cis = attn.rotary.cis(pos).expand(1, 64, -1)
    q, qr = attn.queries(x, cis)
    raw = attn.wq_b(qr).unflatten(-1, (attn.n_heads, attn.head_dim))
    want = attn.rotary(raw * torch.rsqrt(raw.square().mean(-1, keepdim=True) + attn.eps), cis)
    assert torch.equal(q, want)
    recip_sqrt = attn.rotary(raw * (1 / torch.sqrt(raw.square().mean(-1, keepdim=True) + attn.eps)), cis)
    assert not torch.equal(q, recip_sqrt), "test inputs must separate rsqrt from 1/sqrt in bf16"
    rms = q.float().square().mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=2e-2)


# §8.4 / §8.5 ------------------------------------------------------------------------------------------------
def test_rope_base_and_yarn_per_layer_type_and_no_mscale():
    assert yarn_correction_range(64, 160000, 65536, 32, 1) == (15, 25)
    model = build_model(FLASH.truncated(4), device="meta")
    i = torch.arange(32, dtype=torch.float64)
    plain = 10000.0 ** (-2 * i / 64)
    comp = 160000.0 ** (-2 * i / 64)
    ramp = ((i - 15) / 10).clamp(0, 1)
    yarn = comp / 16 * ramp + comp * (1 - ramp)
    for layer_id, want in ((0, plain), (1, plain), (2, yarn), (3, yarn)):
        rot = model.layers[layer_id].attn.rotary
        torch.testing.assert_close(rot.freqs.double(), want, rtol=1e-6, atol=0)
        assert model.layers[layer_id].attn.softmax_scale == 512 ** -0.5
    torch.testing.assert_close(model.mtp[0].attn.rotary.freqs.double(), plain, rtol=1e-6, atol=0)
    cis = model.layers[2].attn.rotary.cis(torch.tensor([1, 70000, 1000000]))
    torch.testing.assert_close(cis.abs(), torch.ones(3, 32), rtol=0, atol=1e-6)


# §8.6 -------------------------------------------------------------------------------------------------------
def test_index_lists_respect_causality_and_block_completion():
    # fresh sequence, window 4: rows 4.. are the new tokens (rows 0..3 are the ring, empty here)
    w = window_indices(0, 6, 4, "cpu")
    assert w.tolist() == [[-1, -1, -1, 4], [-1, -1, 4, 5], [-1, 4, 5, 6], [4, 5, 6, 7], [5, 6, 7, 8], [6, 7, 8, 9]]
    # chunk at positions 6, 7 after 6 tokens: positions 3..5 come from ring rows 3, 0, 1
    assert window_indices(6, 2, 4, "cpu").tolist() == [[3, 0, 1, 4], [0, 1, 4, 5]]
    blk = block_indices(0, 9, 4, 100, "cpu")
    assert blk[:3].eq(-1).all() and blk[3].tolist() == [100, -1] and blk[7].tolist() == [100, 101]
    assert block_indices(7, 2, 4, 100, "cpu").tolist() == [[100, 101], [100, 101]]


def test_a_compressed_entry_is_invisible_until_its_block_completes(tiny_model_fp32):
    """Changing the last token of a block must not change any earlier position's logits (all layer types,
    ratio-4 blocks and the ratio-128 block ending at 255)."""
    torch.manual_seed(0)
    ids = torch.randint(2, tiny_model_fp32.cfg.vocab_size, (1, 260))
    with torch.no_grad():
        base = tiny_model_fp32(ids)
        for p in (7, 11, 255):
            changed = ids.clone()
            changed[0, p] = (changed[0, p] + 1) % tiny_model_fp32.cfg.vocab_size
            out = tiny_model_fp32(changed)
            assert torch.equal(out[0, :p], base[0, :p]), f"position < {p} saw token {p}"
            assert not torch.equal(out[0, p], base[0, p])


def compress_reference(kv, score, ape, ratio, overlap, c):
    """Explicit per-block, per-channel pooling loop in float64 (spec §3.5)."""
    s = kv.shape[0]
    out = []
    for j in range(s // ratio):
        slots_kv, slots_g = [], []
        if overlap:
            for t in range((j - 1) * ratio, j * ratio):
                if t >= 0:
                    slots_kv.append(kv[t, :c])
                    slots_g.append(score[t, :c] + ape[t % ratio, :c])
            for t in range(j * ratio, (j + 1) * ratio):
                slots_kv.append(kv[t, c:])
                slots_g.append(score[t, c:] + ape[t % ratio, c:])
        else:
            for t in range(j * ratio, (j + 1) * ratio):
                slots_kv.append(kv[t])
                slots_g.append(score[t] + ape[t % ratio])
        g = torch.stack(slots_g).softmax(dim=0)
        out.append((g * torch.stack(slots_kv)).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("layer_id", [1, 2])
def test_compressor_pools_per_channel_with_overlap_and_rotates_at_the_block_start(tiny_model_fp32, layer_id):
    comp = tiny_model_fp32.layers[layer_id].attn.compressor
    x = torch.randn(1, 300, tiny_model_fp32.cfg.dim)
    with torch.no_grad():
        got = comp(x)[0]
        kv, score = (t[0].double() for t in comp.project(x))
        pooled = compress_reference(kv, score, comp.ape.double(), comp.ratio, comp.overlap, comp.head_dim)
        n = pooled.shape[0]
        normed = comp.norm(pooled.float())
        want = torch.stack([rope_reference(normed[j], j * comp.ratio, comp.rotary.freqs) for j in range(n)])
    assert got.shape[0] == 300 // comp.ratio
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# §8.7 / §8.8 ------------------------------------------------------------------------------------------------
def test_indexer_scores_follow_the_formula_and_hca_has_no_indexer(tiny_model_fp32):
    cfg = tiny_model_fp32.cfg
    kinds = cfg.layer_kinds
    for layer, kind in zip(tiny_model_fp32.layers, kinds, strict=False):
        assert hasattr(layer.attn, "indexer") == (kind == "csa")
    idx = tiny_model_fp32.layers[1].attn.indexer
    x, q = torch.randn(1, 3, cfg.dim), torch.randn(1, 3, cfg.index_n_heads, cfg.index_head_dim)
    keys = torch.randn(1, 5, cfg.index_head_dim)
    with torch.no_grad():
        got = idx.scores(x, q, keys).double()
        w = idx.weights_proj(x).double() / math.sqrt(cfg.index_head_dim * cfg.index_n_heads)
    want = torch.einsum("bshd,btd->bsht", q.double(), keys.double()).clamp_min(0)
    want = (want * w.unsqueeze(-1)).sum(2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# §8.9 -------------------------------------------------------------------------------------------------------
def make_gate(layer_id, **cfg_changes):
    cfg = tiny_config(**cfg_changes)
    gate = Gate(cfg, layer_id)
    torch.nn.init.normal_(gate.weight, std=0.1)
    if gate.hash:
        gate.tid2eid.data = torch.stack([torch.randperm(cfg.n_routed_experts)[:2] for _ in range(cfg.vocab_size)])
    else:
        gate.bias.data.zero_()
    return cfg, gate


def test_gate_bias_selects_but_does_not_weight_and_route_scale_applies():
    cfg, gate = make_gate(layer_id=3)
    x = torch.randn(6, cfg.dim)
    gate.bias.data[5] = 100.0                       # force expert 5 into every selection
    w, ids = gate(x, torch.zeros(6, dtype=torch.long))
    assert (ids == 5).any(-1).all()
    scores = F.softplus(x.double() @ gate.weight.double().T).sqrt()
    picked = scores.gather(1, ids)
    torch.testing.assert_close(w.double(), picked / picked.sum(-1, keepdim=True) * 1.5, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.sum(-1), torch.full((6,), 1.5), rtol=1e-6, atol=1e-6)


def test_hash_layers_route_by_tid2eid():
    cfg, gate = make_gate(layer_id=0)
    assert gate.hash and not hasattr(gate, "bias")
    tokens = torch.tensor([3, 77, 3, 500])
    w, ids = gate(torch.randn(4, cfg.dim), tokens)
    assert torch.equal(ids, gate.tid2eid[tokens])
    torch.testing.assert_close(w.sum(-1), torch.full((4,), cfg.route_scale))


# §8.10 ------------------------------------------------------------------------------------------------------
def test_swiglu_clamp_on_routed_and_shared_experts(tiny_model_fp32):
    moe = tiny_model_fp32.layers[2].ffn
    assert moe.shared_experts.swiglu_limit == 10.0 and all(e.swiglu_limit == 10.0 for e in moe.experts)
    x = torch.randn(4, tiny_model_fp32.cfg.dim) * 50       # large enough that the clamp binds
    for expert in (moe.shared_experts, moe.experts[0]):
        with torch.no_grad():
            a, u = expert.w1(x).double(), expert.w3(x).double()
            assert (u.abs() > 10).any() and (a > 10).any() and (a < -10).any()
            hdn = F.silu(a.clamp(max=10)) * u.clamp(-10, 10)
            want = hdn @ expert.w2.dequantized().double().T
            torch.testing.assert_close(expert(x).double(), want, rtol=1e-4, atol=1e-3)


def test_routing_weight_multiplies_the_hidden_activation_before_w2(tiny_ckpt):
    import dsv4

    model = dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, quant_emulation=True, progress=False)
    expert = model.layers[2].ffn.experts[1]
    x = torch.randn(8, model.cfg.dim, dtype=torch.bfloat16)
    w = torch.rand(8, 1) + 0.2
    with torch.no_grad():
        gate, up = expert.w1(x).float(), expert.w3(x).float()
        hdn = w * (F.silu(gate.clamp(max=10)) * up.clamp(-10, 10))
        assert torch.equal(expert(x, w), expert.w2(hdn.to(torch.bfloat16)))
        assert not torch.equal(expert(x, w), (w * expert(x).float()).to(torch.bfloat16))


# §8.11 / §8.12 ----------------------------------------------------------------------------------------------
def sinkhorn_reference(m, scale, base, hc=4, iters=20, eps=1e-6):
    m, scale, base = m.double(), scale.double(), base.double()
    pre = torch.sigmoid(m[:hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(m[hc:2 * hc] * scale[1] + base[hc:2 * hc])
    c = (m[2 * hc:] * scale[2] + base[2 * hc:]).view(hc, hc).softmax(-1) + eps
    c = c / (c.sum(0, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(1, keepdim=True) + eps)
        c = c / (c.sum(0, keepdim=True) + eps)
    return pre, post, c


def test_mhc_split_is_sigmoid_pre_2sigmoid_post_and_column_first_sinkhorn():
    torch.manual_seed(0)
    m, scale, base = torch.randn(24) * 3, torch.rand(3) + 0.5, torch.randn(24)
    pre, post, comb = ops.hc_split_sinkhorn(m, scale, base, 4, 20, 1e-6)
    want = sinkhorn_reference(m, scale, base)
    for got, ref in zip((pre, post, comb), want, strict=False):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb.sum(0), torch.ones(4), rtol=0, atol=1e-5)   # ends on a column step
    assert (post > 1).any() and (post <= 2).all() and (pre > 0).all()


def test_mhc_norm_covers_all_streams_and_head_weights_are_sigmoid(tiny_model_fp32):
    blk = tiny_model_fp32.layers[0]
    h = torch.randn(1, 2, 4, tiny_model_fp32.cfg.dim)
    h2 = h.clone()
    h2[:, :, 3] *= 10                                 # one stream louder: the shared RMS changes everything
    with torch.no_grad():
        y1, _, _ = hc_pre(h, blk.hc_attn_fn, blk.hc_attn_scale, blk.hc_attn_base, blk.cfg)
        y2, _, _ = hc_pre(h2, blk.hc_attn_fn, blk.hc_attn_scale, blk.hc_attn_base, blk.cfg)
        x = h.flatten(2).double()
        mix = (x @ tiny_model_fp32.hc_head_fn.double().T) * x.square().mean(-1, keepdim=True).rsqrt()
        pre = torch.sigmoid(mix * tiny_model_fp32.hc_head_scale.double() + tiny_model_fp32.hc_head_base.double())
        want = ((pre + 1e-6).unsqueeze(-1) * h.double()).sum(2)
        got = hc_head(h, tiny_model_fp32.hc_head_fn, tiny_model_fp32.hc_head_scale, tiny_model_fp32.hc_head_base,
                      blk.cfg)
    assert not torch.allclose(y1, y2 * 1.0, rtol=0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_last_only_logits_equal_the_last_row_and_are_fp32(tiny_model_fp32):
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        full, last = tiny_model_fp32(ids), tiny_model_fp32(ids, last_only=True)
    assert full.dtype == torch.float32 and last.shape == (2, 1, 512)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


# §8.13 ------------------------------------------------------------------------------------------------------
def test_rope_angles_equal_the_reference_table_beyond_4096_positions():
    rot = Rotary(FLASH, compressed=True)
    pos = torch.tensor([0, 4095, 4096, 300000])
    table = torch.polar(torch.ones(4, 32), torch.outer(pos, rot.freqs))     # the reference's construction
    assert torch.equal(rot.cis(pos), table)


# §8.14 ------------------------------------------------------------------------------------------------------
def test_every_quantised_linear_quantises_its_input_per_128(tiny_ckpt):
    import dsv4
    from dsv4.quant import fake_quant_fp8

    model = dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, quant_emulation=True, progress=False)
    lin = model.layers[0].attn.wq_a
    x = (torch.randn(3, model.cfg.dim) * torch.logspace(-3, 3, model.cfg.dim)).to(torch.bfloat16)
    want = F.linear(fake_quant_fp8(x.float(), 128), lin.dequantized()).to(torch.bfloat16)
    assert torch.equal(lin(x), want)
    assert not torch.equal(lin(x), F.linear(x.float(), lin.dequantized()).to(torch.bfloat16))


def test_kv_fake_quant_uses_block_64_on_the_nope_dims_only():
    from dsv4.quant import fake_quant_fp8

    kv = torch.randn(2, 512)
    kv[:, 64:128] *= 1e4           # with 128-blocks this block's scale would flush dims 0..63 towards 0
    got = ops.fake_quant_kv(kv, 64)
    assert torch.equal(got[:, 448:], kv[:, 448:])
    assert torch.equal(got[:, :448], fake_quant_fp8(kv[:, :448], 64))
    assert not torch.equal(got[:, :384], fake_quant_fp8(kv[:, :384], 128))


def test_indexer_queries_are_hadamard_rotated_then_on_the_fp4_grid(tiny_ckpt):
    import dsv4
    from dsv4.quant import fake_quant_fp4, hadamard

    model = dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, quant_emulation=True, progress=False)
    attn = model.layers[1].attn
    qr = torch.randn(1, 4, model.cfg.q_lora_rank, dtype=torch.bfloat16)
    cis = attn.rotary.cis(torch.arange(4)).expand(1, 4, -1)
    q = attn.indexer.queries(qr, cis)
    raw = attn.rotary(attn.indexer.wq_b(qr).unflatten(-1, (16, 128)), cis)
    assert torch.equal(q, fake_quant_fp4(hadamard(raw), 32))
    assert torch.equal(fake_quant_fp4(q, 32), q)
