"""docs/parity.md's transcripts are real: every `$ dsv4 ...` line of its text blocks is run and its output must
match the lines that follow it.

Words must match exactly; numbers to 2% (relative) or one unit of their last printed decimal, so a CPU with
another summation order cannot fail the test while a wrong verdict, tap name, layout or an exactly-zero error that
became non-zero does. The commands without --model run the shipped built-in model (`dsv4/builtin_model/`).
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest

from dsv4.cli import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "parity.md"
NUMBER = re.compile(r"^(1-)?([-+]?\d+(?:\.(\d+))?(?:e[-+]\d+)?)$")


def transcripts(text: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for every `$ dsv4 ...` line inside a fenced block."""
    out = []
    for block in re.findall(r"```text\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ dsv4 "):
                out.append((line[2:], []))
            elif out and line.strip():
                out[-1][1].append(line)
    return out


def _value(token: str) -> tuple[float, float] | None:
    """(value, tolerance of its last printed digit) of a printed number; `1-2.0e-05` is a cosine."""
    m = NUMBER.match(token)
    if not m:
        return None
    value = float(m.group(2))
    decimals = m.group(3)
    last_digit = 10.0 ** -len(decimals) if decimals is not None and "e" not in token else 0.0
    return value, last_digit


def same_line(got: str, want: str) -> bool:
    g, w = got.split(), want.split()
    if len(g) != len(w):
        return False
    for a, b in zip(g, w, strict=True):
        va, vb = _value(a), _value(b)
        if va is None or vb is None or a.startswith("1-") != b.startswith("1-"):
            if a != b:
                return False
        elif not math.isclose(va[0], vb[0], rel_tol=0.02, abs_tol=max(va[1], vb[1])):
            return False
    return True


def test_the_parser_accepts_noise_and_rejects_changes():
    assert same_line("x  1-2.0e-05  0.00e+00  42.31", "x 1-2.02e-05 0.00e+00 42.32")
    assert not same_line("x 1-2.0e-05 1.0e-09", "x 1-2.0e-05 0.00e+00")
    assert not same_line("layers.1.attn.q 1", "layers.2.attn.q 1")
    assert not same_line("a 0.0333", "a 0.0433")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_docs_transcripts_are_real_output(workdir, capsys):
    runs = transcripts(DOC.read_text())
    assert [c.split()[2] for c, _ in runs] == ["precision", "dump", "dump", "compare"]
    for command, want in runs:
        status = main(shlex.split(command)[1:])
        got = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
        assert status == (1 if " compare " in command else 0), command
        assert len(got) == len(want), f"{command}: {len(got)} lines, the docs show {len(want)}"
        for g, w in zip(got, want, strict=True):
            assert same_line(g, w), f"{command}\n got: {g}\ndocs: {w}"
    assert (workdir / "compressed-early.png").exists()
