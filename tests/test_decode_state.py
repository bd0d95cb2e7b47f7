"""Incremental decode state (spec §4): prefill + decode, chunked prefill and mixed batches all reproduce the
full-sequence forward of the same tokens.

The full forward is itself checked against DeepSeek's reference (test_official_reference.py). Tolerance: fp32,
only the order of a few sums differs, so cosine >= 0.99999 and identical argmax at every position.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from dsv4.model.state import ModelState, StepBatch

PAGE = 128


def cos_rows(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def assert_same(got, want):
    c = cos_rows(got, want)
    assert c.min().item() >= 0.99999, f"worst cosine {c.min().item():.7f} at row {c.argmin().item()}"
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def run_schedule(model, seqs, schedule, slots=None, pages_per_seq=8):
    """Run sequences (lists of ids) through a schedule: a list of steps, each a list of (seq, n_tokens).
    Returns each sequence's logits [len, V], gathered from every step's rows."""
    slots = slots or list(range(len(seqs)))
    state = ModelState(model.cfg, max(slots) + 1, (max(slots) + 1) * pages_per_seq, PAGE, model.dtype)
    pages = {i: list(range(slots[i] * pages_per_seq, (slots[i] + 1) * pages_per_seq)) for i in range(len(seqs))}
    done = [0] * len(seqs)
    out = [[] for _ in seqs]
    for step in schedule:
        chunks, ids = [], []
        for i, n in step:
            chunks.append((slots[i], done[i], n, pages[i]))
            ids += seqs[i][done[i]:done[i] + n]
            done[i] += n
        batch = StepBatch.build(chunks, "cpu")
        with torch.no_grad():
            logits = model.main_logits(model.step(torch.tensor([ids]), batch, state))[0]
        for (i, _), seq in zip(step, batch.seqs, strict=True):
            out[i].append(logits[seq.offset:seq.offset + seq.length])
    assert done == [len(s) for s in seqs]
    return [torch.cat(o) for o in out]


_FULL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()       # model -> {tokens: logits}


def full(model, ids):
    """The full-sequence forward's logits, computed once per model and tokens: the chunked-prefill cases share
    their reference (four sizes over the same 400 tokens, two over the same 260), and only read it."""
    known = _FULL.setdefault(model, {})
    if tuple(ids) not in known:
        with torch.no_grad():
            known[tuple(ids)] = model(torch.tensor([ids]))[0]
    return known[tuple(ids)]


def chunks_of(total, size, start=0):
    steps, pos = [], start
    while pos < total:
        steps.append([(0, min(size, total - pos))])
        pos += steps[-1][0][1]
    return steps



def tokens(n, seed):
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_then_decode_equals_full_forward_over_400_tokens(model):
    """A 200-token prefill (one ratio-128 block already compressed), then 200 decode steps that cross 50 ratio-4
    blocks, the ratio-128 block and page ends at 256 and 384 (the second and third entries, written by decode) and
    the 16-token window 12 times. Every decode step is a model step (CI time): crossing more blocks runs the same
    code again."""
    ids = tokens(400, 0)
    got = run_schedule(model, [ids], [[(0, 200)]] + [[(0, 1)]] * 200)[0]
    assert_same(got, full(model, ids))


@pytest.mark.parametrize("size", [1, 3, 4, 127, 128, 129, 300])
def test_chunked_prefill_equals_one_shot(model, size):
    """Chunks of 3 and 4 tokens over 260 tokens: from an empty state across the ratio-128 block and page ends at
    128 and 256 and 65 ratio-4 blocks (chunks of 3 straddle them); each chunk is a model step (CI time). Chunks of
    1 (decode steps from an empty state) over 140: the first window, 35 ratio-4 blocks, and the ratio-128 block and
    page end at 128, every entry written by single steps; single steps across a later block and page end (256, 384)
    are test_prefill_then_decode_equals_full_forward_over_400_tokens's. The larger chunks over 400 tokens (300:
    one chunk crossing two ratio-128 blocks)."""
    ids = tokens(400, 1)[:140 if size == 1 else 260 if size <= 4 else 400]
    got = run_schedule(model, [ids], chunks_of(len(ids), size))[0]
    assert_same(got, full(model, ids))


def test_a_sequence_is_the_same_alone_and_in_a_mixed_batch(model):
    """8 sequences of different lengths at different positions: prefill chunks and decode steps in one batch."""
    lengths = [5, 17, 64, 130, 131, 200, 257, 300]
    seqs = [tokens(n, 10 + i) for i, n in enumerate(lengths)]
    schedule, done = [], [0] * 8
    step = 0
    while any(d < n for d, n in zip(done, lengths, strict=True)):
        cur = []
        for i, n in enumerate(lengths):
            if done[i] >= n or step < i:          # staggered starts: different positions in every step
                continue
            take = 1 if done[i] >= 40 else min(n - done[i], 13 + 7 * i)
            take = min(take, n - done[i]) if step % 5 else min(n - done[i], 50)
            cur.append((i, take))
            done[i] += take
        schedule.append(cur)
        step += 1
    got = run_schedule(model, seqs, schedule, slots=[7, 3, 0, 5, 1, 6, 2, 4])
    for i, ids in enumerate(seqs):
        assert_same(got[i], full(model, ids))


def test_a_reused_slot_starts_clean(model):
    """The reference leaks compressor state into the next sequence; resetting the slot must prevent it."""
    first, second = tokens(203, 3), tokens(2, 4) + tokens(301, 5)
    state = ModelState(model.cfg, 1, 8, PAGE, model.dtype)
    pages = list(range(8))
    with torch.no_grad():
        model.step(torch.tensor([first]), StepBatch.build([(0, 0, len(first), pages)], "cpu"), state)
        state.reset_slot(0)
        h = model.step(torch.tensor([second]), StepBatch.build([(0, 0, len(second), pages)], "cpu"), state)
    assert_same(model.main_logits(h)[0], full(model, second))


def test_saved_slot_restores_exactly_into_another_slot(model):
    """save_slot / load_slot (speculative rollback, prefix caching): a sequence prefilled in slot 0, its slot saved,
    clobbered by another sequence and restored into slot 1, continues exactly as without the detour."""
    ids = tokens(203, 7)
    cut = 141                                  # mid-window and mid-compression-block (ratio 4 and 128)
    state = ModelState(model.cfg, 2, 16, PAGE, model.dtype)
    pages = list(range(8))
    with torch.no_grad():
        model.step(torch.tensor([ids[:cut]]), StepBatch.build([(0, 0, cut, pages)], "cpu"), state)
        saved = state.save_slot(0)
        other = tokens(150, 9)                  # another sequence overwrites slot 0 (its own pages)
        state.reset_slot(0)
        model.step(torch.tensor([other]), StepBatch.build([(0, 0, len(other), list(range(8, 16)))], "cpu"), state)
        state.load_slot(1, saved)
        h = model.step(torch.tensor([ids[cut:]]), StepBatch.build([(1, cut, len(ids) - cut, pages)], "cpu"), state)
    assert_same(model.main_logits(h)[0], full(model, ids)[cut:])
    with pytest.raises(ValueError, match="snapshot holds"):
        state.load_slot(0, saved[:-1])
