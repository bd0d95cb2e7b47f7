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
