"""`dsv4 parity compare`: the metrics, the first-divergence verdict on injected known bugs, the exit status and
the heatmap.

The bug cases are the acceptance test of the tool: a bug injected with `dsv4.parity.bugs` must be reported at
the exact layer and stage where it first changes a tensor, and every tap before it must be bit-identical
(an fp32 model run twice on the same input is deterministic: cosine exactly 1, max |d| exactly 0).
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.cli import main
from dsv4.parity import bugs
from dsv4.parity.compare import Report, align_by_index, compare_dumps, compare_tensors, row_cosine, set_overlap
from dsv4.parity.dump import dump
from dsv4.parity.plot import grid, heatmap

IDS = torch.randint(2, 500, (37,), generator=torch.Generator().manual_seed(11)).tolist()


# ---------------------------------------------------------------------------------------------- metrics
def test_row_cosine_sees_one_bad_row_that_the_whole_tensor_hides():
    a = torch.randn(200, 64, dtype=torch.float64)
    b = a.clone()
    b[17] = -b[17]
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98
    cos = row_cosine(a, b)
    assert cos[17].item() == pytest.approx(-1.0) and (cos[torch.arange(200) != 17] == 1.0).all()
    assert row_cosine(torch.zeros(2, 3), torch.zeros(2, 3)).tolist() == [1.0, 1.0]
    assert row_cosine(torch.zeros(1, 3), torch.ones(1, 3)).tolist() == [0.0]


def test_set_overlap_ignores_order_and_padding():
    a = torch.tensor([[3, 1, -1], [0, 2, 5], [-1, -1, -1]])
    b = torch.tensor([[1, 3, -1], [0, 2, 4], [-1, -1, -1]])
    overlap, differ = set_overlap(a, b)
    assert overlap == pytest.approx((1 + 2 / 3 + 1) / 3) and differ == pytest.approx(100 / 3)


def test_weights_are_aligned_by_their_ids_before_comparing():
    ids_a, ids_b = torch.tensor([[4, 1]]), torch.tensor([[1, 4]])
    w_a, w_b = torch.tensor([[0.7, 0.3]]), torch.tensor([[0.3, 0.7]])
    assert torch.equal(align_by_index(w_a, ids_a), align_by_index(w_b, ids_b))


def test_inf_pattern_shape_and_bf16_mismatch():
    a = torch.tensor([[1.0, float("-inf")], [2.0, 3.0]])
    r = compare_tensors("s", "layers.0.attn.indexer.scores", a, a.clone(), 0.999, 0.99)
    assert not r.divergent and r.cosine == 1.0 and r.max_abs == 0.0 and r.mismatch_pct == 0.0
    b = a.clone()
    b[0, 1] = 5.0
    assert compare_tensors("s", "x", a, b, 0.999, 0.99).problem == "inf/NaN pattern differs"
    assert compare_tensors("s", "x", a, a[:1], 0.999, 0.99).divergent
    c = a.clone()
    c[1, 1] = 3.0 + 2 ** -20                               # below bf16 resolution at 3: bf16-identical
    r = compare_tensors("s", "x", a, c, 0.999, 0.99)
    assert r.mismatch_pct == 0.0 and 0 < r.max_abs < 1e-5 and not r.divergent


# ---------------------------------------------------------------------------------------------- known bugs
@pytest.fixture(scope="module")
def dumps(tiny_model_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("dumps")
    dump(tiny_model_fp32, IDS, 1, root / "good")
    dump(tiny_model_fp32, IDS, 1, root / "again")
    for name in bugs.BUGS:
        with bugs.inject(name):
            dump(tiny_model_fp32, IDS, 1, root / name)
    return root


@pytest.mark.parametrize(("bug", "first"), [("rope-rotate-half", "layers.0.attn.q"),
                                            ("compressed-early", "layers.1.attn.indexer.scores")])
def test_compare_pinpoints_the_first_tap_a_bug_changes(dumps, bug, first):
    report = compare_dumps(dumps / "good", dumps / bug)
    hit = report.first_divergence
    assert (hit.step, hit.name) == ("step_000_prefill", first)
    before = report.rows[: report.rows.index(hit)]
    assert before and all(r.cosine in (1.0, None) and r.max_abs in (0.0, None) and r.overlap in (1.0, None)
                          for r in before)


def test_the_injection_is_undone(dumps, tiny_model_fp32, tmp_path):
    dump(tiny_model_fp32, IDS, 1, tmp_path / "after")
    assert compare_dumps(dumps / "good", tmp_path / "after").first_divergence is None


def test_exit_status_gates_ci(dumps, capsys):
    assert main(["parity", "compare", str(dumps / "good"), str(dumps / "again")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OK: 162 taps agree")
    assert main(["parity", "compare", str(dumps / "good"), str(dumps / "compressed-early"), "--around", "2"]) == 1
    out = capsys.readouterr().out
    assert "<< FIRST DIVERGENCE" in out and "DIVERGED:" in out
    assert main(["parity", "compare", str(dumps / "good"), str(dumps / "missing")]) == 2


def test_single_step_files_and_step_filter(dumps):
    one = compare_dumps(dumps / "good" / "step_001.safetensors", dumps / "again" / "step_001.safetensors")
    assert {r.step for r in one.rows} == {"step_001"}
    only = compare_dumps(dumps / "good", dumps / "again", steps=["prefill"])
    assert {r.step for r in only.rows} == {"step_000_prefill"}


def test_heatmap_marks_the_divergent_cells(dumps, tmp_path):
    report = compare_dumps(dumps / "good", dumps / "compressed-early")
    rows, cols, values, bad = grid(report)
    assert rows[0] == "(global)" and rows[1:] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert cols[0] == "embed" and cols[-1] == "logits"
    assert not any(bad[1]) and bad[2][cols.index("attn.indexer.scores")]
    assert math.isnan(values[1][cols.index("attn.compressed")])            # sliding layer: no such tap
    heatmap(report, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = Report()
    assert grid(empty)[0] == []
