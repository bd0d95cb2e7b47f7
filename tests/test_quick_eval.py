"""scripts/bench/quick_eval_builtin.py's README check: README's prompt generated alone with `dsv4 generate`'s
budget, flagged as looping when it runs to the budget with few distinct 4-grams (the nineteenth session's v7a passed
issue 17's item 4 and was not installed because this text looped)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "bench"))

import quick_eval_builtin


class _LLM:
    """Records the calls; returns one output per prompt."""

    def __init__(self, token_ids: list[int], finish_reason: str):
        self.out = SimpleNamespace(token_ids=token_ids, finish_reason=finish_reason, text="x")
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return [self.out for _ in prompts]


def _params(**kw):
    return kw


@pytest.mark.parametrize(("ids", "reason", "loops"), [
    ([5, 6, 7, 8] * 64, "length", True),                    # a 4-token cycle to the budget: loops
    (list(range(256)), "length", False),                    # to the budget, all distinct: does not loop
    ([5, 6, 7, 8] * 10 + [1], "stop", False),               # repetitive but ends (EOS): the newcomer sees an end
])
def test_readme_greedy_flags_a_text_that_runs_to_the_budget_repeating(ids, reason, loops):
    llm = _LLM(ids, reason)
    got = quick_eval_builtin.readme_greedy(llm, _params)
    assert got["loops"] is loops
    assert got["tokens"] == len(ids) and got["eos"] is (reason == "stop")
    (prompts, params), = llm.calls
    assert prompts == [quick_eval_builtin.README_PROMPT]           # alone: a batch changes CPU greedy paths
    assert params == {"temperature": 0, "max_tokens": quick_eval_builtin.README_TOKENS}
