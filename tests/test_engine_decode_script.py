"""scripts/bench/engine_decode.py (a GPU measurement of `Engine.step()` in steady decode) on the CPU: its steps go
through the fixed-shape decode path, serially and with async decode, and the parts it reports add up to the step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_scripts import load

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "engine_decode.py"


@pytest.fixture(scope="module")
def script():
    return load("engine_decode", "bench_engine_decode")


@pytest.mark.parametrize("mode", ["both", "on"])
def test_steady_decode_parts_add_up(script, tmp_path, mode):
    out = tmp_path / "engine_decode.json"
    res = script.main(["--tiny", "--layers", "1", "--batches", "2", "--context", "16", "--steps", "2",
                       "--async-decode", mode, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert [r["async_decode"] for r in res["runs"]] == script.MODES[mode] and res["compile"] is False
    for run in res["runs"]:
        assert run["batch"] == 2
        # medians of the parts need not add up exactly; with 2 steps each median is the mean of two
        parts = run["run_ms"] + run["sample_ms"] + run["wait_ms"] + run["other_ms"]
        assert run["run_ms"] > 0 and run["sample_ms"] > 0 and parts == pytest.approx(run["step_ms"], rel=0.05)
        assert "replay_ms" not in run                      # nothing captured on the CPU: no GPU time invented


def test_help_explains(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    assert "host_exposed_ms" in capsys.readouterr().out


def test_profile_reports_per_step(script):
    """--profile: per step the wall time and the GPU's busy / idle time (none on the CPU: zero, not invented)."""
    res = script.main(["--tiny", "--layers", "1", "--batches", "1", "--context", "16", "--steps", "2",
                       "--async-decode", "off", "--profile", "2"])
    pr = res["runs"][-1]["profile"]
    assert pr["steps"] == 2 and pr["wall_ms"] > 0
    assert pr["gpu_busy_ms"] == pr["gpu_idle_ms"] == 0 and pr["top"] == []
