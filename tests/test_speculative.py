"""Speculative decoding through the engine (engine/speculative.py) on the tiny model, emulation on and off:
greedy outputs equal the non-speculative ones token for token (alone, batched, across window and
compression-block boundaries, under preemption); after rejections the decode state equals a clean run's that never
saw the rejected tokens; stops and max_tokens never overshoot; logprobs, seeds and metrics behave.

To see acceptances on a random model, `oracle` replaces the MTP drafts with the known greedy continuation, made
wrong at chosen positions (the ratio-4 and ratio-128 block ends among them)."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.engine.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.speculative import Draft, Speculator
from dsv4.model.state import ModelState, StepBatch


def make_engine(model, tokenizer, **options):
    options = {"max_num_seqs": 8, "page_size": 128, "num_pages": 64, "max_num_batched_tokens": 256} | options
    return Engine(model, tokenizer, EngineConfig(**options))


def run(engine, prompts, params):
    outs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    for _ in range(10_000):
        if not engine.has_unfinished():
            return outs
        engine.step()
    raise AssertionError("engine does not terminate")


def prompt(n, seed):
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def oracle(monkeypatch, truth: dict[tuple, list[int]], bad: set[int], vocab: int):
    """Drafts = the true continuation (truth[prompt] = prompt + greedy output), wrong at positions in `bad`."""
    def draft(self, runner, drafting, x):
        for e, _ in drafting:
            full = truth[tuple(e.seq.prompt_ids)]
            first = e.start + e.n + e.accepted + 1                     # position of the first draft
            toks = [(full[p] + 1) % vocab if p in bad else full[p] for p in range(first, first + self._budget(e))]
            e.seq.draft = Draft(toks, torch.nn.functional.one_hot(torch.tensor(toks), vocab).float())
    monkeypatch.setattr(Speculator, "_draft", draft)


def test_greedy_with_mtp_drafts_equals_without_batched_and_preempted(tiny_model_fp32, tokenizer):
    model = tiny_model_fp32
    prompts = [prompt(n, i) for i, n in enumerate([125, 3, 9])]
    want = [o.token_ids for o in run(make_engine(model, tokenizer), prompts, GREEDY)]
    # 3 pages for 3 sequences: the first crosses its page end (drafts included) and preempts the newest.
    engine = make_engine(model, tokenizer, max_num_seqs=3, num_pages=3, max_num_batched_tokens=64,
                         num_speculative_tokens=2)
    outs = run(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == want
    assert engine.num_preemptions > 0, "the cache was meant to be too small"
    assert engine.cache.slots.num_used == 0 and engine.cache.pages.num_used == 0
    m = outs[0].metrics
    assert m.num_spec_steps > 0 and m.num_draft_tokens > 0 and 0 <= m.acceptance_rate <= 1


def test_greedy_with_accepted_drafts_across_block_boundaries(model, tokenizer, monkeypatch):
    """Prompts ending just before the ratio-128 block end (position 127) and a window wrap; drafts wrong at every
    ratio-4 block end and at 127, so rejected drafts complete compression blocks before the real tokens do."""
    prompts = [prompt(118, 5), prompt(30, 6), prompt(9, 7)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = [o.token_ids for o in run(make_engine(model, tokenizer), prompts, params)]
    oracle(monkeypatch, {tuple(p): p + w for p, w in zip(prompts, want, strict=True)},
           {q for q in range(200) if q % 4 == 3 and q % 8 != 7} | {127, 129}, model.cfg.vocab_size)
    engine = make_engine(model, tokenizer, num_speculative_tokens=3)
    outs = run(engine, prompts, params)
    assert [o.token_ids for o in outs] == want
    m = outs[0].metrics
    assert 0 < m.acceptance_rate < 1 and m.mean_accepted_tokens > 0.5


def committed_chunks(monkeypatch) -> list[tuple[int, int]]:
    """Records, per step, the chunk that determined the slot's state: (start, tokens kept)."""
    log = []
    rollback = Speculator._rollback

    def record(self, entries):
        rollback(self, entries)
        log.extend((e.start, e.n + e.accepted) for e in entries)
    monkeypatch.setattr(Speculator, "_rollback", record)
    return log


def clean_state(model, ids, chunks, pages):
    """The state after feeding only `ids` in `chunks` (what a run that never saw a rejected draft holds)."""
    state = ModelState(model.cfg, 1, max(pages) + 1, 128, model.dtype)
    for start, n in chunks:
        batch = StepBatch.build([(0, start, n, pages)], "cpu")
        with torch.inference_mode():
            model.step(torch.tensor([ids[start:start + n]]), batch, state)
    return state


def assert_state_equal(got: ModelState, slot: int, want: ModelState, pages: list[int], n_tokens: int):
    for i, (g, w) in enumerate(zip(got.layers, want.layers, strict=True)):
        assert torch.equal(g.ring[slot], w.ring[0]), f"layer {i}: window ring"
        for name in ("compressor", "index_compressor"):
            if getattr(g, name) is not None:
                for t in ("kv", "score"):
                    a, b = getattr(getattr(g, name), t)[slot], getattr(getattr(w, name), t)[0]
                    assert torch.equal(a, b), f"layer {i}: {name}.{t}"
        for name in ("entries", "index_keys"):
            pool_g, pool_w = getattr(g, name), getattr(w, name)
            if pool_g is None:
                continue
            valid = n_tokens // g.ratio if name == "entries" else n_tokens // 4     # entries already complete
            per = pool_g.shape[1]
            rows = torch.arange(valid)
            assert torch.equal(pool_g[torch.tensor(pages)[rows // per], rows % per],
                               pool_w[torch.tensor(pages)[rows // per], rows % per]), f"layer {i}: {name}"


def spec_run_with_log(model, tokenizer, monkeypatch, p, params, bad):
    want = run(make_engine(model, tokenizer), [p], params)[0].token_ids
    oracle(monkeypatch, {tuple(p): p + want}, bad, model.cfg.vocab_size)
    log = committed_chunks(monkeypatch)
    engine = make_engine(model, tokenizer, num_speculative_tokens=3)
    out = engine.add_request("r", p, params)
    seq = engine.requests["r"].seqs[0]
    slot, pages = seq.slot, None
    while engine.has_unfinished():
        engine.step()
        slot, pages = seq.slot if seq.slot is not None else slot, list(seq.pages) or pages
    return engine, out, slot, pages, log, want


@pytest.mark.parametrize("broken", [False, True], ids=["rollback", "no-rollback-must-fail"])
def test_state_after_rejections_equals_a_clean_run(model, tokenizer, monkeypatch, broken):
    if broken and model.quant_emulation:
        pytest.skip("the failing twin runs once")
    p = prompt(118, 11)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    if broken:
        monkeypatch.setattr(ModelState, "load_slot", lambda self, slot, saved: None)
    bad = {q for q in range(200) if q % 4 == 3} | {127}
    engine, out, slot, pages, log, want = spec_run_with_log(model, tokenizer, monkeypatch, p, params, bad)
    ids = p + out.token_ids
    n_done = sum(n for _, n in log)                       # tokens whose state is in the cache
    assert n_done == log[-1][0] + log[-1][1] and n_done > 128
    want_state = clean_state(model, ids, log, pages)
    if broken:
        with pytest.raises(AssertionError):
            assert_state_equal(engine.state, slot, want_state, pages, n_done)
    else:
        assert out.token_ids == want
        assert_state_equal(engine.state, slot, want_state, pages, n_done)


def test_mtp_state_equals_a_clean_feed_of_the_accepted_tokens(tiny_model_fp32, tokenizer):
    """The MTP ring after real drafting (chains, rejections) = the MTP block fed (h_i, token i+1) for every
    computed position in one go (fp32, emulation off: equal to rounding)."""
    model, p = tiny_model_fp32, prompt(37, 3)
    engine = make_engine(model, tokenizer, num_speculative_tokens=3)
    engine.add_request("r", p, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    seq = engine.requests["r"].seqs[0]
    for _ in range(6):
        engine.step()
    n, ids = seq.num_computed, seq.all_ids
    with torch.inference_mode():
        h = model.hidden(torch.tensor([ids[:n]]))
        state = ModelState(model.cfg, 1, 1, 128, model.dtype, layer_ids=[model.cfg.n_layers])
        model.mtp_step(h, torch.tensor([ids[1:n + 1]]), StepBatch.build([(0, 0, n, [])], "cpu"), state)
    torch.testing.assert_close(engine.runner.speculator.mtp_state.layers[0].ring[seq.slot], state.layers[0].ring[0])


def test_stops_and_max_tokens_never_overshoot(tiny_model_fp32, tokenizer, monkeypatch):
    """All drafts right (k = 4): a stop token, a stop string or max_tokens inside an accepted run of drafts cuts
    the output exactly where the non-speculative engine stops; logprobs come per emitted token."""
    model, p = tiny_model_fp32, prompt(20, 9)
    base = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    full = run(make_engine(model, tokenizer), [p], base)[0]
    oracle(monkeypatch, {tuple(p): p + full.token_ids}, set(), model.cfg.vocab_size)
    text = full.outputs[0].text
    cases = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[full.token_ids[6]])]
    if len(text) > 8:
        cases.append(SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=text[5:8]))
    for params in cases:
        want = run(make_engine(model, tokenizer), [p], params)[0]
        got = run(make_engine(model, tokenizer, num_speculative_tokens=4), [p], params)[0]
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.finish_reason == want.finish_reason and got.outputs[0].stop_reason == want.outputs[0].stop_reason
        if want.logprobs is not None:
            assert len(got.logprobs) == len(got.token_ids)
            for a, b in zip(got.logprobs, want.logprobs, strict=True):
                assert a.keys() == b.keys()
                torch.testing.assert_close(torch.tensor(list(a.values())), torch.tensor(list(b.values())))


def test_seeded_sampling_with_penalties_is_reproducible(tiny_model_fp32, tokenizer):
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                            frequency_penalty=0.3, seed=123, max_tokens=6, ignore_eos=True, n=2)
    runs = [run(make_engine(tiny_model_fp32, tokenizer, num_speculative_tokens=2), [prompt(12, 4)], params)[0]
            for _ in range(2)]
    assert [c.token_ids for c in runs[0].outputs] == [c.token_ids for c in runs[1].outputs]
    assert all(len(c.token_ids) == 6 for c in runs[0].outputs)


def test_bad_options_are_clear_errors(tiny_model_fp32, tokenizer):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(num_speculative_tokens=-1)
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        EngineConfig(num_speculative_tokens=2, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        make_engine(tiny_model_fp32, tokenizer, num_speculative_tokens=tiny_model_fp32.cfg.window_size)


# Code prompts besides the pinned one, for the acceptance figure: one prompt's 16 tokens are too few to judge a
# draft head by (v2 on `def fibonacci(n):` alone: 3 of 21 drafts, a docstring of made-up words; on these six,
# 35 of 98; an untrained or mis-fed MTP head accepts ~0)
DRAFT_PROMPTS = ("def is_palindrome(text):", "def flatten(nested):", "def chunked(items, size):",
                 "def merge_sorted(left, right):", "def count_words(path):")


def test_builtin_model_greedy_equals_the_pinned_continuation():
    """On the trained built-in model (its MTP head drafts well: most drafts are accepted) the greedy output with
    speculation is the committed non-speculative continuation (tests/data/builtin_expected.json)."""
    import json
    from pathlib import Path

    expected = json.loads((Path(__file__).resolve().parent / "data" / "builtin_expected.json").read_text())
    llm = dsv4.LLM(max_num_seqs=6, num_pages=12, page_size=128, num_speculative_tokens=2)
    n = 16
    outs = llm.generate([expected["prompt"], *DRAFT_PROMPTS],
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    assert outs[0].token_ids == expected["token_ids"][:n]
    drafted, accepted = (sum(getattr(o.metrics, k) for o in outs) for k in ("num_draft_tokens", "num_accepted_tokens"))
    steps = sum(o.metrics.num_spec_steps for o in outs)
    assert accepted / drafted > 0.3 and accepted / steps > 0.5


def test_greedy_with_penalties_counts_the_drafts(tiny_model_fp32, tokenizer, monkeypatch):
    """Penalties see each accepted draft before the next row is judged (per-row histories): greedy outputs with
    penalties equal the non-speculative ones. Negative penalties make this prompt repeat tokens within one verify
    step (233, 151, 233, 151 ...), so a verification that ignored the earlier drafts' counts picks other tokens
    (checked: it fails with `row_counts` given no drafts)."""
    model, p = tiny_model_fp32, prompt(20, 13)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, presence_penalty=-0.5,
                            frequency_penalty=-0.3, repetition_penalty=1.1)
    want = run(make_engine(model, tokenizer), [p], params)[0].token_ids
    assert len(set(want)) < len(want), "the case needs repeated tokens"
    oracle(monkeypatch, {tuple(p): p + want}, set(), model.cfg.vocab_size)
    out = run(make_engine(model, tokenizer, num_speculative_tokens=3), [p], params)[0]
    assert out.token_ids == want and out.metrics.num_accepted_tokens > 0
