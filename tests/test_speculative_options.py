"""The speculative-decoding options and counters outside the engine: `--speculative-tokens` on generate / chat /
serve (default 0, passed to `LLM` as num_speculative_tokens) and the server's /metrics counters."""

from __future__ import annotations

import types

import pytest

from dsv4.cli import build_parser
from dsv4.engine.speculative import RequestMetrics


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"]])
def test_speculative_tokens_option(command):
    parser = build_parser()
    assert parser.parse_args(command).speculative_tokens == 0
    assert parser.parse_args([command[0], "--speculative-tokens", "3", *command[1:]]).speculative_tokens == 3
    with pytest.raises(SystemExit):
        parser.parse_args([command[0], "--speculative-tokens", "-1", *command[1:]])


def test_the_option_reaches_the_llm(monkeypatch):
    import dsv4.llm
    from dsv4 import cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_llm(*args, **kwargs):
        seen.update(kwargs)
        raise Stop
    monkeypatch.setattr(dsv4.llm, "LLM", fake_llm)
    with pytest.raises(Stop):
        cli.main(["generate", "--device", "cpu", "--speculative-tokens", "2", "x"])
    assert seen["num_speculative_tokens"] == 2


def test_metrics_sums_and_server_counters():
    m = RequestMetrics(num_draft_tokens=10, num_accepted_tokens=6, num_spec_steps=4)
    assert m.acceptance_rate == 0.6 and m.mean_accepted_tokens == 1.5
    assert RequestMetrics().acceptance_rate == 0.0 and RequestMetrics().mean_accepted_tokens == 0.0
    from dsv4.serve.metrics import Metrics

    metrics = Metrics()
    track = types.SimpleNamespace(first_token=None, arrival=0.0)
    for _ in range(2):
        metrics.request_finished("stop", track, 1.0, types.SimpleNamespace(metrics=m, outputs=[]))
    metrics.request_finished("stop", track, 1.0, types.SimpleNamespace(metrics=None, outputs=[]))
    text = metrics.render().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("dsv4_spec")}
    assert values["dsv4_spec_decode_num_draft_tokens_total"] == 20
    assert values["dsv4_spec_decode_num_accepted_tokens_total"] == 12
    assert values["dsv4_spec_decode_num_steps_total"] == 8


def test_scheduler_reserves_pages_and_budget_for_drafts():
    import torch

    from dsv4.engine.pages import CacheManager
    from dsv4.engine.sampling import SamplingParams
    from dsv4.engine.scheduler import Scheduler
    from dsv4.engine.sequence import Sequence
    from dsv4.engine.speculative import Draft

    sched = Scheduler(CacheManager(2, 4, 128), 2, 6, 1024)
    seq = Sequence(list(range(127)), SamplingParams(max_tokens=50))
    sched.add(seq)
    sched.update_after_step(sched.schedule())                  # the prompt, in budget-6 chunks
    while seq.num_pending:
        sched.update_after_step(sched.schedule())
    seq.output_ids.append(5)                                   # decoding: 1 pending token at position 127
    seq.draft = Draft([1, 2, 3, 4, 5, 6], torch.zeros(6, 8))
    step = sched.schedule()
    assert step.entries == [(seq, 1)] and seq.num_draft == 5   # budget 6 = the token + 5 drafts
    assert len(seq.pages) == 2                                  # positions 127..132 cross the page end
    sched.check_invariants()
    sched._preempt(seq)
    assert seq.draft is None
