"""`dsv4 parity` as a kernel developer meets it: dumps that are partial, stale, corrupt or made with other
settings, and flags given wrongly. The tool must never say "OK" having compared less than both dumps hold, must
say which precision class its threshold assumed, and must answer bad input with one line (exit 2), no traceback.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dsv4.cli import main
from dsv4.parity.compare import compare_dumps
from dsv4.parity.dump import Step, dump, write_step
from dsv4.parity.errors import ParityError
from dsv4.parity.table import render

IDS = torch.randint(2, 500, (21,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.fixture(scope="module")
def good(tiny_model_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("workflow") / "good"
    dump(tiny_model_fp32, IDS, 1, out, {"model": "tiny"})
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsv4 parity: error: "), err
    return err[0]


def test_a_dump_that_stopped_early_is_not_ok(good, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(good / "step_000_prefill.safetensors", partial)
    assert not compare_dumps(good, partial).ok
    assert main(["parity", "compare", str(good), str(partial)]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("INCOMPLETE:") and "--step" in last
    assert main(["parity", "compare", str(good), str(partial), "--step", "prefill"]) == 0     # on purpose: fine


def test_a_step_filter_or_file_that_matches_nothing_is_an_error(good, capsys):
    assert main(["parity", "compare", str(good), str(good), "--step", "nomatch"]) == 2
    assert "--step nomatch" in _error_line(capsys)
    assert main(["parity", "compare", str(good), str(good / "manifest.json")]) == 2
    _error_line(capsys)
    with pytest.raises(ParityError, match="no tap in common"):
        _compare_disjoint(good)


def _compare_disjoint(good):
    step = Step(0, 0, [1], {"other.name": torch.ones(2)}, 0)
    out = good.parent / "disjoint"
    out.mkdir(exist_ok=True)
    return compare_dumps(good / "step_000_prefill.safetensors", write_step(step, out))


def test_a_truncated_step_file_is_a_one_line_error(good, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "step_001.safetensors").write_bytes((good / "step_001.safetensors").read_bytes()[:1000])
    assert main(["parity", "compare", str(good), str(bad)]) == 2
    assert "step_001.safetensors: not a readable step file" in _error_line(capsys)


def test_a_dump_replaces_the_step_files_of_an_older_one(tiny_model_fp32, good, tmp_path):
    out = tmp_path / "reused"
    shutil.copytree(good, out)
    dump(tiny_model_fp32, IDS, 0, out)
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000_prefill.safetensors"]


def test_a_taps_glob_that_matches_nothing_is_an_error(tiny_model_fp32, tmp_path):
    with pytest.raises(ParityError, match="no tap matches"):
        dump(tiny_model_fp32, IDS, 0, tmp_path / "none", include=["layer.0.*"])
    assert not list((tmp_path / "none").glob("step_*"))


def test_dumps_in_two_precision_classes_are_named_as_such(tmp_path):
    a = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0))
    b = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).bfloat16()
    for name, t in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        write_step(Step(0, 0, [1, 2], {"layers.0.attn.indexer.scores": t}, 0), tmp_path / name)
    report = compare_dumps(tmp_path / "a", tmp_path / "b")
    assert report.first_divergence is not None
    assert any("A computes in float32, B in bfloat16" in n and "precision class" in n for n in report.notes)
    verdict = render(report, 0.999, 0.99).splitlines()[-1]
    assert verdict.startswith("DIVERGED:") and "A is float32 and B bfloat16" in verdict


def test_dumps_of_other_settings_say_so(good, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(good, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "model": "another-checkpoint",
                                                     "quant_emulation": True}))
    notes = compare_dumps(good, other).notes
    assert any("model tiny (A) vs another-checkpoint (B)" in n for n in notes)
    assert any("quant_emulation False (A) vs True (B)" in n for n in notes)


def test_the_ok_verdict_counts_the_taps_it_did_not_compare(tiny_model_fp32, good, tmp_path):
    dump(tiny_model_fp32, IDS, 1, tmp_path / "sub", include=["layers.0.*"])
    report = compare_dumps(good, tmp_path / "sub")
    assert report.ok
    assert render(report, 0.999, 0.99).splitlines()[-1].endswith(f"; {len(report.only_a)} taps in only one dump "
                                                                  "not compared")


@pytest.mark.parametrize("flags", [["--threshold", "99.9"], ["--min-overlap", "2"], ["--around", "-1"]])
def test_out_of_range_thresholds_are_errors(good, capsys, flags):
    assert main(["parity", "compare", str(good), str(good), *flags]) == 2
    assert flags[0] in _error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "t.json").write_text("[0, 5, 7]")
    assert main(["parity", "dump", "--tokens", str(tmp_path / "t.json"), "--out", str(tmp_path / "d"),
                 "--device", "cuda"]) == 2
    assert "--device cuda" in _error_line(capsys)
