"""scripts/bench/graph_divergence.py's recorder: module outputs, op calls and the model's taps, and how a
difference is labelled (the script itself needs a GPU to find anything: on a CPU both paths are equal)."""

from __future__ import annotations

from pathlib import Path

import torch
from bench_scripts import load

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load("graph_divergence")


def test_recorder_keeps_module_outputs_ops_and_taps_and_labels_them(tiny_model_fp32):
    gd = _script()
    ids = torch.randint(2, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    recs = []
    for _ in range(2):
        with torch.inference_mode(), gd.Recorder(tiny_model_fp32).hooks() as rec:
            tiny_model_fp32(ids)
        recs.append(rec)
    keys = recs[0].calls.keys()
    assert "layers.0.attn" in keys and any(k.startswith("layers.0.attn/") and "/tap:" not in k for k in keys)
    assert {"layers.0.attn/tap:attn.out_pre_inverse_rope", "layers.0.attn/tap:attn.out"} <= keys
    assert gd.differences(recs[0], recs[1]) == []                     # the same run twice: nothing differs
    # a tap whose bits differ is labelled "tap" (it has no input of its own); a module with the same input "ORIGIN"
    for key in ("layers.0.attn/tap:attn.out", "layers.0.attn"):
        inputs, outputs = recs[1].calls[key][0]
        recs[1].calls[key][0] = (inputs, [outputs[0] + outputs[0].abs().max(), *outputs[1:]])
    lines = gd.differences(recs[0], recs[1])
    assert any(line.split()[:2] == ["tap", "layers.0.attn/tap:attn.out:"] for line in lines), lines
    assert any(line.split()[:2] == ["ORIGIN", "layers.0.attn:"] for line in lines), lines
