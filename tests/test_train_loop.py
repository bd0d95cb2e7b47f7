"""The loop: records, resume, MoE bias update and load statistics, MTP loss, the CLI on chat data."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

import dsv4
from dsv4.cli import main
from dsv4.train.data import Document, PackStream, pack
from dsv4.train.loop import TrainConfig, Trainer
from dsv4.train.metrics import read_metrics
from dsv4.train.optim import lr_at
from dsv4.train.params import prepare_full, prepare_lora


def _stream(n_docs=6, seed=0):
    rng = random.Random(seed)
    docs = [Document(ids := [0] + [rng.randrange(2, 512) for _ in range(rng.randrange(15, 40))],
                     [True] * len(ids)) for _ in range(n_docs)]
    return PackStream(pack(docs, 64), 2, seed)


def _trainer(ckpt, out, lora=True, **cfg):
    m = dsv4.load_model(ckpt, dtype=torch.float32, progress=False)
    torch.manual_seed(0)
    m = prepare_lora(m, 4) if lora else prepare_full(m)
    cfg = TrainConfig(**{"max_steps": 3, "lr": 1e-2, "warmup_steps": 1, "seq_len": 64, "packs_per_step": 2,
                         "grad_ckpt": False, **cfg})
    return Trainer(m, _stream(), cfg, out, progress=False)


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 1.0, 4, 20, 0.1) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:])) and lrs[20] == pytest.approx(0.1)


def test_records_png_and_exact_resume(tiny_ckpt, tmp_path):
    straight = _trainer(tiny_ckpt, tmp_path / "a").run()
    rec = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rec] == [0, 1, 2]
    for key in ("loss", "lr", "grad_norm", "tokens", "target_tokens", "tok_per_s", "expert_load"):
        assert key in rec[0], key
    loads = rec[0]["expert_load"]
    assert set(loads) == {"layers.0", "layers.1", "layers.2", "layers.3", "mtp.0"}
    assert sum(loads["mtp.0"]["tokens"]) == 0                                   # no MTP loss: not run
    k = dsv4.tiny_config().n_activated_experts
    assert sum(loads["layers.2"]["tokens"]) == k * rec[0]["tokens"]             # every token routed to k experts
    assert (tmp_path / "a" / "loss.png").stat().st_size > 10_000

    first = _trainer(tiny_ckpt, tmp_path / "b", max_steps=1)
    first.run()
    resumed = _trainer(tiny_ckpt, tmp_path / "b")                               # a fresh process, same command
    resumed.run()
    again = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in again] == [0, 1, 2]
    assert [r["loss"] for r in again] == [r["loss"] for r in straight]          # bit-exact continuation


def test_bias_update_balances_topk_gates_only(tiny_ckpt, tmp_path):
    t = _trainer(tiny_ckpt, tmp_path, lora=True, bias_update_rate=1e-3, max_steps=1)
    before = t.model.layers[2].ffn.gate.bias.clone()
    rec = t.run()[0]
    load = torch.tensor(rec["expert_load"]["layers.2"]["tokens"]).float()
    step = t.model.layers[2].ffn.gate.bias - before
    torch.testing.assert_close(step, 1e-3 * torch.sign(load.mean() - load))
    assert not hasattr(t.model.layers[0].ffn.gate, "bias")                      # hash layer


def test_mtp_loss_trains_the_mtp_block(tiny_ckpt, tmp_path):
    t = _trainer(tiny_ckpt, tmp_path, lora=False, mtp_weight=0.3, max_steps=1)
    before = t.model.mtp[0].e_proj.weight.detach().clone()
    rec = t.run()
    assert all(r["mtp_loss"] > 0 for r in rec)
    assert not torch.equal(t.model.mtp[0].e_proj.weight, before)
    # per document, the MTP block's positions but the last (it reads a padding token) are counted as expert load
    docs = [d for p in t.stream.step(0) for d in p]
    k = dsv4.tiny_config().n_activated_experts
    assert sum(rec[0]["expert_load"]["mtp.0"]["tokens"]) == k * sum(len(d) - 1 for d in docs)


def test_cli_finetunes_the_builtin_model_on_chat_data(tmp_path, monkeypatch, builtin_ckpt, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}"},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ("alpha", "beta", "gamma", "delta")))
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(builtin_ckpt), "--data", str(data), "--lora", "2", "--max-steps", "1",
                 "--seq-len", "64", "--out", str(out), "--lr", "1e-3"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0]
    assert (out / "adapter" / "adapter.safetensors").exists() and (out / "loss.png").exists()
    assert json.loads((out / "run.json").read_text())["lora_rank"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    assert main(["finetune", "--model", str(builtin_ckpt), "--data", str(bad), "--full", "--out",
                 str(tmp_path / "x")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_bf16_compute_keeps_fp32_master_weights(tiny_ckpt, tmp_path):
    m = prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.bfloat16, progress=False))
    cfg = TrainConfig(max_steps=1, lr=1e-3, warmup_steps=1, seq_len=64, packs_per_step=2, grad_ckpt=False)
    t = Trainer(m, _stream(), cfg, tmp_path, progress=False)
    t.run()
    pairs = [(p, mw) for p, mw in zip(t.master.params, t.master.masters, strict=True) if p.dtype == torch.bfloat16]
    assert len(pairs) > 50 and m.layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    for p, mw in pairs:
        assert mw.dtype == torch.float32 and torch.equal(p, mw.detach().bfloat16())
    assert any(not torch.equal(mw.detach(), mw.detach().bfloat16().float()) for _, mw in pairs)   # fp32 detail kept
