"""Taps and dumps (docs/parity.md): every documented stage is recorded with its documented layout, recording
changes nothing, taps are free when no recorder is active, and a dump round-trips through its files.

Tolerance: the recorded logits are the very tensors the model returns (recording is a copy), so they are
compared for equality; prefill + decode taps against the full forward are fp32 class (cosine >= 0.99999, as
tests/test_decode_state.py).
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from dsv4.model.state import fresh_state
from dsv4.parity.dump import dump, read_step, record_steps, step_files
from dsv4.parity.taps import (
    GLOBAL_HEAD,
    GLOBAL_TAIL,
    LAYER_STAGES,
    Recorder,
    TapError,
    recording,
    stage_of,
    stage_order,
    tap,
)

IDS = torch.randint(2, 500, (37,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="module")
def prefill(tiny_model_fp32):
    return next(record_steps(tiny_model_fp32, IDS, 0))


def expected_stages(kind: str) -> list[str]:
    skip = {"sliding": ("attn.compressed", "attn.indexer."), "hca": ("attn.indexer.",), "csa": ()}[kind]
    return [s for s, _, _ in LAYER_STAGES if not s.startswith(skip or ("\0",))]


def test_every_documented_stage_is_recorded_in_forward_order(prefill, tiny_cfg):
    want = [s for s, _, _ in GLOBAL_HEAD]
    for i, kind in enumerate(tiny_cfg.layer_kinds):
        want += [f"layers.{i}.{s}" for s in expected_stages(kind)]
    want += [s for s, _, _ in GLOBAL_TAIL]
    assert list(prefill.taps) == want
    assert {stage_of(n)[1] for n in prefill.taps} == set(stage_order())       # the tiny model has every stage


def test_recorded_layouts_match_the_schema(prefill, tiny_cfg):
    c, t = tiny_cfg, len(IDS)
    n4, k = t // 4, min(tiny_cfg.index_topk, t // 4)
    shapes = {"embed": (1, t, c.dim), "logits": (1, t, c.vocab_size), "hc_head": (1, t, c.dim),
              "layers.0.hc_attn_pre.weights": (1, t, c.hc_mult), "layers.0.hc_attn_pre.comb": (1, t, 4, 4),
              "layers.1.attn.q": (1, t, c.n_heads, c.head_dim), "layers.1.attn.window_kv": (1, t, c.head_dim),
              "layers.1.attn.compressed": (n4, c.head_dim), "layers.1.attn.indexer.keys": (n4, c.index_head_dim),
              "layers.1.attn.indexer.scores": (1, t, n4), "layers.1.attn.indexer.topk": (t, k),
              "layers.2.attn.compressed": (0, c.head_dim), "layers.1.attn.out": (1, t, c.n_heads, c.head_dim),
              "layers.1.attn.wo": (1, t, c.dim), "layers.3.ffn.routing.ids": (t, c.n_activated_experts),
              "layers.3.ffn.experts_out": (t, c.dim), "layers.3.block.out": (1, t, c.hc_mult, c.dim)}
    for name, shape in shapes.items():
        assert tuple(prefill.taps[name].shape) == shape, name
    assert prefill.taps["layers.1.attn.indexer.topk"].dtype == torch.int64
    assert prefill.taps["layers.0.hc_attn_pre.weights"].dtype == torch.float32


def test_topk_tap_holds_entry_indices_of_visible_entries(prefill):
    picks = prefill.taps["layers.1.attn.indexer.topk"]
    visible = (torch.arange(len(IDS)) + 1) // 4
    assert ((picks == -1) | ((picks >= 0) & (picks < visible[:, None]))).all()
    assert (picks >= 0).sum(-1).tolist() == visible.clamp(max=picks.shape[1]).tolist()
    scores = prefill.taps["layers.1.attn.indexer.scores"][0]
    assert torch.isinf(scores).sum().item() == sum(scores.shape[1] - v for v in visible.tolist())


def test_recording_changes_nothing_and_taps_are_the_outputs(tiny_model_fp32, prefill):
    with torch.no_grad():
        plain = tiny_model_fp32(torch.tensor([IDS]))
    assert torch.equal(plain, prefill.taps["logits"])
    torch.testing.assert_close(prefill.taps["layers.3.block.out"], tiny_model_fp32.hidden(torch.tensor([IDS])))


def test_tap_without_recorder_touches_nothing():
    class Poison:
        def __getattr__(self, name):
            raise AssertionError(f"tap looked at the tensor ({name}) with no recorder active")

    assert not recording()
    tap("anything", Poison())                # no recorder: the argument is never touched


def test_recorder_is_per_thread_and_nests():
    seen = []
    with Recorder() as outer:
        tap("a", torch.ones(1))
        thread = threading.Thread(target=lambda: seen.append(recording()))
        thread.start()
        thread.join()
        with Recorder() as inner:
            tap("b", torch.ones(1))
        tap("c", torch.ones(1))
    assert seen == [False]
    assert list(outer.tensors) == ["a", "c"] and list(inner.tensors) == ["b"]
    assert not recording()


def test_a_name_recorded_twice_is_an_error(tiny_model_fp32, tiny_cfg):
    """Two sequences in one step would overwrite each other's per-sequence taps: refuse."""
    state, batch = fresh_state(tiny_cfg, 2, 12, torch.float32, "cpu")
    with Recorder(), pytest.raises(TapError, match=r"attn\.compressed"):
        tiny_model_fp32.step(torch.tensor([IDS[:12] * 2]), batch, state)


def test_include_filter_and_index_offset():
    with Recorder(include=["*.attn.q", "idx"]) as rec:
        tap("embed", torch.ones(2))
        tap("idx", torch.tensor([5, -1, 7]), index_offset=5)
    assert list(rec.tensors) == ["idx"]
    assert rec.tensors["idx"].tolist() == [0, -1, 2]


def test_prefill_then_decode_taps_reproduce_the_full_forward(tiny_model_fp32, tmp_path):
    manifest = dump(tiny_model_fp32, IDS, 3, tmp_path, {"model": "tiny"})
    files = step_files(tmp_path)
    assert [f.name for f in files] == ["step_000_prefill.safetensors", "step_001.safetensors",
                                       "step_002.safetensors", "step_003.safetensors"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    tokens = IDS + manifest["generated"][:3]
    with torch.no_grad():
        full = tiny_model_fp32(torch.tensor([tokens]))[0]
    for i, f in enumerate(files):
        step = read_step(f)
        assert step.start == (0 if i == 0 else len(IDS) + i - 1)
        names = list(step.taps)
        assert names[0] == "embed" and names[-1] == "logits"          # forward order survives
        got = step.taps["logits"][0]
        want = full[step.start:step.start + len(step.tokens)]
        assert torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1).min() >= 0.99999
        assert manifest["steps"][i]["next_token"] == int(got[-1].argmax())


def test_dump_cli_and_its_bad_input(tiny_ckpt, tmp_path, capsys):
    from dsv4.cli import main

    tokens = tmp_path / "t.json"
    tokens.write_text(json.dumps(IDS[:9]))
    assert main(["parity", "dump", "--model", str(tiny_ckpt), "--tokens", str(tokens), "--decode-steps", "1",
                 "--out", str(tmp_path / "d"), "--taps", "logits"]) == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["prompt_tokens"] == IDS[:9] and manifest["quant_emulation"] and manifest["dtype"] == "float32"
    assert [s["n_taps"] for s in manifest["steps"]] == [1, 1]
    capsys.readouterr()
    good = tmp_path / "good.json"
    good.write_text(json.dumps(IDS[:5]))
    tokens.write_text(json.dumps([1, 2, 512]))
    for bad in (["--tokens", str(tokens)], ["--tokens", str(tmp_path / "d" / "manifest.json")],
                ["--tokens", str(good), "--inject-bug", "nonsense"]):
        assert main(["parity", "dump", "--model", str(tiny_ckpt), *bad, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "outside the model's vocabulary" in err[0] and "expected a JSON list" in err[1]
    assert "unknown bug 'nonsense'" in err[2]
