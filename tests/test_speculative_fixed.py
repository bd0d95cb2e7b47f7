"""Speculative verification through the fixed-shape decode path (`DecodeGraphs` of T = k + 1 tokens per sequence,
what CUDA graphs capture; run eagerly on CPU with `decode_batch=True`): greedy outputs equal those without
speculation, with MTP drafts (mostly rejected: rollback after a fixed-shape verify) and with oracle drafts that are
accepted across window and compression-block boundaries; the fixed path must actually run.
"""

from __future__ import annotations

import pytest
from test_speculative import GREEDY, make_engine, oracle, prompt, run

from dsv4.engine.graphs import DecodeGraphs
from dsv4.engine.sampling import SamplingParams


@pytest.fixture
def fixed_steps(monkeypatch) -> list[int]:
    """Records the batch size of every fixed-shape step."""
    sizes, original = [], DecodeGraphs.run

    def run_and_count(self, tokens, rows):
        sizes.append(len(rows))
        return original(self, tokens, rows)
    monkeypatch.setattr(DecodeGraphs, "run", run_and_count)
    return sizes


def test_greedy_with_mtp_drafts_equals_without(tiny_model_fp32, tokenizer, fixed_steps):
    model = tiny_model_fp32
    prompts = [prompt(n, i) for i, n in enumerate([125, 3, 9])]
    want = [o.token_ids for o in run(make_engine(model, tokenizer), prompts, GREEDY)]
    engine = make_engine(model, tokenizer, max_num_seqs=3, num_speculative_tokens=2, decode_batch=True)
    assert engine.runner.graphs.tokens_per_seq == 3 and sorted(engine.runner.graphs.graphs) == [1, 2, 3]
    outs = run(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == want
    assert max(fixed_steps) == 3, "the fixed-shape verify never ran for the whole batch"
    assert engine.cache.slots.num_used == 0 and engine.cache.pages.num_used == 0


def test_greedy_with_accepted_drafts_across_block_boundaries(model, tokenizer, monkeypatch, fixed_steps):
    """As in test_speculative.py: drafts right except at ratio-4 block ends and around position 127."""
    prompts = [prompt(118, 5), prompt(30, 6), prompt(9, 7)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = [o.token_ids for o in run(make_engine(model, tokenizer), prompts, params)]
    oracle(monkeypatch, {tuple(p): p + w for p, w in zip(prompts, want, strict=True)},
           {q for q in range(200) if q % 4 == 3 and q % 8 != 7} | {127, 129}, model.cfg.vocab_size)
    engine = make_engine(model, tokenizer, num_speculative_tokens=3, decode_batch=True)
    outs = run(engine, prompts, params)
    assert [o.token_ids for o in outs] == want
    assert fixed_steps, "the fixed-shape verify never ran"
    m = outs[0].metrics
    assert 0 < m.acceptance_rate < 1 and m.mean_accepted_tokens > 0.5
