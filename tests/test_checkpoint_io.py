"""Synthesising, reading and validating official-format checkpoints at tiny size."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import paths
import pytest
import torch
from safetensors.torch import save_file

from dsv4.checkpoint import CheckpointError, CheckpointReader, check_inventory, inventory, synthesize
from dsv4.checkpoint.reader import INDEX_NAME
from dsv4.checkpoint.synth import write_safetensors
from dsv4.config import ModelConfig, tiny_config
from dsv4.quant import dequant_fp4, dequant_fp8

OFFICIAL_TINY = paths.OFFICIAL_TINY / "ckpt"
CFG = tiny_config()


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return synthesize(CFG, tmp_path_factory.mktemp("single"), seed=0, progress=False)


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Path:
    return synthesize(CFG, tmp_path_factory.mktemp("multi"), seed=0, shard_bytes=2**20, progress=False)


@pytest.fixture(scope="module")
def tensors(single) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(single)
    return {k: reader.get(k) for k in reader}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# ---------------------------------------------------------------------------------------------- synthesis
def test_synthesized_checkpoints_pass_inventory(single, multi):
    for path in (single, multi):
        check_inventory(CheckpointReader(path), CFG)


def test_sharding_does_not_change_values(single, multi, tensors):
    one, many = CheckpointReader(single), CheckpointReader(multi)
    assert len(one.files) == 1 and len(many.files) > 3
    assert one.keys() == many.keys()
    for name in many:
        assert torch.equal(_bits(many.get(name)), _bits(tensors[name])), name


def test_shard_layout_and_index(multi):
    index = json.loads((multi / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    specs = inventory(CFG)
    assert sorted(weight_map) == sorted(specs)
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs.values())
    files = sorted(set(weight_map.values()))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sum(_data_bytes(multi / f) for f in files) == index["metadata"]["total_size"]
    # MTP tensors come after every main-model tensor, i.e. in the last shard(s).
    last_main = max(files.index(f) for k, f in weight_map.items() if not k.startswith("mtp."))
    assert min(files.index(f) for k, f in weight_map.items() if k.startswith("mtp.")) >= last_main
    assert files.index(weight_map["mtp.0.norm.weight"]) == n - 1


def _data_bytes(file: Path) -> int:
    raw = file.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8 : 8 + size])["__metadata__"] == {"format": "pt"}
    return len(raw) - 8 - size


def test_header_is_byte_identical_to_official(single):
    # Same names, dtypes, shapes, data layout and JSON formatting as the official tiny file.
    ours = (single / "model-00001-of-00001.safetensors").read_bytes()
    official = (OFFICIAL_TINY / "model-00001-of-00001.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", official[:8])
    assert ours[: 8 + size] == official[: 8 + size] and len(ours) == len(official)


def test_configs_round_trip(single):
    assert ModelConfig.from_file(single / "config.json") == CFG.replace(max_seq_len=ModelConfig.max_seq_len)
    assert ModelConfig.from_file(single / "inference" / "config.json") == CFG


def test_determinism_by_seed(tmp_path, tensors):
    other = CheckpointReader(synthesize(CFG, tmp_path, seed=1, progress=False))
    for name in ("embed.weight", "layers.1.attn.wq_b.weight", "layers.0.ffn.gate.tid2eid"):
        assert not torch.equal(_bits(other.get(name)), _bits(tensors[name])), name


def test_writer_matches_safetensors_serializer(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ts = {"b.w": torch.randn(5, 3, generator=gen).to(torch.float8_e4m3fn), "a": torch.arange(7),
          "c": torch.randn(4, generator=gen).bfloat16(), "d": torch.randn(2, 2, generator=gen),
          "e": torch.ones(3, 1).to(torch.float8_e8m0fnu), "f": torch.ones(9, dtype=torch.int8)}
    save_file(ts, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    specs = {k: CheckpointReader(tmp_path / "ref.safetensors").spec(k) for k in ts}
    chunks = [(k, 0, t) for k, t in ts.items() if k != "d"] + [("d", 1, ts["d"][1:]), ("d", 0, ts["d"][:1])]
    write_safetensors(tmp_path / "ours.safetensors", specs, chunks)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------- values
def _std_ok(x: torch.Tensor, want: float, rel: float) -> bool:
    return abs(x.float().std().item() / want - 1) < rel


def test_value_distributions(tensors):
    d, inter = CFG.dim, CFG.moe_inter_dim
    t = tensors
    # FP8 128x128 blocks keep the std within a few percent; FP4 (8 levels per sign, per-32 scale) within ~15%.
    wq_b = dequant_fp8(t["layers.1.attn.wq_b.weight"], t["layers.1.attn.wq_b.scale"], torch.float32)
    assert _std_ok(wq_b, CFG.q_lora_rank**-0.5, 0.05)
    for w, fan_in in (("w1", d), ("w2", inter), ("w3", d)):
        name = "layers.2.ffn.experts.{}." + w
        deq = torch.cat([dequant_fp4(t[name.format(e) + ".weight"], t[name.format(e) + ".scale"], torch.float32)
                         for e in range(CFG.n_routed_experts)])
        assert _std_ok(deq, fan_in**-0.5, 0.15), w
    assert _std_ok(t["layers.1.attn.compressor.wkv.weight"], d**-0.5, 0.05)
    assert _std_ok(t["embed.weight"], 1.0, 0.05) and _std_ok(t["head.weight"], d**-0.5, 0.05)
    assert abs(t["layers.0.attn_norm.weight"].float().mean().item() - 1) < 0.01
    assert _std_ok(t["layers.0.hc_attn_fn"], (CFG.hc_mult * d) ** -0.5, 0.05)
    assert t["layers.0.hc_attn_scale"].min() > 0 and t["layers.0.hc_attn_base"].abs().max() < 1
    assert torch.isfinite(torch.stack([x.float().abs().max() for x in t.values() if x.is_floating_point()])).all()


def test_tid2eid_rows_are_distinct_experts(tensors):
    ids = tensors["layers.0.ffn.gate.tid2eid"]
    assert ids.dtype == torch.int64 and ids.shape == (CFG.vocab_size, CFG.n_activated_experts)
    assert ids.min() >= 0 and ids.max() < CFG.n_routed_experts
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
    assert len(ids.unique()) == CFG.n_routed_experts  # every expert is used by some token


# ---------------------------------------------------------------------------------------------- reader
def test_reader_api(single, tensors):
    file = single / "model-00001-of-00001.safetensors"
    for reader in (CheckpointReader(single), CheckpointReader(file)):
        assert reader.files == [file] and reader.keys() == sorted(tensors)
        assert "embed.weight" in reader and "nope" not in reader
        assert reader.spec("layers.0.ffn.experts.3.w2.weight") == inventory(CFG)["layers.0.ffn.experts.3.w2.weight"]
        assert torch.equal(reader.get_slice("embed.weight")[2:4], tensors["embed.weight"][2:4])
        with pytest.raises(KeyError, match="nope"):
            reader.get("nope")


def test_official_tiny_passes_inventory():
    reader = CheckpointReader(OFFICIAL_TINY)
    check_inventory(reader, tiny_config(max_seq_len=4096))
    assert check_inventory(reader, ModelConfig.from_file(OFFICIAL_TINY / "config.json")) is None


# ---------------------------------------------------------------------------------------------- inventory errors
def _modified(tmp_path: Path, tensors: dict[str, torch.Tensor], **edits) -> CheckpointReader:
    ts = dict(tensors)
    if "drop" in edits:
        del ts[edits["drop"]]
    if "extra" in edits:
        ts[edits["extra"]] = torch.zeros(3)
    if "reshape" in edits:
        ts[edits["reshape"]] = ts[edits["reshape"]][:-1].clone()
    if "retype" in edits:
        ts[edits["retype"]] = ts[edits["retype"]].float()
    save_file(ts, tmp_path / "model.safetensors")
    return CheckpointReader(tmp_path)


EDITS = {
    "drop": ("layers.2.attn.wkv.scale", "missing (1)", "expected F8_E8M0[1, 2]"),
    "extra": ("layers.9.surprise", "unexpected (1)", "found F32[3]"),
    "reshape": ("mtp.0.e_proj.weight", "wrong shape (1)", "expected [256, 256], found [255, 256]"),
    "retype": ("layers.1.attn.q_norm.weight", "wrong dtype (1)", "expected BF16, found F32"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_inventory_error_names_the_tensor(tmp_path, tensors, edit):
    name, group, detail = EDITS[edit]
    with pytest.raises(CheckpointError) as err:
        check_inventory(_modified(tmp_path, tensors, **{edit: name}), CFG)
    assert group in str(err.value) and f"{name}: {detail}" in str(err.value)


def test_inventory_errors_reported_together(tmp_path, tensors):
    edits = {edit: EDITS[edit][0] for edit in EDITS}
    with pytest.raises(CheckpointError) as err:
        check_inventory(_modified(tmp_path, tensors, **edits), CFG)
    msg = str(err.value)
    assert "(1 missing, 1 unexpected, 1 wrong shape, 1 wrong dtype)" in msg.splitlines()[0]
    assert all(f"{name}: {detail}" in msg for name, _, detail in EDITS.values())


def test_inventory_error_on_wrong_config_is_truncated_but_counted(single):
    with pytest.raises(CheckpointError) as err:
        check_inventory(CheckpointReader(single), CFG.replace(n_routed_experts=16))
    msg = str(err.value)
    # Experts 8..15 x 6 tensors x 5 blocks (4 layers + MTP) are missing; 5 gate weights + 3 biases mis-shaped.
    assert "(240 missing, 8 wrong shape)" in msg and "... and 190 more" in msg
    assert len(msg.splitlines()) < 200


# ---------------------------------------------------------------------------------------------- index errors
def _sharded(root: Path, shards: dict[str, list[str]], weight_map: dict[str, str] | str | None) -> Path:
    root.mkdir(exist_ok=True)
    for file, names in shards.items():
        save_file({n: torch.zeros(2) for n in names}, root / file)
    if weight_map is not None:
        text = weight_map if isinstance(weight_map, str) else json.dumps({"weight_map": weight_map})
        (root / INDEX_NAME).write_text(text)
    return root


def test_index_ok(tmp_path):
    path = _sharded(tmp_path, {"a.safetensors": ["x", "y"], "b.safetensors": ["z"]},
                    {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"})
    reader = CheckpointReader(path)
    assert reader.keys() == ["x", "y", "z"] and [f.name for f in reader.files] == ["a.safetensors", "b.safetensors"]
    assert reader.file_of("z").name == "b.safetensors" and reader.get("z").shape == (2,)


@pytest.mark.parametrize("shards, weight_map, message", [
    ({"a.safetensors": ["x"]}, {"x": "a.safetensors", "y": "gone.safetensors"},
     "missing files (1):\n    gone.safetensors"),
    ({"a.safetensors": ["x"], "b.safetensors": ["z"]},
     {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"},
     "y: index says a.safetensors"),
    ({"a.safetensors": ["x"], "b.safetensors": ["x", "z"]}, {"x": "a.safetensors", "z": "b.safetensors"},
     "x: in a.safetensors, b.safetensors"),
    ({"a.safetensors": ["x", "w"]}, {"x": "a.safetensors"}, "stored but not listed in the index (1):\n    w: in a"),
    ({"a.safetensors": ["x"]}, "{not json", "not a valid index"),
    ({"a.safetensors": ["x"]}, '{"metadata": {}}', "not a valid index"),
    ({"a.safetensors": ["x"]}, '{"weight_map": {"x": 3}}', "must map tensor names"),
    ({"a.safetensors": ["x"], "b.safetensors": ["z"]}, None, "no model.safetensors.index.json"),
    ({}, None, "no .safetensors file"),
])
def test_broken_index(tmp_path, shards, weight_map, message):
    path = _sharded(tmp_path / "ckpt", shards, weight_map)
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(path)
    assert message in str(err.value)


def test_moved_tensor_is_reported_with_where_it_is(tmp_path):
    path = _sharded(tmp_path, {"a.safetensors": ["x", "w"], "b.safetensors": ["y"]},
                    {"x": "b.safetensors", "y": "b.safetensors", "w": "a.safetensors"})
    with pytest.raises(CheckpointError, match=r"x: index says b\.safetensors, found in a\.safetensors"):
        CheckpointReader(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        CheckpointReader(tmp_path / "absent")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        CheckpointReader(tmp_path)
