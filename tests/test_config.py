"""ModelConfig: both official file forms, the derived layer schedule (spec §1), and strict validation."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import paths
import pytest

import dsv4
from dsv4.config import REQUIRED, ConfigError, ModelConfig, tiny_config

MODELS = ("flash", "pro")


def _official(model: str, form: str) -> dict:
    return json.loads((paths.REFERENCE / model / form).read_text())


# ---------------------------------------------------------------------------------------------- official files
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("form", ["config.json", "inference_config.json"])
def test_official_file_equals_preset(model, form):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of the official files is known
        from_file = ModelConfig.from_file(paths.REFERENCE / model / form)
        from_dict = ModelConfig.from_dict(_official(model, form))
    assert from_file == from_dict == ModelConfig.preset(model)


COMMON = dict(vocab_size=129280, head_dim=512, rope_head_dim=64, o_lora_rank=1024, window_size=128,
              rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0, original_seq_len=65536,
              beta_fast=32, beta_slow=1, index_n_heads=64, index_head_dim=128, n_shared_experts=1,
              n_activated_experts=6, score_func="sqrtsoftplus", n_hash_layers=3, swiglu_limit=10.0, hc_mult=4,
              hc_sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6, n_mtp_layers=1, bos_token_id=0, eos_token_id=1,
              dtype="fp8", expert_dtype="fp4", scale_fmt="ue8m0", max_seq_len=4096)
SPEC_1_1 = {
    "flash": dict(COMMON, dim=4096, n_layers=43, n_heads=64, q_lora_rank=1024, o_groups=8, index_topk=512,
                  n_routed_experts=256, moe_inter_dim=2048, route_scale=1.5),
    "pro": dict(COMMON, dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16, index_topk=1024,
                n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5),
}


@pytest.mark.parametrize("model", MODELS)
def test_preset_values_follow_spec(model):
    cfg = ModelConfig.preset(model)
    assert {k: getattr(cfg, k) for k in SPEC_1_1[model]} == SPEC_1_1[model]
    assert len(cfg.compress_ratios) == cfg.n_layers + 1
    assert cfg.q_heads_per_group == 8 and cfg.nope_head_dim == 448 and cfg.hc_mix == 24


@pytest.mark.parametrize("model", MODELS)
def test_written_config_json_agrees_with_the_official_one(model):
    official, ours = _official(model, "config.json"), ModelConfig.preset(model).to_hf()
    assert {k: ours.get(k) for k in official if k != "transformers_version"} == {
        k: v for k, v in official.items() if k != "transformers_version"}


@pytest.mark.parametrize("cfg", [ModelConfig.preset("flash"), ModelConfig.preset("pro"), tiny_config(),
                                 tiny_config(dtype="bf16", expert_dtype=None, max_seq_len=4096)],
                         ids=["flash", "pro", "tiny", "tiny-bf16"])
def test_round_trip_through_both_forms(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelConfig.from_dict(cfg.to_inference()) == cfg
        # config.json carries no max_seq_len: it is a runtime choice (reference default 4096).
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_hf()))) == cfg.replace(max_seq_len=4096)


# ---------------------------------------------------------------------------------------------- layer schedule
def _ids(cfg: ModelConfig, kind: str) -> list[int]:
    return [i for i, k in enumerate(cfg.layer_kinds) if k == kind]


def test_flash_schedule():
    cfg = ModelConfig.preset("flash")
    assert _ids(cfg, "sliding") == [0, 1]
    assert _ids(cfg, "csa") == list(range(2, 43, 2)) and len(_ids(cfg, "csa")) == 21
    assert _ids(cfg, "hca") == list(range(3, 42, 2)) and len(_ids(cfg, "hca")) == 20
    assert cfg.layer_kind(43) == "sliding"  # MTP


def test_pro_schedule():
    cfg = ModelConfig.preset("pro")
    assert _ids(cfg, "sliding") == []  # Pro has no sliding-only main layer
    assert _ids(cfg, "csa") == list(range(2, 61, 2)) and len(_ids(cfg, "csa")) == 30
    assert _ids(cfg, "hca") == [0, 1, *range(3, 60, 2)] and len(_ids(cfg, "hca")) == 31
    assert cfg.layer_kind(61) == "sliding"  # MTP


@pytest.mark.parametrize("model", MODELS)
def test_hash_layers_and_mtp(model):
    cfg = ModelConfig.preset(model)
    assert [i for i in range(cfg.n_layers + cfg.n_mtp_layers) if cfg.is_hash_layer(i)] == [0, 1, 2]
    assert not cfg.is_hash_layer(cfg.n_layers)  # MTP is never hash-routed
    assert not cfg.is_hash_layer(-1)
    with pytest.raises(IndexError):
        cfg.layer_kind(cfg.n_layers + cfg.n_mtp_layers)
    with pytest.raises(IndexError):
        cfg.layer_kind(-1)  # not Python's "last element"


def test_tiny_config_has_every_layer_type():
    cfg = tiny_config()
    assert cfg.layer_kinds == ("sliding", "csa", "hca", "csa") and cfg.layer_kind(4) == "sliding"
    assert [cfg.is_hash_layer(i) for i in range(5)] == [True, True, False, False, False]


# ---------------------------------------------------------------------------------------------- immutability
def test_frozen():
    cfg = ModelConfig.preset("flash")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 1024
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.compress_ratios = ()
    assert cfg.dim == 4096
    listed = tiny_config(compress_ratios=[0, 4, 128, 4, 0])
    assert listed.compress_ratios == (0, 4, 128, 4, 0) and isinstance(listed.compress_ratios, tuple)
    assert {cfg: 1, ModelConfig.preset("flash"): 2} == {cfg: 2}  # hashable, equal by value


def test_replace_validates():
    cfg = tiny_config()
    assert cfg.replace(index_topk=8).index_topk == 8 and cfg.index_topk == 4
    with pytest.raises(ConfigError, match="n_heads=3"):
        cfg.replace(n_heads=3)


def test_float_fields_are_floats():
    cfg = tiny_config(rope_theta=10000, route_scale=2)
    assert type(cfg.rope_theta) is float and type(cfg.route_scale) is float


# ---------------------------------------------------------------------------------------------- truncated
def test_truncated_flash():
    cfg = ModelConfig.preset("flash")
    four = cfg.truncated(4)
    assert four.n_layers == 4 and four.compress_ratios == (0, 0, 4, 128, 0) and four.n_hash_layers == 3
    assert four.layer_kinds == cfg.layer_kinds[:4] and four.layer_kind(4) == "sliding"
    two = cfg.truncated(2)
    assert two.compress_ratios == (0, 0, 0) and two.n_hash_layers == 2
    untouched = {f.name for f in dataclasses.fields(cfg)} - {"n_layers", "compress_ratios", "n_hash_layers"}
    assert all(getattr(two, k) == getattr(cfg, k) for k in untouched)
    assert cfg.truncated(43) == cfg


def test_truncated_pro():
    one = ModelConfig.preset("pro").truncated(1)
    assert one.compress_ratios == (128, 0) and one.n_hash_layers == 1 and one.layer_kinds == ("hca",)


@pytest.mark.parametrize("n", [0, -1, 44])
def test_truncated_out_of_range(n):
    with pytest.raises(ConfigError, match=rf"n_layers={n}: truncated\(\) keeps 1\.\.43"):
        ModelConfig.preset("flash").truncated(n)


# ---------------------------------------------------------------------------------------------- validation
# (changes to tiny_config, text the message must contain). Each names the offending field.
BAD = [
    (dict(compress_ratios=(0, 4, 128, 0)), "compress_ratios has 4 entries, expected n_layers + n_mtp_layers = 5"),
    (dict(compress_ratios=(0, 4, 8, 4, 0)), "compress_ratios may only contain 0, 4 and 128, got [8]"),
    (dict(compress_ratios=(0, 4, 128, 4, 4)), "compress_ratios: the MTP entries"),
    (dict(n_mtp_layers=0), "compress_ratios has 5 entries, expected n_layers + n_mtp_layers = 4"),
    (dict(n_heads=3), "n_heads=3 is not divisible by o_groups=2"),
    (dict(rope_head_dim=63), "rope_head_dim=63 must be even"),
    (dict(rope_head_dim=128), "rope_head_dim=128 must be even and smaller than head_dim=128"),
    (dict(head_dim=160), "head_dim - rope_head_dim must be a multiple of 64"),
    (dict(index_head_dim=96), "index_head_dim=96 must be a power of two"),
    (dict(index_head_dim=64), "index_head_dim=64 must exceed rope_head_dim=64"),
    (dict(n_activated_experts=9), "n_activated_experts=9 exceeds n_routed_experts=8"),
    (dict(n_activated_experts=0), "n_activated_experts=0 must be >= 1"),
    (dict(n_shared_experts=2), "n_shared_experts must be 1"),
    (dict(n_hash_layers=5), "n_hash_layers=5 exceeds n_layers=4"),
    (dict(n_hash_layers=-1), "n_hash_layers=-1 must be >= 0"),
    (dict(dim=320), "dim=320 must be a multiple of 128"),
    (dict(dim=-256), "dim=-256 must be >= 1"),  # -256 % 128 == 0: the block check alone let it through
    (dict(dim=0), "dim=0 must be >= 1"),
    (dict(q_lora_rank=192), "q_lora_rank=192 must be a multiple of 128"),
    (dict(moe_inter_dim=96), "moe_inter_dim=96 must be a multiple of 128"),
    (dict(o_lora_rank=48), "o_groups*o_lora_rank=96 must be a multiple of 128"),
    (dict(o_groups=0), "o_groups=0 must be >= 1"),  # was a ZeroDivisionError
    (dict(vocab_size=0), "vocab_size=0 must be >= 1"),
    (dict(n_layers=0, compress_ratios=(0,)), "n_layers=0 must be >= 1"),
    (dict(n_mtp_layers=-1), "n_mtp_layers=-1 must be >= 0"),
    (dict(n_routed_experts=-8), "n_routed_experts=-8 must be >= 1"),
    (dict(head_dim=-128), "head_dim=-128 must be >= 1"),
    (dict(index_n_heads=0), "index_n_heads=0 must be >= 1"),
    (dict(index_topk=0), "index_topk=0 must be >= 1"),
    (dict(window_size=0), "window_size=0 must be >= 1"),
    (dict(max_seq_len=0), "max_seq_len=0 must be >= 1"),
    (dict(hc_mult=0), "hc_mult=0 must be >= 1"),
    (dict(hc_sinkhorn_iters=0), "hc_sinkhorn_iters=0 must be >= 1"),
    (dict(beta_slow=0), "beta_slow=0 must be >= 1"),
    (dict(original_seq_len=-1), "original_seq_len=-1 must be >= 0"),
    (dict(rope_theta=1.0), "rope_theta=1.0 must be a finite number > 1"),
    (dict(compress_rope_theta=float("nan")), "compress_rope_theta=nan must be a finite number > 1"),
    (dict(rope_factor=0), "rope_factor=0.0 must be a finite number > 0"),
    (dict(route_scale=-1.5), "route_scale=-1.5 must be a finite number > 0"),
    (dict(hc_eps=0.0), "hc_eps=0.0 must be a finite number > 0"),
    (dict(norm_eps=float("inf")), "norm_eps=inf must be a finite number > 0"),
    (dict(swiglu_limit=-1), "swiglu_limit=-1.0 must be >= 0"),
    (dict(bos_token_id=512), "bos_token_id=512 is outside the vocabulary (vocab_size=512)"),
    (dict(eos_token_id=-1), "eos_token_id=-1 must be >= 0"),
    (dict(score_func="relu"), "unknown score_func 'relu'"),
    (dict(dtype="fp16"), "dtype must be 'fp8' or 'bf16', got 'fp16'"),
    (dict(expert_dtype="int4"), "expert_dtype must be 'fp4', 'fp8' or None, got 'int4'"),
    (dict(scale_fmt="fp32"), "scale_fmt='fp32'"),
    # Wrong types are reported as such, never as a TypeError from deep inside a check.
    (dict(dim="256"), "dim='256' has the wrong type (expected int)"),
    (dict(n_layers=4.0), "n_layers=4.0 has the wrong type (expected int)"),
    (dict(n_heads=True), "n_heads=True has the wrong type"),
    (dict(rope_theta="1e4"), "rope_theta='1e4' has the wrong type (expected float)"),
    (dict(compress_ratios=(0, "4", 128, 4, 0)), "compress_ratios=(0, '4', 128, 4, 0) has the wrong type"),
    (dict(compress_ratios=5), "compress_ratios=5 has the wrong type"),
    (dict(scale_fmt=None), "scale_fmt=None has the wrong type (expected str)"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[next(iter(c)) + "=" + repr(v)[:20] for c, _ in BAD
                                                        for v in [next(iter(c.values()))]])
def test_invalid_config_names_the_field(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_config(**changes)


def test_every_problem_in_one_error():
    with pytest.raises(ConfigError) as err:
        tiny_config(n_heads=3, q_lora_rank=192, n_hash_layers=9, score_func="x")
    msg = str(err.value)
    assert msg.startswith("invalid DeepSeek-V4 config: ") and "\n" not in msg
    for part in ("n_heads=3", "q_lora_rank=192", "n_hash_layers=9", "score_func 'x'"):
        assert part in msg


def test_config_error_type():
    assert issubclass(ConfigError, ValueError) and dsv4.ConfigError is ConfigError


def test_large_index_topk_is_allowed():
    # The reference takes top-min(index_topk, available entries), so a top-k above what max_seq_len can ever
    # produce is harmless (Pro: 1024 = 4096 // 4 exactly) and is deliberately not an error.
    assert tiny_config(index_topk=10_000).index_topk == 10_000


# ---------------------------------------------------------------------------------------------- file keys
# Keys whose absence is an error, as each file spells them; every other key of the official files may be
# left out (an eps, the MTP depth, token ids, metadata: defaults equal to the official values).
HF_REQUIRED = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
               "qk_rope_head_dim", "q_lora_rank", "o_lora_rank", "o_groups", "sliding_window", "compress_ratios",
               "rope_theta", "compress_rope_theta", "rope_scaling", "index_n_heads", "index_head_dim", "index_topk",
               "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
               "scoring_func", "routed_scaling_factor", "num_hash_layers", "swiglu_limit", "hc_mult",
               "hc_sinkhorn_iters"}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("form", ["config.json", "inference_config.json"])
def test_missing_keys(model, form):
    official, preset = _official(model, form), ModelConfig.preset(model)
    required = HF_REQUIRED if form == "config.json" else set(REQUIRED)
    assert required <= set(official)
    for key in official:
        d = {k: v for k, v in official.items() if k != key}
        if key in required:
            with pytest.raises(ConfigError, match=r"config is missing required keys: .*" + re.escape(key)):
                ModelConfig.from_dict(d)
        elif key == "quantization_config":  # none = an unquantised (bf16) checkpoint
            assert ModelConfig.from_dict(d) == preset.replace(dtype="bf16")
        else:  # e.g. expert_dtype: older copies of Pro's config.json lack it, its experts are FP4 (spec §10)
            assert ModelConfig.from_dict(d) == preset, key


def test_missing_keys_are_all_named():
    d = {k: v for k, v in _official("flash", "config.json").items()
         if k not in ("hidden_size", "routed_scaling_factor", "rope_scaling")}
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(d)
    assert str(err.value) == ("config is missing required keys: hidden_size, rope_scaling.factor, "
                              "rope_scaling.original_max_position_embeddings, rope_scaling.beta_fast, "
                              "rope_scaling.beta_slow, routed_scaling_factor")


@pytest.mark.parametrize("form, extra, named", [
    ("config.json", {"engram_layers": [3]}, "engram_layers"),
    ("config.json", {"dim": 8192}, "dim"),  # a reference-form name in an HF file is not read
    ("inference_config.json", {"kv_source_layer_ids": [0]}, "kv_source_layer_ids"),
    ("inference_config.json", {"n_layer": 3}, "n_layer"),
])
def test_unknown_keys_warn_and_are_ignored(form, extra, named):
    label = {"config.json": "config.json", "inference_config.json": "inference/config.json"}[form]
    with pytest.warns(UserWarning, match=rf"unknown to DeepSeek-V4's {re.escape(label)}: {named}$"):
        cfg = ModelConfig.from_dict(_official("flash", form) | extra)
    assert cfg == ModelConfig.preset("flash")


def test_unknown_rope_scaling_key_warns():
    d = _official("flash", "config.json")
    d["rope_scaling"] = d["rope_scaling"] | {"mscale": 1.0}  # V3's YaRN mscale; V4 has none (spec §2.4)
    with pytest.warns(UserWarning, match=r"rope_scaling\.mscale"):
        assert ModelConfig.from_dict(d) == ModelConfig.preset("flash")


def test_metadata_keys_are_ignored_silently():
    # transformers 5 writes the torch dtype as "dtype": it must not be taken for the reference's storage switch.
    hf = _official("flash", "config.json") | {"dtype": "bfloat16", "_name_or_path": "x", "pad_token_id": 1}
    ref = _official("flash", "inference_config.json") | {"max_batch_size": 4, "scale_dtype": "fp8"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelConfig.from_dict(hf) == ModelConfig.from_dict(ref) == ModelConfig.preset("flash")


@pytest.mark.parametrize("key, value", [("num_key_value_heads", 8), ("attention_bias", True),
                                        ("tie_word_embeddings", True), ("hidden_act", "gelu"),
                                        ("norm_topk_prob", False), ("model_type", "deepseek_v3")])
def test_hf_keys_with_one_valid_value(key, value):
    with pytest.raises(ConfigError, match=rf"{key}={re.escape(repr(value))} is not supported"):
        ModelConfig.from_dict(_official("flash", "config.json") | {key: value})


@pytest.mark.parametrize("key, value, message", [
    ("rope_scaling", {"type": "linear", "factor": 2}, "rope_scaling must be a YaRN object"),
    ("rope_scaling", 16, "rope_scaling must be a YaRN object"),
    ("quantization_config", {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]},
     "unsupported quantization_config"),
    ("quantization_config", {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]},
     "unsupported quantization_config"),
    ("hidden_size", "4096", "dim='4096' has the wrong type"),
])
def test_bad_hf_values(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict(_official("flash", "config.json") | {key: value})


def test_unsupported_scale_dtype():
    with pytest.raises(ConfigError, match="scale_dtype 'fp32' is not supported"):
        ModelConfig.from_dict(_official("flash", "inference_config.json") | {"scale_dtype": "fp32"})


# ---------------------------------------------------------------------------------------------- files
def test_from_file_locations(tmp_path):
    cfg = tiny_config()
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "config.json").write_text(json.dumps(cfg.to_inference()))
    assert ModelConfig.from_file(tmp_path) == cfg  # a directory with only inference/config.json
    (tmp_path / "config.json").write_text(json.dumps(cfg.replace(max_seq_len=4096).to_hf()))
    assert ModelConfig.from_file(tmp_path).max_seq_len == 4096  # config.json wins
    assert ModelConfig.from_file(tmp_path / "config.json") == ModelConfig.from_file(tmp_path)


def test_from_file_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json in checkpoint directory"):
        ModelConfig.from_file(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no config file at"):
        ModelConfig.from_file(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"bad\.json is not a JSON config file"):
        ModelConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        ModelConfig.from_file(tmp_path / "list.json")
    (tmp_path / "heads.json").write_text(json.dumps(tiny_config().to_hf() | {"num_attention_heads": 3}))
    with pytest.raises(ConfigError, match=r"heads\.json: invalid DeepSeek-V4 config: n_heads=3"):
        ModelConfig.from_file(tmp_path / "heads.json")  # the message names the file and the field


def test_presets_and_resolve(tmp_path):
    assert ModelConfig.resolve("pro") == ModelConfig.preset("pro")
    assert ModelConfig.preset("flash", max_seq_len=8192).max_seq_len == 8192
    (tmp_path / "c.json").write_text(json.dumps(tiny_config().to_inference()))
    assert ModelConfig.resolve(str(tmp_path / "c.json")) == tiny_config()
    with pytest.raises(ConfigError, match="unknown preset 'v3'"):
        ModelConfig.preset("v3")
    with pytest.raises(FileNotFoundError, match="not a preset: flash, pro"):
        ModelConfig.resolve("flsh")
