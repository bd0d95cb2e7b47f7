"""Round trip: fine-tune briefly, save (official FP8/FP4 + e8m0, bf16, LoRA adapters, merged), load strictly.

Exact checks only: a saved model differs from the in-memory trained one by storage rounding alone (bf16 for
embeddings and norms; QAT linears already computed with their FP8/FP4 values, `wo_a` among them: a trainable
dequantised weight rounded to FP8 under QAT, its input never act-quantised, as the reference computes it). So every
saved value must equal the rounded trained value, and the trained model with its parameters rounded the same way
must give the loaded model's logits (fp32 `assert_close` defaults). NOTE: logits are not compared without that
rounding: on a random tiny model a bf16 rounding flips MoE routing and indexer choices, which moves logits by O(1).
"""

from __future__ import annotations

import random

import pytest
import torch

import dsv4
from dsv4 import ops
from dsv4.checkpoint import CheckpointReader
from dsv4.checkpoint.inventory import inventory
from dsv4.quant import dequant_fp4, dequant_fp8, fake_quant_fp8, quant_fp8
from dsv4.train.data import Document, PackStream, pack
from dsv4.train.loop import TrainConfig, Trainer
from dsv4.train.params import (
    LoRALinear,
    TrainBlockDiagLinear,
    TrainLinear,
    forget_qat,
    prepare_full,
    prepare_lora,
    refresh_qat,
    storage_roundtrip,
)
from dsv4.train.run import merge_lora
from dsv4.train.save import bf16_config, export_state, save_adapters, write_checkpoint

IDS = torch.tensor([[0, 5, 17, 99, 3, 250, 7, 7, 400, 12, 33, 1]])


def _train(model, out, steps=3, lr=2e-2):
    rng = random.Random(0)
    docs = [Document([0] + [rng.randrange(2, 512) for _ in range(30)], [True] * 31) for _ in range(4)]
    cfg = TrainConfig(max_steps=steps, lr=lr, warmup_steps=1, seq_len=64, packs_per_step=2, grad_ckpt=False)
    Trainer(model, PackStream(pack(docs, 64), 2), cfg, out, progress=False).run()
    return model


def _snap(model) -> None:
    """Round the trained model's parameters to what the official checkpoint stores."""
    specs = inventory(model.cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in specs and specs[n].dtype == "BF16":
                p.copy_(p.bfloat16())
            elif n in specs and specs[n].dtype == "F8_E4M3" and not isinstance(model.get_submodule(n[:-7]),
                                                                                TrainLinear):
                p.copy_(storage_roundtrip(p, "fp8"))


def _values(path):
    r = CheckpointReader(path)
    out = {}
    for n in r.keys():
        t = r.get(n)
        scale = n[:-len("weight")] + "scale"
        if t.dtype == torch.float8_e4m3fn:
            t = dequant_fp8(t, r.get(scale))
        elif t.dtype == torch.int8:
            t = dequant_fp4(t, r.get(scale))
        if not n.endswith(".scale"):
            out[n] = t.float() if t.is_floating_point() else t
    return out


@pytest.fixture(scope="module")
def full_run(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    m = prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.float32, progress=False), qat=True)
    _train(m, out)
    write_checkpoint(export_state(m, m.cfg), m.cfg, out / "model")
    write_checkpoint(export_state(m, bf16_config(m.cfg)), bf16_config(m.cfg), out / "model-bf16")
    return m, out


def test_full_finetune_saves_official_format_that_loads_strictly(full_run, tiny_ckpt):
    m, out = full_run
    loaded = dsv4.load_model(out / "model", dtype=torch.float32, progress=False)
    _snap(m)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), m(IDS))
    before, after = CheckpointReader(tiny_ckpt), CheckpointReader(out / "model")
    assert after.get("layers.0.ffn.experts.0.w1.weight").dtype == torch.int8                   # FP4 packed
    assert after.get("layers.0.ffn.experts.0.w1.scale").dtype == torch.float8_e8m0fnu
    assert after.get("layers.0.attn.wq_a.weight").dtype == torch.float8_e4m3fn
    changed = [n for n in ("layers.0.attn.wq_a.weight", "layers.0.ffn.experts.0.w1.weight", "embed.weight")
               if not torch.equal(before.get(n).view(torch.uint8), after.get(n).view(torch.uint8))]
    assert len(changed) == 3, "training did not change the stored weights"


def test_full_finetune_trains_wo_a_and_saves_it_fp8(full_run, tiny_ckpt):
    """wo_a (held FP8 for inference) trains as a dequantised weight and is saved re-quantised: the saved bytes are
    the trained weight's FP8 encoding."""
    m, out = full_run
    before, after = CheckpointReader(tiny_ckpt), CheckpointReader(out / "model")
    for i, block in enumerate(m.layers):
        wo_a, name = block.attn.wo_a, f"layers.{i}.attn.wo_a."
        assert isinstance(wo_a, TrainBlockDiagLinear) and wo_a.qat and wo_a.groups == m.cfg.o_groups
        w, s = after.get(name + "weight"), after.get(name + "scale")
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
        qw, qs = quant_fp8(wo_a.weight.detach())
        assert torch.equal(w.view(torch.uint8), qw.view(torch.uint8)) and torch.equal(s.view(torch.uint8),
                                                                                      qs.view(torch.uint8))
        assert not torch.equal(w.view(torch.uint8), before.get(name + "weight").view(torch.uint8)), name


def test_wo_a_trains_without_act_quant_on_its_fp8_values(tiny_ckpt):
    """prepare_full: wo_a's forward is the plain grouped product of its weight rounded to FP8 (QAT, as the other FP8
    weights), never of an act-quantised input (the reference has none on wo_a), and its weight gets a gradient."""
    m = prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.float32, progress=False), qat=True)
    wo_a = m.layers[1].attn.wo_a
    assert isinstance(wo_a, TrainBlockDiagLinear) and wo_a.weight.requires_grad and m.quant_emulation
    with torch.no_grad():
        wo_a.weight.add_(torch.randn(wo_a.weight.shape, generator=torch.Generator().manual_seed(3)) * 1e-3)
    x = torch.randn(2, 5, wo_a.groups, wo_a.in_features, generator=torch.Generator().manual_seed(4))
    y = wo_a(x.requires_grad_())
    rounded = storage_roundtrip(wo_a.weight, "fp8")
    assert not torch.equal(rounded, wo_a.weight)                      # the rounding is visible ...
    assert torch.equal(y, ops.block_diag_linear.twin(x.detach(), rounded, None, "plain"))   # ... and applied
    assert not torch.equal(y, ops.block_diag_linear.twin(fake_quant_fp8(x.detach(), 128), rounded, None, "plain"))
    y.square().sum().backward()
    assert wo_a.weight.grad is not None and wo_a.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_reexport_of_a_saved_checkpoint_is_exact(full_run, tmp_path):
    _, out = full_run
    m = prepare_full(dsv4.load_model(out / "model", dtype=torch.float32, progress=False), qat=True)
    write_checkpoint(export_state(m, m.cfg), m.cfg, tmp_path / "again")
    a, b = _values(out / "model"), _values(tmp_path / "again")
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_bf16_save_loads_and_generates(full_run):
    out = full_run[1]
    loaded = dsv4.load_model(out / "model-bf16", dtype=torch.float32, quant_emulation=False, progress=False)
    assert loaded.layers[0].attn.wq_a.fmt == "plain"
    llm = dsv4.LLM(str(out / "model-bf16"), device="cpu", max_num_seqs=1, progress=False)
    params = dsv4.SamplingParams(temperature=0.0, max_tokens=3)
    assert len(llm.generate([IDS[0].tolist()], params)[0].outputs[0].token_ids) == 3


def test_lora_adapters_save_merge_and_load(tiny_ckpt, tmp_path):
    m = prepare_lora(dsv4.load_model(tiny_ckpt, dtype=torch.float32, progress=False), rank=4)
    _train(m, tmp_path, lr=5e-2)
    assert any(p.abs().sum() > 0 for n, p in m.named_parameters() if n.endswith("lora_B"))
    save_adapters(m, tmp_path / "adapter", {"rank": 4, "alpha": 8.0, "targets": ["attn", "shared"],
                                            "base_model": str(tiny_ckpt)})
    merge_lora(tmp_path / "adapter", tmp_path / "merged-bf16", bf16=True)
    merge_lora(tmp_path / "adapter", tmp_path / "merged")
    base, bf16, merged = _values(tiny_ckpt), _values(tmp_path / "merged-bf16"), _values(tmp_path / "merged")
    lora = {n: mod for n, mod in m.named_modules() if isinstance(mod, LoRALinear)}
    assert len(lora) > 10
    for name, value in base.items():
        owner = name.removesuffix(".weight")
        if owner in lora:
            want = value + lora[owner].delta_weight().detach()
            torch.testing.assert_close(bf16[name], want.bfloat16().float(), rtol=0, atol=0)
            torch.testing.assert_close(merged[name], storage_roundtrip(want, "fp8"), rtol=0, atol=0)
            if not name.startswith("mtp."):                              # MTP is not trained without MTP loss
                assert not torch.equal(merged[name], value), f"{name}: the adapter changed nothing"
        else:
            assert torch.equal(merged[name], value), name
    raw, base_raw = CheckpointReader(tmp_path / "merged"), CheckpointReader(tiny_ckpt)
    for name in (n for n in base_raw.keys() if ".wo_a." in n):          # frozen and held FP8: its bytes copied
        assert torch.equal(raw.get(name).view(torch.uint8), base_raw.get(name).view(torch.uint8)), name
    for path in ("merged", "merged-bf16"):
        dsv4.load_model(tmp_path / path, dtype=torch.float32, progress=False)     # strict


def test_batched_qat_rounding_is_bit_identical_and_follows_weight_changes(tiny_ckpt):
    m = prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.float32, progress=False), qat=True)
    linears = [x for x in m.modules() if isinstance(x, TrainLinear) and x.qat]
    assert {x.fmt for x in linears} == {"fp8", "fp4"}
    alone = [x.roundtrip() for x in linears]                       # per weight, nothing kept
    assert refresh_qat(m) == len(linears)
    assert all(torch.equal(a, x.roundtrip()) and x.roundtrip() is x._roundtrip[2]
               for a, x in zip(alone, linears, strict=True))
    w = linears[0]
    with torch.no_grad():
        w.weight.mul_(3.0)                                          # an in-place change must not see the old rounding
    assert torch.equal(w.roundtrip(), storage_roundtrip(w.weight, w.fmt))
    assert not torch.equal(w.roundtrip(), alone[0])
    forget_qat(m)
    assert all(x._roundtrip is None for x in linears)


def test_trainer_steps_equal_with_and_without_batched_qat_rounding(tiny_ckpt, tmp_path, monkeypatch):
    import dsv4.train.loop as loop

    def params_after(tag):
        m = prepare_full(dsv4.load_model(tiny_ckpt, dtype=torch.float32, progress=False), qat=True)
        _train(m, tmp_path / tag, steps=2)
        return {n: p.detach().clone() for n, p in m.named_parameters()}

    batched = params_after("batched")
    monkeypatch.setattr(loop, "refresh_qat", lambda model: 0)
    alone = params_after("alone")
    assert batched.keys() == alone.keys() and all(torch.equal(batched[n], alone[n]) for n in batched)
