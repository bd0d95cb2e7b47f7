"""The fixed-shape decode step (`DecodeBatch`, what CUDA graphs capture) equals the general step path.

Same model, same tokens: sequences are prefilled through `StepBatch`, then decoded one token per step either
through `StepBatch` (the reference path, itself checked against the full forward in test_decode_state.py) or
through `DecodeBatch`. fp32 models accumulate in float64, so only summation order differs: cosine >= 0.99999 and
identical argmax at every step, emulation on and off, across window, ratio-4 and ratio-128 block boundaries.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.model.state import DecodeBatch, ModelState, StepBatch

PAGE, PAGES = 128, 4



def _prefill(model, prompts, slots, pages):
    state = ModelState(model.cfg, max(slots) + 2, (max(slots) + 2) * PAGES, PAGE, model.dtype)
    for ids, slot, pg in zip(prompts, slots, pages, strict=True):
        model.step(torch.tensor([ids]), StepBatch.build([(slot, 0, len(ids), pg)], "cpu"), state)
    return state


@torch.no_grad()
def test_decode_batch_equals_step_batch(model):
    lengths, slots = [3, 126, 127, 250, 300], [4, 0, 2, 1, 3]       # around the 16-token window and 4/128 blocks
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in lengths]
    pages = [list(range(s * PAGES, (s + 1) * PAGES)) for s in slots]
    ref_state, fast_state = _prefill(model, prompts, slots, pages), _prefill(model, prompts, slots, pages)
    tokens = torch.randint(2, 512, (1, len(lengths)), generator=gen)
    for step in range(40):
        pos = [n + step for n in lengths]
        ref = model.main_logits(model.step(tokens, StepBatch.build(
            [(s, p, 1, pg) for s, p, pg in zip(slots, pos, pages, strict=True)], "cpu"), ref_state))[0]
        batch = DecodeBatch.build([(s, p, pg) for s, p, pg in zip(slots, pos, pages, strict=True)], PAGES, "cpu")
        got = model.main_logits(model.step(tokens, batch, fast_state))[0]
        cos = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1)
        assert cos.min().item() >= 0.99999, (step, cos)
        assert torch.equal(got.argmax(-1), ref.argmax(-1)), step
        tokens = ref.argmax(-1).unsqueeze(0)


def test_decode_batch_build_pads_and_checks():
    b = DecodeBatch.build([(1, 5, [7]), (0, 300, [2, 3, 4])], 4, "cpu")
    assert b.page_table.tolist() == [[7, 7, 7, 7], [2, 3, 4, 2]]
    assert b.n_tokens == 2
    with pytest.raises(ValueError, match="max_pages"):
        DecodeBatch.build([(0, 5, [1, 2, 3])], 2, "cpu")


def test_decode_graphs_stage_each_steps_inputs_in_one_buffer(tiny_model_fp32):
    """`DecodeGraphs.run` writes a step's ids and batch into the bucket's one input buffer (one host-to-device copy
    on CUDA): every field as `DecodeBatch.build` makes it, padded with the scratch slot and page, for ids given as a
    list and as a device tensor; no field keeps a value of the step before."""
    from dsv4.engine.graphs import DecodeGraphs

    model = tiny_model_fp32
    state = ModelState(model.cfg, 4, 9, 128, torch.float32, "cpu")
    graphs = DecodeGraphs(model, state, 4, 3, capture=False, sizes=[4], tokens_per_seq=2)
    g, scratch = graphs.graphs[4], [(3, 0, [8])]
    for tokens, rows in (([5, 6, 7, 8], [(0, 10, [0, 1]), (2, 300, [4, 5, 6])]),
                         (torch.tensor([9, 10]), [(1, 3, [2])])):
        with torch.inference_mode():
            graphs.run(tokens, rows)
        n = len(rows)
        want = DecodeBatch.build(rows + scratch * (4 - n), 3, "cpu", tokens_per_seq=2)
        for name in ("slots", "positions", "page_table"):
            assert torch.equal(getattr(g.batch, name), getattr(want, name)), name
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
        assert g.tokens.tolist() == [ids + [0] * (8 - len(ids))]


def _lists(name, q, kv, sink, idx, *rest):
    """Each query's KV list as the twin reduces it: the rows in list order, padded to `LIST_ALIGN`, NaN where
    masked -> [b * s, k, d]. Equal lists in the two steps: the same terms in the same places and the same row
    length, so GPU reductions (whose thread layout follows the shapes) add them alike."""
    from dsv4.ops.ref import LIST_ALIGN

    if name == "sparse_attention_dense_tail":          # its definition: the visible tail rows appended
        tail, visible = rest[0], rest[1]
        j = torch.arange(tail.shape[1])
        idx = torch.cat([idx, torch.where(j < visible.unsqueeze(-1), kv.shape[1] + j, -1)], dim=-1)
        kv = torch.cat([kv, tail], dim=1)
    idx = torch.nn.functional.pad(idx, (0, -idx.shape[-1] % LIST_ALIGN), value=-1)
    rows = kv[torch.arange(kv.shape[0]).view(-1, 1, 1), idx.clamp_min(0)]           # [b, s, k, d]
    return rows.float().masked_fill(idx.unsqueeze(-1) < 0, float("nan")).flatten(0, 1)


@pytest.mark.parametrize("t", [1, 3], ids=["1-token", "3-tokens"])
@torch.no_grad()
def test_fixed_and_general_steps_attend_over_the_same_lists_bf16(tiny_ckpt, monkeypatch, t):
    """tests/test_graphs_gpu.py's scenario on CPU in bf16 with the QAT emulation: the two steps compute the same
    bits, and every query's attention list is the same rows in the same places, of the same length, in both (what
    makes the GPU's shape-dependent reductions agree too), and the indexer multiplies as many (padded) keys per
    sequence in both. Up to v10 the fixed step listed each window in ring
    order (the general step: oldest first; a 1-ulp attention difference at step 8 with 1 token, logits of cosine
    0.9992 with 3; 0.964 on the H200), and the lists' lengths differed (a short sequence's window, HCA tails).
    `scripts/bench/graph_divergence.py` finds such a first difference."""
    import dsv4
    from dsv4 import ops
    from dsv4.ops.ref import KEYS_ALIGN

    model = dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, quant_emulation=True, progress=False)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recorded(name, fn):
        def call(*args):
            out = fn(*args)
            # a copy: the model owns the op's output and rotates it in place (model/rope.py)
            calls.append((out.flatten().clone(), _lists(name, *args).flatten()))
            return out
        return call

    for name in ("sparse_attention", "sparse_attention_dense_tail"):
        monkeypatch.setattr(ops, name, recorded(name, getattr(ops, name)))
    key_counts: list[int] = []              # per sequence and CSA layer: keys the indexer's GEMM multiplies

    def counted(fn):
        def call(w, q, keys, visible=None):
            key_counts.extend([keys.shape[1] + -keys.shape[1] % KEYS_ALIGN] * keys.shape[0])
            return fn(w, q, keys, visible)
        return call

    monkeypatch.setattr(ops, "indexer_scores", counted(ops.indexer_scores))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (5, 130, 200)]
    pages = [list(range(i * PAGES, (i + 1) * PAGES)) for i in range(len(prompts))]
    fixed_state = _prefill(model, prompts, [0, 1, 2], pages)
    general_state = _prefill(model, prompts, [0, 1, 2], pages)
    tokens = torch.randint(2, 512, (1, 3 * t), generator=gen)
    for step in range(20):
        rows = [(i, len(p) + step * t, pages[i]) for i, p in enumerate(prompts)]
        calls.clear(), key_counts.clear()
        fixed = model.main_logits(model.step(tokens, DecodeBatch.build(rows, PAGES, "cpu", t), fixed_state))[0]
        fixed_calls, fixed_counts = list(calls), list(key_counts)
        calls.clear(), key_counts.clear()
        general = model.main_logits(model.step(tokens, StepBatch.build([(s, p, t, pg) for s, p, pg in rows], "cpu"),
                                               general_state))[0]
        for part in (0, 1):         # attention outputs, then lists
            want, got = (torch.cat([c[part] for c in cs]) for cs in (fixed_calls, calls))
            assert want.shape == got.shape and torch.equal(want.nan_to_num(7.0), got.nan_to_num(7.0)), (step, part)
        assert fixed_counts == key_counts, step
        assert torch.equal(fixed, general), step
        tokens = general.argmax(-1).unsqueeze(0)
