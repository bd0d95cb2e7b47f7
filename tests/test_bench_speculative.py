"""scripts/bench/speculative.py (a GPU measurement) at least imports, parses and projects correctly on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_scripts import load

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "speculative.py"


@pytest.fixture(scope="module")
def bench():
    return load("speculative", "bench_speculative")


def test_projection_counts_tokens_and_costs(bench):
    costs = {t: {"step_s": 1.0 + 0.1 * (t - 1), "mtp_step_s": 0.1} for t in (1, 2, 3, 4)}
    p = bench.projection(costs, [1.0])                 # every draft accepted: 2 tokens for 1.1 + 0.1, no re-feed
    assert p["tokens_per_step"] == 2.0 and p["step_cost_s"] == pytest.approx(1.2)
    p = bench.projection(costs, [0.5, 0.5])            # 1 + 0.5 + 0.25 tokens; re-feed 75 % of the time
    assert p["tokens_per_step"] == 1.75
    assert p["step_cost_s"] == pytest.approx(1.2 + 0.1 + 0.1 + 0.75 * 1.1)


def test_help_parses(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "--out" in capsys.readouterr().out


def test_first_differences_locate_the_divergence(bench):
    ref = [[1, 2, 3], [4, 5, 6]]
    assert bench.first_differences(ref, ref) == [None, None]
    assert bench.first_differences([[1, 9, 3], [4, 5]], ref) == [1, 2]        # a changed token; a shorter output
