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
from dsv4.model.state import fresh_state

CASE = paths.OFFICIAL_TINY


def run_with_captures(model, ids):
    """Logits [s, V], block outputs {i: [s, hc, D]} and indexer top-k {i: [s, k]} of one sequence (as
    compressed-entry ids, -1 = none, like the reference files)."""
    blocks, topk = {}, {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: blocks.__setitem__(i, out[0].float()))
             for i, layer in enumerate(model.layers)]
    indexers = {i: layer.attn.indexer for i, layer in enumerate(model.layers) if hasattr(layer.attn, "indexer")}

    def recording(i, select):
        def wrapped(*args, **kwargs):
            out = select(*args, **kwargs)
            offset = model.cfg.window_size + ids.shape[0]       # entries follow the ring and the new rows
            topk[i] = torch.where(out[0] >= 0, out[0] - offset, -1)
            return out
        return wrapped

    for i, indexer in indexers.items():
        indexer.select = recording(i, indexer.select)
    try:
        with torch.no_grad():
            logits = model(ids.unsqueeze(0))[0]
    finally:
        for h in hooks:
            h.remove()
        for indexer in indexers.values():
            del indexer.select
    return logits, blocks, topk


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def topk_set_agreement(ours, ref):
    """Fraction of (position, selected entry) pairs of the reference that we select too."""
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
    for i in (1, 3):
        assert topk_set_agreement(topk[i], ref[f"indexer_topk.{i}"]) == 1.0, f"layer {i}"


@pytest.fixture(scope="module")
def bf16_case():
    ref = load_file(CASE / "reference_quant_on_bf16.safetensors")
    meta = json.loads((CASE / "ckpt" / "config.json").read_text())
    assert meta["quantization_config"]["scale_fmt"] == "ue8m0"
    model = dsv4.load_model(CASE / "ckpt", dtype=torch.bfloat16, quant_emulation=True, progress=False)
    return ref, model


def teacher_forced_blocks(model, ref, forced_topk=True, calls=None):
    """Each block run on the reference's own input to it (block i-1's output): {i: (ours, want)} [s, hc, D].

    Teacher forcing isolates every layer: end to end, one bf16 near-tie in an indexer or router choice
    changes everything downstream in a random-weight model, which says nothing about correctness.
    With `forced_topk` the CSA layers attend to the reference's own indexer choices (ours are compared
    separately, where only exact score ties may differ); `calls` collects each indexer call's arguments.
    """
    n = ref["hidden_prefill.0"].shape[0]
    ids = ref["input_ids"][:n].unsqueeze(0)
    state, batch = fresh_state(model.cfg, 1, n, torch.bfloat16, "cpu")
    out = {}
    for i, layer in enumerate(model.layers):
        if hasattr(layer.attn, "indexer"):
            layer.attn.indexer.select = _forced(layer.attn.indexer, ref[f"indexer_topk.{i}"][:n], forced_topk,
                                                calls.setdefault(i, []) if calls is not None else [])
    try:
        with torch.no_grad():
            h = model.embed(ids).unsqueeze(2).repeat(1, 1, model.cfg.hc_mult, 1)
            for i, layer in enumerate(model.layers):
                if i > 0:
                    h = ref[f"hidden_prefill.{i - 1}"].unsqueeze(0).to(torch.bfloat16)
                out[i] = (layer(h, ids, batch, state.layers[i])[0].float(), ref[f"hidden_prefill.{i}"])
    finally:
        for layer in model.layers:
            if hasattr(layer.attn, "indexer"):
                del layer.attn.indexer.select
    return out


def _forced(indexer, ref_topk, forced, calls):
    select = type(indexer).select.__get__(indexer)

    def wrapped(w, q, keys, start, offset):
        calls.append((w, q, keys, start, offset))
        ours = select(w, q, keys, start, offset)
        if not forced:
            return ours
        return torch.where(ref_topk >= 0, ref_topk + offset, -1).unsqueeze(0)
    return wrapped


def test_bf16_quant_emulation_is_bit_exact_layer_by_layer(bf16_case):
    """Teacher-forced, most of every block's output is bit-identical to the reference's bf16 values.

    Why not every element: the reference's fp32 GEMMs summed in its machine's order. On another CPU a different
    order flips a few bf16 roundings, and when such a flip lands on an FP8 decision (a block amax crossing a
    power of two, an e4m3 tie) a whole 128-wide block moves by up to one e4m3 step: that position's cosine drops
    to ~0.999, and a flipped compressed entry moves every later position that reads it.
    Measured, torch 2.13 CPU — bit-identical elements / positions with cosine >= 0.9999 / worst position cosine:
      * the machine that wrote this test: 99.82 / 99.97 / 99.99 / 99.72 % elements, worst cosine >= 0.99992;
      * Xeon (Sapphire Rapids, AVX-512): 99.55 / 97.43 / 89.33 / 99.31 % elements; 99.7 / 97.5 / 96.2 / 100 %
        positions >= 0.9999; worst 0.99915 / 0.99977 / 0.99941 / 0.99992; median position cosine 1.0.
    With the emulation off only 6-8 % of elements are identical (next test), so the floors below still separate
    a faithful emulation from a wrong one by a wide margin."""
    ref, model = bf16_case
    for i, (ours, want) in teacher_forced_blocks(model, ref).items():
        exact = (ours == want).float().mean().item()
        rows = torch.nn.functional.cosine_similarity(ours.flatten(1).double(), want.flatten(1).double(), dim=-1)
        assert exact >= 0.85, f"block {i}: only {exact:.4%} bit-identical"
        assert rows.median().item() >= 0.9999999, f"block {i}: median position cosine {rows.median().item():.8f}"
        close = (rows >= 0.9999).float().mean().item()
        assert close >= 0.93, f"block {i}: only {close:.2%} of positions have cosine >= 0.9999"
        assert rows.min().item() >= 0.998, f"block {i}: worst position cosine {rows.min().item():.6f}"


def test_bf16_indexer_choices_differ_from_the_reference_only_at_exact_ties(bf16_case):
    """On the reference's own inputs our CSA top-k equals the reference's wherever the choice is determined:
    where the sets differ, the scores of both selections are the same multiset (bf16 ties, which torch.topk
    breaks in a length-dependent order and we break towards the earlier entry)."""
    ref, model = bf16_case
    calls = {}
    teacher_forced_blocks(model, ref, forced_topk=False, calls=calls)
    for i, ((w, q, keys, start, offset),) in calls.items():
        indexer = model.layers[i].attn.indexer
        score = indexer.weighted_scores(w, q, keys)[0].float()                     # [n, t]
        ours = indexer.select(w, q, keys, start, offset)[0]
        want = ref[f"indexer_topk.{i}"][: q.shape[1]]
        ties = 0
        for row, (o, r) in enumerate(zip(ours.tolist(), want.tolist(), strict=True)):
            o, r = sorted(x - offset for x in o if x >= 0), sorted(x for x in r if x >= 0)
            if o != r:
                ties += 1
                assert sorted(score[row, o].tolist()) == sorted(score[row, r].tolist()), f"layer {i} row {row}"
        assert ties < 0.2 * q.shape[1], f"layer {i}: {ties} rows differ"


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
    err = (logits - want).abs().amax(-1)                                       # [rows]
    # Rows are fp32 products of a bf16-rounded normalised vector: exact up to summation order (1e-5), except
    # where the fp32 sums of hc_head/norm round one element to the neighbouring bf16 value on this CPU (one
    # row of 320 on a Sapphire Rapids Xeon, max error 2.2e-4; none where this test was written).
    assert (err <= 1e-5).float().mean().item() >= 0.99, err
    assert err.max().item() < 1e-3
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
    assert cosine(blocks[0][: 320], ref["hidden_prefill.0"]) >= 0.99999       # 0.9999978 on a Xeon (see above)
    assert topk_set_agreement(topk[1], ref["indexer_topk.1"]) >= 0.95


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
