"""The fixed-shape decode step of T new tokens per sequence (`DecodeBatch` with `tokens_per_seq=T`: speculative
verification of k = T - 1 drafts) equals the general step path (`StepBatch`) on the same tokens.

Tolerance as in test_decode_batch.py (fp32 models accumulate in float64, so only summation order differs): cosine
>= 0.99999 per row and identical argmax for the logits, the same cosine per row for every state tensor row that
means something afterwards (window ring, compressor rows of the previous and current block, entries and indexer
keys of complete blocks), -inf and zero patterns exact. Sequences sit at different positions in one batch: before
the window fills, across its wrap, and with ratio-4 and ratio-128 blocks completing at the first, a middle and the
last of the T tokens. A twin that writes the ring before reading the rows it overwrites must fail.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.model.attention import Attention
from dsv4.model.state import DecodeBatch, ModelState, StepBatch

PAGE, PAGES, STEPS = 128, 4, 2
# First new positions: 3 (window not full), 14 (crosses the ring's wrap at 16), 125/126 (the first ratio-128 block
# completes at 127: at the first, a middle or the last of the T tokens, depending on T and the step), 253 (the
# second one), 300; every ratio-4 phase occurs over the steps.
STARTS, SLOTS = [3, 14, 125, 126, 253, 300], [4, 0, 2, 5, 1, 3]



def pages_of(slot: int) -> list[int]:
    return list(range(slot * PAGES, (slot + 1) * PAGES))


@pytest.fixture(scope="module")
def prefilled(model) -> ModelState:
    """The sequences' prompts, through the general path, once per model (each test runs on a clone)."""
    gen = torch.Generator().manual_seed(0)
    state = ModelState(model.cfg, max(SLOTS) + 1, (max(SLOTS) + 1) * PAGES, PAGE, model.dtype)
    for n, slot in zip(STARTS, SLOTS, strict=True):
        ids = torch.randint(2, 512, (1, n), generator=gen)
        with torch.no_grad():
            model.step(ids, StepBatch.build([(slot, 0, n, pages_of(slot))], "cpu"), state)
    return state


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Row-wise (last dim) cosine >= 0.99999; -inf (empty score slots) and all-zero rows (never written) exact."""
    inf = torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), inf), f"{what}: -inf pattern"
    g, w = got.masked_fill(inf, 0).double(), want.masked_fill(inf, 0).double()
    zero = (w == 0).all(-1)
    assert torch.equal((g == 0).all(-1), zero), f"{what}: zero rows"
    if (~zero).any():
        cos = torch.nn.functional.cosine_similarity(g[~zero], w[~zero], dim=-1)
        assert cos.min().item() >= 0.99999, f"{what}: worst cosine {cos.min().item():.7f}"


def assert_state_close(got: ModelState, want: ModelState, slot: int, n: int) -> None:
    """One sequence's state after its first n tokens. Compressor rows past the current block's n % r tokens are
    stale (never read by either path) and are left out."""
    pages = torch.tensor(pages_of(slot))
    for i, (g, w) in enumerate(zip(got.layers, want.layers, strict=True)):
        assert_rows_close(g.ring[slot], w.ring[slot], f"layer {i} ring")
        for name, r in (("compressor", g.ratio), ("index_compressor", 4)):
            if getattr(g, name) is None:
                continue
            used = (r if r == 4 else 0) + n % r                     # previous block (overlapping) + current one
            for t in ("kv", "score"):
                a, b = getattr(getattr(g, name), t)[slot, :used], getattr(getattr(w, name), t)[slot, :used]
                assert_rows_close(a, b, f"layer {i} {name}.{t}")
        for name, r in (("entries", g.ratio), ("index_keys", 4)):
            if getattr(g, name) is None:
                continue
            rows = torch.arange(n // r)
            per = getattr(g, name).shape[1]
            a, b = (getattr(s, name)[pages[rows // per], rows % per] for s in (g, w))
            assert_rows_close(a, b, f"layer {i} {name}")


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    cos = torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1)
    assert cos.min().item() >= 0.99999, f"worst cosine {cos.min().item():.7f} at row {cos.argmin().item()}"
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def run_and_compare(model, prefilled: ModelState, t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    ref_state, fast_state = prefilled.clone(), prefilled.clone()
    starts = list(STARTS)
    for _ in range(STEPS):
        ids = torch.randint(2, 512, (1, len(starts) * t), generator=gen)
        ref_batch = StepBatch.build([(s, p, t, pages_of(s)) for s, p in zip(SLOTS, starts, strict=True)], "cpu")
        batch = DecodeBatch.build([(s, p, pages_of(s)) for s, p in zip(SLOTS, starts, strict=True)], PAGES, "cpu",
                                  tokens_per_seq=t)
        want = model.main_logits(model.step(ids, ref_batch, ref_state))[0]
        got = model.main_logits(model.step(ids, batch, fast_state))[0]
        assert_logits_close(got, want)
        starts = [p + t for p in starts]
        for slot, n in zip(SLOTS, starts, strict=True):
            assert_state_close(fast_state, ref_state, slot, n)


@pytest.mark.parametrize("t", [2, 3, 4])
@torch.no_grad()
def test_multi_token_decode_equals_step_batch(model, prefilled, t):
    run_and_compare(model, prefilled, t)


@torch.no_grad()
def test_writing_the_ring_before_reading_it_fails(model, prefilled, monkeypatch):
    """The failing twin: the new rows written before the overwritten ones are read (queries before p+i then see
    token p+i instead of p+i-W)."""
    if model.quant_emulation:
        pytest.skip("the failing twin runs once")
    window = Attention._decode_window

    def written_first(self, kv, pos, slots, state, dtype):
        state.ring[slots.unsqueeze(1), pos % self.window] = kv.to(state.ring.dtype)
        return window(self, kv, pos, slots, state, dtype)
    monkeypatch.setattr(Attention, "_decode_window", written_first)
    with pytest.raises(AssertionError):
        run_and_compare(model, prefilled, 3)


@torch.no_grad()
def test_mtp_block_multi_token_decode_equals_step_batch(model):
    """The MTP block (sliding window, a `ModelState` of its own) through the same fixed-shape path."""
    cfg, t = model.cfg, 3
    gen = torch.Generator().manual_seed(1)
    states = [ModelState(cfg, 2, 1, PAGE, model.dtype, layer_ids=[cfg.n_layers]) for _ in range(2)]
    for n, slot in ((5, 0), (30, 1)):                  # p + T - 1 below and past the window
        h = torch.randn(1, n, cfg.hc_mult, cfg.dim, generator=gen)
        ids = torch.randint(2, 512, (1, n), generator=gen)
        for st in states:
            model.mtp_step(h, ids, StepBatch.build([(slot, 0, n, [])], "cpu"), st)
    h = torch.randn(1, 2 * t, cfg.hc_mult, cfg.dim, generator=gen)
    ids = torch.randint(2, 512, (1, 2 * t), generator=gen)
    want = model.mtp_step(h, ids, StepBatch.build([(0, 5, t, []), (1, 30, t, [])], "cpu"), states[0])
    got = model.mtp_step(h, ids, DecodeBatch.build([(0, 5, [0]), (1, 30, [0])], 1, "cpu", tokens_per_seq=t),
                         states[1])
    assert_logits_close(model.mtp_logits(got)[0], model.mtp_logits(want)[0])
    for slot in (0, 1):
        assert_rows_close(states[1].layers[0].ring[slot], states[0].layers[0].ring[slot], f"mtp ring {slot}")


def test_build_and_bad_sizes(model):
    b = DecodeBatch.build([(1, 5, [7]), (0, 300, [2, 3, 4])], 4, "cpu", tokens_per_seq=3)
    assert b.positions.tolist() == [5, 6, 7, 300, 301, 302]
    assert (b.n_tokens, b.tokens_per_seq) == (6, 3)
    with pytest.raises(ValueError, match="tokens_per_seq"):
        DecodeBatch.build([(0, 5, [1])], 2, "cpu", tokens_per_seq=0)
    w = model.cfg.window_size
    state = ModelState(model.cfg, 1, PAGES, PAGE, model.dtype)
    with pytest.raises(ValueError, match="exceeds the window"), torch.no_grad():
        model.step(torch.zeros(1, w + 1, dtype=torch.long),
                   DecodeBatch.build([(0, 0, [0])], 1, "cpu", tokens_per_seq=w + 1), state)


class _NegatingSum:
    """A tensor-parallel group whose 'sum over ranks' negates: it reverses the indexer's top-k, so a path that
    skips the sum picks other entries than one that applies it."""

    world = 1

    @staticmethod
    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        return -x


@torch.no_grad()
def test_both_paths_sum_the_indexer_scores_over_ranks(model, prefilled, monkeypatch):
    """Under tensor parallelism each rank scores the entries with its own indexer heads; the top-k must come from
    the sum over ranks in the fixed-shape path as in the general one (else the ranks attend to different entries)."""
    if model.quant_emulation:
        pytest.skip("the bookkeeping is the same with the emulation on")
    indexers = [layer.attn.indexer for layer in model.layers if getattr(layer.attn, "ratio", 0) == 4]
    assert indexers
    for ix in indexers:
        monkeypatch.setattr(ix, "tp", _NegatingSum())
    run_and_compare(model, prefilled, 1)
    run_and_compare(model, prefilled, 2)
