"""The computed checkpoint inventory against the official tiny checkpoint and the spec tables (§1.3, §5.2).

Nothing here allocates a weight: full-size inventories are plain dicts of shapes and take ~0.1 s each.
"""

from __future__ import annotations

import paths
import pytest
import torch
from safetensors import safe_open

from dsv4.checkpoint import TensorSpec, inventory
from dsv4.checkpoint.inventory import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS
from dsv4.config import ModelConfig, tiny_config

OFFICIAL_TINY = paths.OFFICIAL_TINY / "ckpt" / "model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def full():
    return {name: inventory(ModelConfig.preset(name)) for name in ("flash", "pro")}


def test_tiny_matches_official_checkpoint():
    with safe_open(OFFICIAL_TINY, framework="pt") as f:
        slices = {k: f.get_slice(k) for k in list(f.keys())}
        official = {k: (sl.get_dtype(), tuple(sl.get_shape())) for k, sl in slices.items()}
    ours = {k: (s.dtype, s.shape) for k, s in inventory(tiny_config(max_seq_len=4096)).items()}
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}


# Every row of spec §5.2, as (name, dtype, Flash shape, Pro shape). Layer choice: layer 0 is hash-routed in
# both; layer 2 is CSA (ratio 4) in both; layer 3 is HCA (ratio 128) and not hash-routed in both.
D_F, D_P = 4096, 7168
SPEC_5_2 = [
    ("embed.weight", "BF16", [129280, D_F], [129280, D_P]),
    ("head.weight", "BF16", [129280, D_F], [129280, D_P]),
    ("norm.weight", "BF16", [D_F], [D_P]),
    ("layers.3.attn_norm.weight", "BF16", [D_F], [D_P]),
    ("layers.3.ffn_norm.weight", "BF16", [D_F], [D_P]),
    ("mtp.0.enorm.weight", "BF16", [D_F], [D_P]),
    ("mtp.0.hnorm.weight", "BF16", [D_F], [D_P]),
    ("mtp.0.norm.weight", "BF16", [D_F], [D_P]),
    ("hc_head_fn", "F32", [4, 16384], [4, 28672]),
    ("hc_head_base", "F32", [4], [4]),
    ("hc_head_scale", "F32", [1], [1]),
    ("mtp.0.hc_head_fn", "F32", [4, 16384], [4, 28672]),
    ("layers.3.hc_attn_fn", "F32", [24, 16384], [24, 28672]),
    ("layers.3.hc_ffn_fn", "F32", [24, 16384], [24, 28672]),
    ("layers.3.hc_attn_base", "F32", [24], [24]),
    ("layers.3.hc_ffn_scale", "F32", [3], [3]),
    ("layers.3.attn.attn_sink", "F32", [64], [128]),
    ("layers.3.attn.wq_a.weight", "F8_E4M3", [1024, 4096], [1536, 7168]),
    ("layers.3.attn.wq_a.scale", "F8_E8M0", [8, 32], [12, 56]),
    ("layers.3.attn.q_norm.weight", "BF16", [1024], [1536]),
    ("layers.3.attn.wq_b.weight", "F8_E4M3", [32768, 1024], [65536, 1536]),
    ("layers.3.attn.wq_b.scale", "F8_E8M0", [256, 8], [512, 12]),
    ("layers.3.attn.wkv.weight", "F8_E4M3", [512, 4096], [512, 7168]),
    ("layers.3.attn.wkv.scale", "F8_E8M0", [4, 32], [4, 56]),
    ("layers.3.attn.kv_norm.weight", "BF16", [512], [512]),
    ("layers.3.attn.wo_a.weight", "F8_E4M3", [8192, 4096], [16384, 4096]),
    ("layers.3.attn.wo_a.scale", "F8_E8M0", [64, 32], [128, 32]),
    ("layers.3.attn.wo_b.weight", "F8_E4M3", [4096, 8192], [7168, 16384]),
    ("layers.3.attn.wo_b.scale", "F8_E8M0", [32, 64], [56, 128]),
    ("layers.2.attn.compressor.ape", "F32", [4, 1024], [4, 1024]),
    ("layers.3.attn.compressor.ape", "F32", [128, 512], [128, 512]),
    ("layers.2.attn.compressor.wkv.weight", "BF16", [1024, D_F], [1024, D_P]),
    ("layers.2.attn.compressor.wgate.weight", "BF16", [1024, D_F], [1024, D_P]),
    ("layers.3.attn.compressor.wkv.weight", "BF16", [512, D_F], [512, D_P]),
    ("layers.3.attn.compressor.wgate.weight", "BF16", [512, D_F], [512, D_P]),
    ("layers.3.attn.compressor.norm.weight", "BF16", [512], [512]),
    ("layers.2.attn.indexer.wq_b.weight", "F8_E4M3", [8192, 1024], [8192, 1536]),
    ("layers.2.attn.indexer.wq_b.scale", "F8_E8M0", [64, 8], [64, 12]),
    ("layers.2.attn.indexer.weights_proj.weight", "BF16", [64, D_F], [64, D_P]),
    ("layers.2.attn.indexer.compressor.ape", "F32", [4, 256], [4, 256]),
    ("layers.2.attn.indexer.compressor.wkv.weight", "BF16", [256, D_F], [256, D_P]),
    ("layers.2.attn.indexer.compressor.wgate.weight", "BF16", [256, D_F], [256, D_P]),
    ("layers.2.attn.indexer.compressor.norm.weight", "BF16", [128], [128]),
    ("layers.3.ffn.gate.weight", "BF16", [256, 4096], [384, 7168]),
    ("layers.3.ffn.gate.bias", "F32", [256], [384]),
    ("layers.0.ffn.gate.tid2eid", "I64", [129280, 6], [129280, 6]),
    ("layers.3.ffn.experts.7.w1.weight", "I8", [2048, 2048], [3072, 3584]),
    ("layers.3.ffn.experts.7.w3.weight", "I8", [2048, 2048], [3072, 3584]),
    ("layers.3.ffn.experts.7.w1.scale", "F8_E8M0", [2048, 128], [3072, 224]),
    ("layers.3.ffn.experts.7.w3.scale", "F8_E8M0", [2048, 128], [3072, 224]),
    ("layers.3.ffn.experts.7.w2.weight", "I8", [4096, 1024], [7168, 1536]),
    ("layers.3.ffn.experts.7.w2.scale", "F8_E8M0", [4096, 64], [7168, 96]),
    ("layers.3.ffn.shared_experts.w1.weight", "F8_E4M3", [2048, 4096], [3072, 7168]),
    ("layers.3.ffn.shared_experts.w3.scale", "F8_E8M0", [16, 32], [24, 56]),
    ("layers.3.ffn.shared_experts.w2.weight", "F8_E4M3", [4096, 2048], [7168, 3072]),
    ("layers.3.ffn.shared_experts.w2.scale", "F8_E8M0", [32, 16], [56, 24]),
    ("mtp.0.e_proj.weight", "F8_E4M3", [4096, 4096], [7168, 7168]),
    ("mtp.0.e_proj.scale", "F8_E8M0", [32, 32], [56, 56]),
    ("mtp.0.h_proj.weight", "F8_E4M3", [4096, 4096], [7168, 7168]),
    ("mtp.0.h_proj.scale", "F8_E8M0", [32, 32], [56, 56]),
]


@pytest.mark.parametrize("model", ["flash", "pro"])
@pytest.mark.parametrize("name, dtype, flash_shape, pro_shape", SPEC_5_2, ids=[r[0] for r in SPEC_5_2])
def test_spec_table_row(full, model, name, dtype, flash_shape, pro_shape):
    shape = flash_shape if model == "flash" else pro_shape
    assert full[model][name] == TensorSpec(tuple(shape), dtype)


def test_layer_specific_tensors(full):
    flash, pro = full["flash"], full["pro"]
    assert "layers.0.attn.compressor.ape" not in flash and "layers.0.attn.compressor.ape" in pro  # Pro 0 is HCA
    assert "layers.3.attn.indexer.wq_b.weight" not in flash  # HCA layers have no indexer
    assert "layers.2.ffn.gate.tid2eid" in flash and "layers.3.ffn.gate.tid2eid" not in flash
    assert "mtp.0.ffn.gate.bias" in flash and "mtp.0.attn.compressor.ape" not in flash
    assert not any(k.startswith("mtp.") and ("emb" in k or k.endswith("head.weight")) for k in flash)


def _expected_count(cfg: ModelConfig) -> int:
    # Per block: hc 6 + 2 norms + attention 13 (5 quantised linears x2, q/kv norm, sink) + gate 2
    # + 3 linears x2 per expert (routed + shared); compressor 4 per compressed layer; indexer 7 per CSA layer.
    block = 6 + 2 + 13 + 2 + 6 * (cfg.n_routed_experts + 1)
    ratios = cfg.compress_ratios[: cfg.n_layers]
    layers = cfg.n_layers * block + 4 * sum(r > 0 for r in ratios) + 7 * sum(r == 4 for r in ratios)
    mtp = block + 2 + 4 + 3 + 1  # + enorm/hnorm, e/h_proj, hc_head, norm
    return layers + mtp + 6  # + embed, head, norm, hc_head x3


def test_tensor_counts(full):
    assert len(full["flash"]) == _expected_count(ModelConfig.preset("flash")) == 69187
    assert len(full["pro"]) == _expected_count(ModelConfig.preset("pro")) == 145116  # spec §5.2


def _params(specs: dict[str, TensorSpec], mtp: bool) -> float:
    # FP4 packs two weights per I8 byte. Scales are quantisation metadata, not parameters: counting them
    # would give Flash 293.0B, contradicting the 284.3B of spec §1.3.
    return sum(s.numel * (2 if s.dtype == "I8" else 1) for k, s in specs.items()
               if k.startswith("mtp.") == mtp and not k.endswith(".scale")) / 1e9


@pytest.mark.parametrize("model, main, mtp", [("flash", 284.3, 6.6), ("pro", 1573.0, 25.8)])
def test_parameter_counts(full, model, main, mtp):
    # Spec §1.3 prints these rounded to 0.1B, so the exact count must lie within half that unit.
    assert abs(_params(full[model], mtp=False) - main) <= 0.05
    assert abs(_params(full[model], mtp=True) - mtp) <= 0.05


def test_total_bytes(full):
    assert sum(s.nbytes for s in full["flash"].values()) == 159_609_485_896
    pro = sum(s.nbytes for s in full["pro"].values())
    assert pro == 864_704_792_696
    assert round(pro / 2**30) == 805  # spec §5.2 "~805 GB" (it means GiB)


def test_forward_order(full):
    names = list(full["flash"])
    assert names[0] == "embed.weight"
    assert names[-5:] == ["hc_head_fn", "hc_head_base", "hc_head_scale", "norm.weight", "head.weight"]
    layer_ids = [int(n.split(".")[1]) for n in names if n.startswith("layers.")]
    assert layer_ids == sorted(layer_ids)
    first_mtp = next(i for i, n in enumerate(names) if n.startswith("mtp."))
    assert all(not n.startswith("layers.") for n in names[first_mtp:])


def test_storage_formats():
    bf16 = inventory(tiny_config(dtype="bf16", expert_dtype=None))
    assert not any(k.endswith(".scale") for k in bf16)
    assert bf16["layers.0.attn.wo_a.weight"] == TensorSpec((128, 256), "BF16")
    assert bf16["layers.0.ffn.experts.0.w2.weight"] == TensorSpec((256, 128), "BF16")
    fp8 = inventory(tiny_config(expert_dtype="fp8"))
    assert fp8["layers.0.ffn.experts.0.w2.weight"] == TensorSpec((256, 128), "F8_E4M3")
    assert fp8["layers.0.ffn.experts.0.w2.scale"] == TensorSpec((2, 1), "F8_E8M0")
    mixed = inventory(tiny_config(dtype="bf16", expert_dtype="fp4"))
    assert mixed["layers.0.ffn.experts.0.w1.weight"] == TensorSpec((128, 128), "I8")
    assert "layers.0.ffn.shared_experts.w1.scale" not in mixed
    same = inventory(tiny_config(expert_dtype=None))  # None = same as dtype (fp8)
    assert same["layers.0.ffn.experts.0.w1.scale"] == TensorSpec((1, 2), "F8_E8M0")


def test_tensor_spec():
    spec = TensorSpec([3, 4], "F8_E8M0")
    assert spec.shape == (3, 4) and spec.nbytes == 12 and spec.torch_dtype == torch.float8_e8m0fnu
    assert TensorSpec((2, 5), "I64").nbytes == 80 and str(TensorSpec((2,), "BF16")) == "BF16[2]"
    with pytest.raises(ValueError, match="F4"):
        TensorSpec((1,), "F4")
    assert SAFETENSORS_DTYPES["I8"] == torch.int8
    assert all(TORCH_TO_SAFETENSORS[t] == s for s, t in SAFETENSORS_DTYPES.items())


# ---------------------------------------------------------------------------------------------- every tensor
def _fp8(name: str, out_f: int, in_f: int) -> dict:
    return {f"{name}.weight": ("F8_E4M3", [out_f, in_f]), f"{name}.scale": ("F8_E8M0", [out_f // 128, in_f // 128])}


def _spec_5(hf: dict) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of the checkpoint written out from spec §5.1 (names) and §5.2 (dtypes, shapes), with the sizes
    read from the official config.json: independent of `inventory`, and of ModelConfig."""
    d, h, ql, n_exp = hf["hidden_size"], hf["num_attention_heads"], hf["q_lora_rank"], hf["n_routed_experts"]
    inter, groups, rank, vocab = hf["moe_intermediate_size"], hf["o_groups"], hf["o_lora_rank"], hf["vocab_size"]
    out = {"embed.weight": ("BF16", [vocab, d]), "head.weight": ("BF16", [vocab, d]), "norm.weight": ("BF16", [d]),
           "hc_head_fn": ("F32", [4, 4 * d]), "hc_head_base": ("F32", [4]), "hc_head_scale": ("F32", [1])}
    blocks = [(f"layers.{i}.", r, i < hf["num_hash_layers"]) for i, r in enumerate(hf["compress_ratios"][:-1])]
    for p, ratio, hashed in [*blocks, ("mtp.0.", hf["compress_ratios"][-1], False)]:
        out |= {p + "attn_norm.weight": ("BF16", [d]), p + "ffn_norm.weight": ("BF16", [d])}
        for hc in ("hc_attn", "hc_ffn"):
            out |= {f"{p}{hc}_fn": ("F32", [24, 4 * d]), f"{p}{hc}_base": ("F32", [24]), f"{p}{hc}_scale": ("F32", [3])}
        a = p + "attn."
        out |= {a + "attn_sink": ("F32", [h]), a + "q_norm.weight": ("BF16", [ql]),
                a + "kv_norm.weight": ("BF16", [512])}
        out |= _fp8(a + "wq_a", ql, d) | _fp8(a + "wq_b", h * 512, ql) | _fp8(a + "wkv", 512, d)
        out |= _fp8(a + "wo_a", groups * rank, h * 512 // groups) | _fp8(a + "wo_b", d, groups * rank)
        compressors = ([(a + "compressor.", ratio, 512)] if ratio else []) + (
            [(a + "indexer.compressor.", 4, 128)] if ratio == 4 else [])
        for c, r, width in compressors:
            coff = 2 if r == 4 else 1
            out |= {c + "ape": ("F32", [r, coff * width]), c + "norm.weight": ("BF16", [width]),
                    c + "wkv.weight": ("BF16", [coff * width, d]), c + "wgate.weight": ("BF16", [coff * width, d])}
        if ratio == 4:
            out |= _fp8(a + "indexer.wq_b", 64 * 128, ql) | {a + "indexer.weights_proj.weight": ("BF16", [64, d])}
        f = p + "ffn."
        out[f + "gate.weight"] = ("BF16", [n_exp, d])
        out |= {f + "gate.tid2eid": ("I64", [vocab, 6])} if hashed else {f + "gate.bias": ("F32", [n_exp])}
        for e in range(n_exp):
            for w, (o, i) in {"w1": (inter, d), "w2": (d, inter), "w3": (inter, d)}.items():
                out |= {f"{f}experts.{e}.{w}.weight": ("I8", [o, i // 2]),
                        f"{f}experts.{e}.{w}.scale": ("F8_E8M0", [o, i // 32])}
        for w, (o, i) in {"w1": (inter, d), "w2": (d, inter), "w3": (inter, d)}.items():
            out |= _fp8(f"{f}shared_experts.{w}", o, i)
    out |= {"mtp.0.enorm.weight": ("BF16", [d]), "mtp.0.hnorm.weight": ("BF16", [d]),
            "mtp.0.norm.weight": ("BF16", [d]), "mtp.0.hc_head_fn": ("F32", [4, 4 * d]),
            "mtp.0.hc_head_base": ("F32", [4]), "mtp.0.hc_head_scale": ("F32", [1])}
    return out | _fp8("mtp.0.e_proj", d, d) | _fp8("mtp.0.h_proj", d, d)


@pytest.mark.parametrize("model", ["flash", "pro"])
def test_every_tensor_of_every_layer_follows_the_spec(full, model):
    # The table rows above sample one layer of each kind; this checks all 69,187 / 145,116 entries.
    import json

    expected = _spec_5(json.loads((paths.REFERENCE / model / "config.json").read_text()))
    ours = {k: (s.dtype, list(s.shape)) for k, s in full[model].items()}
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


@pytest.mark.parametrize("model", ["flash", "pro"])
def test_full_size_shard_plan(full, model):
    # Spec §5.2 "MTP in the last" shard: the plan for a full-size synthetic checkpoint, computed without writing.
    # (The shard the main model ends in may start the MTP block; every later shard is MTP only.)
    from dsv4.checkpoint.synth import plan_shards

    shards = plan_shards(full[model], 5 * 2**30)
    where = {n: i for i, groups in enumerate(shards) for g in groups for n in g}
    assert sorted(where) == sorted(full[model])
    first_mtp = min(i for n, i in where.items() if n.startswith("mtp."))
    assert all(i <= first_mtp for n, i in where.items() if not n.startswith("mtp."))
    assert where["mtp.0.norm.weight"] == len(shards) - 1
    assert all(sum(full[model][n].nbytes for g in groups for n in g) <= 5 * 2**30 for groups in shards)
    assert all(where[n[: -len("scale")] + "weight"] == i for n, i in where.items() if n.endswith(".scale"))
