"""`dsv4 parity hf`: dsv4 and transformers' DeepseekV4ForCausalLM on one checkpoint, compared under the tap schema
over a prefill and greedy decode steps (transformers runs one full-sequence forward; its taps are cut into
dsv4's steps).

Tolerance: fp32 on both sides, emulation off: only summation order differs (tests/test_hf_parity.py measures
worst block cosine 1 - 6e-13), so every mapped tap must reach cosine 1 - 1e-8, max |d| < 1e-4 and identical
index sets. A bug injected into dsv4 must show up at the tap it breaks: proof the mapping compares what it claims.
"""

from __future__ import annotations

import json

import pytest
import torch

from dsv4.cli import main
from dsv4.parity import bugs
from dsv4.parity.compare import Report, compare_steps
from dsv4.parity.dump import record_steps
from dsv4.parity.hf_oracle import load_hf_from_checkpoint, transformers_status
from dsv4.parity.hf_taps import hf_step_taps

_ok, _why = transformers_status()
pytestmark = pytest.mark.skipif(not _ok, reason=f"needs transformers >= 5.8.1 with DeepseekV4ForCausalLM: {_why}")

IDS = torch.randint(2, 500, (45,), generator=torch.Generator().manual_seed(5)).tolist()
NOT_CAPTURED = {"hc_attn_pre.weights", "hc_ffn_pre.weights", "attn.indexer.keys"}


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    return load_hf_from_checkpoint(tiny_ckpt)


def compare_with_hf(model, hf, ids, decode_steps) -> Report:
    ours = list(record_steps(model, ids, decode_steps))
    theirs = hf_step_taps(hf, model.cfg, [t for s in ours for t in s.tokens], [(s.start, len(s.tokens)) for s in ours])
    report = Report()
    for step, taps in zip(ours, theirs, strict=True):
        compare_steps(step.file_name, step.taps, taps, report, 1 - 1e-8, 1.0)
    return report


@pytest.fixture(scope="module")
def compared(tiny_model_fp32, hf):
    return compare_with_hf(tiny_model_fp32, hf, IDS, 2)


def test_every_mapped_tap_matches_at_fp32_precision(compared):
    assert compared.first_divergence is None, compared.first_divergence
    assert all(r.max_abs is None or r.max_abs < 1e-4 for r in compared.rows)
    assert all(r.overlap in (None, 1.0) for r in compared.rows)


def test_everything_but_three_stages_is_mapped(compared):
    missing = {n.split(":")[1].split(".", 2)[-1] for n in compared.only_a}
    assert missing == NOT_CAPTURED and not compared.only_b
    stages = {r.name.split(".", 2)[-1] if r.name.startswith("layers.") else r.name for r in compared.rows}
    assert {"attn.q", "attn.window_kv", "attn.out_pre_inverse_rope", "attn.indexer.scores", "attn.indexer.topk",
            "attn.compressed", "ffn.routing.weights", "logits"} <= stages
    assert {r.step for r in compared.rows} == {"step_000_prefill.safetensors", "step_001.safetensors",
                                               "step_002.safetensors"}


def test_an_injected_bug_shows_at_the_tap_it_breaks(tiny_model_fp32, hf):
    with bugs.inject("compressed-early"):
        report = compare_with_hf(tiny_model_fp32, hf, IDS[:20], 0)
    assert report.first_divergence.name == "layers.1.attn.indexer.scores"


def test_cli(tiny_ckpt, tmp_path, capsys):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(IDS[:20]))
    args = ["parity", "hf", "--model", str(tiny_ckpt), "--tokens", str(tokens), "--threshold", "0.99999999"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("OK: 71 taps agree") and out[-2].startswith("note: not compared (10 taps)")
