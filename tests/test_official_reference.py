"""dsv4 against logits computed by DeepSeek's own reference code on a tiny official checkpoint.

`official-tiny-case` (see its README) holds 392 tokens: a 320-token prefill plus 72 decode steps of the
reference, with and without its QAT emulation. Our full-sequence forward must reproduce every row.
Tolerances: fp32 (emulation off) is compared tightly (only summation order differs); bf16 with emulation is
compared statistically because routing / indexer choices flip on bf16 near-ties.
"""

from __future__ import annotations

import json

import paths
import pytest
import torch
from safetensors.torch import load_file

import dsv4

CASE = paths.OFFICIAL_TINY


def run_with_captures(model, ids):
    """Logits [s, V], block outputs {i: [s, hc, D]} and indexer top-k {i: [s, k]} of one sequence."""
    blocks, topk = {}, {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: blocks.__setitem__(i, out[0].float()))
             for i, layer in enumerate(model.layers)]
    hooks += [layer.attn.indexer.register_forward_hook(lambda m, a, out, i=i: topk.__setitem__(i, out[0]))
              for i, layer in enumerate(model.layers) if hasattr(layer.attn, "indexer")]
    try:
        with torch.no_grad():
            logits = model(ids.unsqueeze(0))[0]
    finally:
        for h in hooks:
            h.remove()
    return logits, blocks, topk


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def topk_set_agreement(ours, ref, offset):
    """Fraction of (position, selected entry) pairs of the reference that we select too."""
    ours = torch.where(ours >= 0, ours - offset, -1)
    hits = total = 0
    for o, r in zip(ours.tolist(), ref.tolist(), strict=False):
        r = {x for x in r if x >= 0}
        hits += len(r & {x for x in o if x >= 0})
        total += len(r)
    return hits / max(total, 1)


@pytest.fixture(scope="module")
def fp32_run():
    ref = load_file(CASE / "reference_quant_off_fp32.safetensors")
    model = dsv4.load_model(CASE / "ckpt", dtype=torch.float32, quant_emulation=False, progress=False)
    return ref, run_with_captures(model, ref["input_ids"])


def test_fp32_logits_match_reference_at_every_position(fp32_run):
    ref, (logits, _, _) = fp32_run
    err = (logits - ref["logits"]).abs().max().item()
    assert err < 1e-4, f"max |dlogit| {err:.3g}"
    assert torch.equal(logits.argmax(-1), ref["logits"].argmax(-1))


def test_fp32_block_outputs_match_reference(fp32_run):
    ref, (_, blocks, _) = fp32_run
    for i in range(4):
        want = ref[f"hidden_prefill.{i}"]
        got = blocks[i][: want.shape[0]]
        assert cosine(got, want) >= 0.99999, f"block {i}"
        assert (got - want).abs().max().item() < 1e-3, f"block {i}"


def test_fp32_indexer_selects_the_reference_entries(fp32_run):
    ref, (_, _, topk) = fp32_run
    n = ref["input_ids"].shape[0]
    for i in (1, 3):
        assert topk_set_agreement(topk[i], ref[f"indexer_topk.{i}"], offset=n) == 1.0, f"layer {i}"


@pytest.fixture(scope="module")
def bf16_case():
    ref = load_file(CASE / "reference_quant_on_bf16.safetensors")
    meta = json.loads((CASE / "ckpt" / "config.json").read_text())
    assert meta["quantization_config"]["scale_fmt"] == "ue8m0"
    model = dsv4.load_model(CASE / "ckpt", dtype=torch.bfloat16, quant_emulation=True, progress=False)
    return ref, model


def teacher_forced_blocks(model, ref):
    """Each block run on the reference's own input to it (block i-1's output): {i: (ours, want)} [s, hc, D].

    Teacher forcing isolates every layer: end to end, one bf16 near-tie in an indexer or router choice
    changes everything downstream in a random-weight model, which says nothing about correctness.
    """
    n = ref["hidden_prefill.0"].shape[0]
    ids = ref["input_ids"][:n].unsqueeze(0)
    pos = torch.arange(n)
    out = {}
    with torch.no_grad():
        h = model.embed(ids).unsqueeze(2).repeat(1, 1, model.cfg.hc_mult, 1)
        for i, layer in enumerate(model.layers):
            if i > 0:
                h = ref[f"hidden_prefill.{i - 1}"].unsqueeze(0).to(torch.bfloat16)
            out[i] = (layer(h, pos, ids)[0].float(), ref[f"hidden_prefill.{i}"])
    return out


def test_bf16_quant_emulation_is_bit_exact_layer_by_layer(bf16_case):
    """Measured (CPU, torch 2.13): 99.82 / 99.97 / 99.99 / 99.72 % of block-output elements bit-identical to the
    reference's bf16 values, every position's cosine >= 0.99992. Without the emulation only 6-8 % are."""
    ref, model = bf16_case
    for i, (ours, want) in teacher_forced_blocks(model, ref).items():
        exact = (ours == want).float().mean().item()
        rows = torch.nn.functional.cosine_similarity(ours.flatten(1).double(), want.flatten(1).double(), dim=-1)
        assert exact >= 0.99, f"block {i}: only {exact:.4%} bit-identical"
        assert rows.min().item() >= 0.9999, f"block {i}: worst position cosine {rows.min().item():.6f}"


def test_bf16_without_emulation_is_not_bit_exact(bf16_case):
    """The layer-by-layer check above can fail: the same model with the emulation off does."""
    ref, model = bf16_case
    model.set_quant_emulation(False)
    try:
        blocks = teacher_forced_blocks(model, ref)
    finally:
        model.set_quant_emulation(True)
    for i in (1, 2, 3):
        ours, want = blocks[i]
        assert (ours == want).float().mean().item() < 0.5, f"block {i}"


def test_bf16_head_reproduces_reference_logits(bf16_case):
    """hc_head + norm + fp32 head on the reference's last block output: the logits of every prefill row."""
    ref, model = bf16_case
    h = ref["hidden_prefill.3"].unsqueeze(0).to(torch.bfloat16)
    with torch.no_grad():
        logits = model.logits(h, model.norm, model.hc_head_fn, model.hc_head_scale, model.hc_head_base)[0]
    want = ref["logits"][: h.shape[1]]
    assert (logits - want).abs().max().item() < 1e-5
    assert torch.equal(logits.argmax(-1), want.argmax(-1))


def test_bf16_end_to_end_statistics(bf16_case):
    """End to end (all 392 rows, the last 72 from the reference's decode steps) bf16 near-ties compound
    chaotically in this random-weight model. Measured: argmax agreement 0.872, median row cosine 0.9988,
    CSA top-k set agreement 0.965 (layer 1) / 0.834 (layer 3). The floors below sit under those figures;
    the same model with the emulation off measures 0.75 / 0.9940 / 0.819 and fails every one of them."""
    ref, model = bf16_case
    logits, blocks, topk = run_with_captures(model, ref["input_ids"])
    agree = (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
    rows = torch.nn.functional.cosine_similarity(logits.double(), ref["logits"].double(), dim=-1)
    assert agree >= 0.8, f"argmax agreement {agree:.3f}"
    assert rows.median().item() >= 0.998, rows.median()
    assert cosine(blocks[0][: 320], ref["hidden_prefill.0"]) >= 0.9999999
    n = ref["input_ids"].shape[0]
    assert topk_set_agreement(topk[1], ref["indexer_topk.1"], offset=n) >= 0.95


def test_bf16_emulation_is_closer_to_the_emulated_reference_than_plain_bf16():
    """The emulation must model something real: switching it off moves us away from the QAT reference."""
    ref = load_file(CASE / "reference_quant_on_bf16.safetensors")
    ids = ref["input_ids"][:200].unsqueeze(0)
    model = dsv4.load_model(CASE / "ckpt", dtype=torch.bfloat16, quant_emulation=True, progress=False)
    with torch.no_grad():
        on = model(ids)[0]
        off = model.set_quant_emulation(False)(ids)[0]
    want = ref["logits"][:200]
    assert (on - want).abs().mean() < (off - want).abs().mean()
