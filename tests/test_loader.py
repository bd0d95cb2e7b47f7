"""`dsv4.load_model` on small synthesized checkpoints: strict errors that name the offenders, and what a good
load produces (every parameter equal to the checkpoint, on the requested device and dtype, frozen)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dsv4
from dsv4.checkpoint import CheckpointError, CheckpointReader
from dsv4.checkpoint.reader import INDEX_NAME
from dsv4.config import ConfigError
from dsv4.quant import dequant_fp8

QUANTISED = {torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8, torch.int64}


@pytest.fixture(scope="module")
def tensors(tiny_ckpt) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(tiny_ckpt)
    return {name: reader.get(name) for name in reader}


def _write(root: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """A single-file checkpoint directory: model.safetensors + config.json, no index."""
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps(config))
    return root


def _config(ckpt: Path, **changes) -> dict:
    return json.loads((ckpt / "config.json").read_text()) | changes


def _load(path, **kw):
    return dsv4.load_model(path, progress=False, **kw)


def _listed(msg: str) -> list[str]:
    """The offending tensor names of a problem report (its indented detail lines)."""
    return [line.strip().split(":")[0] for line in msg.splitlines() if line.startswith("    ")]


# ---------------------------------------------------------------------------------------------- one problem
EDITS = {  # name -> (edit, report group, detail)
    "layers.2.attn.wkv.scale": ("drop", "1 missing", "expected F8_E8M0[1, 2]"),
    "layers.1.attn.surprise": ("extra", "1 unexpected", "found F32[3]"),
    "layers.1.attn.wq_b.weight": ("reshape", "1 wrong shape", "expected [512, 128], found [511, 128]"),
    "layers.1.attn.wq_a.weight": ("bf16", "1 wrong dtype", "expected F8_E4M3, found BF16"),
    "layers.3.attn.wkv.scale": ("fp32", "1 wrong dtype", "expected F8_E8M0, found F32"),
    # convert.py's FP4 view (safetensors "F4", shape counted in 4-bit values): a dtype this package has no name
    # for must be reported, not crash the check.
    "layers.2.ffn.experts.5.w1.weight": ("f4", "1 wrong shape, 1 wrong dtype", "expected I8, found F4"),
    "layers.0.ffn.gate.tid2eid": ("i32", "1 wrong dtype", "expected I64, found I32"),
}


def _edited(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    ts = dict(tensors)
    for name in names:
        edit = EDITS[name][0]
        if edit == "drop":
            del ts[name]
        elif edit == "extra":
            ts[name] = torch.zeros(3)
        elif edit == "reshape":
            ts[name] = ts[name][:-1]
        elif edit == "f4":
            ts[name] = ts[name].view(torch.float4_e2m1fn_x2)
        else:
            ts[name] = ts[name].to({"bf16": torch.bfloat16, "fp32": torch.float32, "i32": torch.int32}[edit])
    return ts


@pytest.mark.parametrize("name", list(EDITS), ids=[e[0] for e in EDITS.values()])
def test_one_bad_tensor_is_named(tmp_path, tiny_ckpt, tensors, name):
    path = _write(tmp_path, _edited(tensors, [name]), _config(tiny_ckpt))
    with pytest.raises(CheckpointError) as err:
        _load(path)
    msg = str(err.value)
    _, group, detail = EDITS[name]
    assert f"does not match its config ({path})" in msg.splitlines()[0] and f"({group})" in msg.splitlines()[0]
    assert f"    {name}: {detail}" in msg.splitlines()
    assert set(_listed(msg)) == {name}


def test_every_problem_in_one_error(tmp_path, tiny_ckpt, tensors):
    path = _write(tmp_path, _edited(tensors, list(EDITS)), _config(tiny_ckpt))
    with pytest.raises(CheckpointError) as err:
        _load(path)
    msg = str(err.value)
    assert "(1 missing, 1 unexpected, 2 wrong shape, 4 wrong dtype)" in msg.splitlines()[0]
    assert set(_listed(msg)) == set(EDITS)


# ---------------------------------------------------------------------------------------------- config vs tensors
def test_config_that_disagrees_with_the_tensors(tmp_path, tiny_ckpt, tensors):
    # One hash layer instead of two: layer 1's gate has a tid2eid on disk but the config wants a bias.
    path = _write(tmp_path, tensors, _config(tiny_ckpt, num_hash_layers=1))
    with pytest.raises(CheckpointError) as err:
        _load(path)
    assert "(1 missing, 1 unexpected)" in str(err.value).splitlines()[0]
    assert sorted(_listed(str(err.value))) == ["layers.1.ffn.gate.bias", "layers.1.ffn.gate.tid2eid"]


def test_config_with_wrong_width_is_reported_in_bulk(tmp_path, tiny_ckpt, tensors):
    path = _write(tmp_path, tensors, _config(tiny_ckpt, hidden_size=384))
    with pytest.raises(CheckpointError) as err:
        _load(path)
    first = str(err.value).splitlines()[0]
    assert "wrong shape" in first and "embed.weight" in _listed(str(err.value))
    assert len(str(err.value).splitlines()) < 250  # long lists are cut and counted


def test_missing_or_invalid_config(tmp_path, tensors, tiny_ckpt):
    path = _write(tmp_path / "a", tensors, {})
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        _load(path)
    path = _write(tmp_path / "b", tensors, _config(tiny_ckpt, num_attention_heads=3))
    with pytest.raises(ConfigError, match=r"config\.json: invalid DeepSeek-V4 config: n_heads=3"):
        _load(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        _load(tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"no \.safetensors file"):
        _load(tmp_path)


@pytest.mark.parametrize("dtype", ["bf16", torch.int8, None])
def test_dtype_must_be_a_float_torch_dtype(tiny_ckpt, dtype):
    from dsv4.loader import load_model

    with pytest.raises(TypeError, match=r"floating-point torch\.dtype"):
        load_model(tiny_ckpt, dtype=dtype, progress=False)


# ---------------------------------------------------------------------------------------------- a good load
def _expected(name: str, param: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The parameter the reference makes of a checkpoint tensor (spec §5.3); quantised tensors (wo_a's FP8 included)
    are held as stored."""
    return tensors[name].to(param.dtype)


# bf16 on disk, computed in fp32 (spec §3.5, §3.7): a 16-bit model holds them as stored, an fp32 model widened
HELD_BF16 = re.compile(r".*(compressor\.wkv|compressor\.wgate|ffn\.gate)\.weight")


def _check_loaded(model, tensors, dtype, device="cpu"):
    params = dict(model.named_parameters())
    assert set(params) == set(tensors)
    for name, p in (*params.items(), *model.named_buffers()):
        assert not p.is_meta and p.device.type == device and not p.requires_grad, name
    for name, p in params.items():
        assert p.dtype in QUANTISED | {torch.float32, dtype}, name
        want = _expected(name, p, tensors)
        assert p.dtype == want.dtype and torch.equal(p.cpu().view(torch.uint8), want.view(torch.uint8)), name
    held = sorted(n for n in params if HELD_BF16.fullmatch(n))
    assert held and sorted(model.held_bf16) == (held if dtype != torch.float32 else [])
    assert all(params[n].dtype == (torch.bfloat16 if dtype != torch.float32 else torch.float32) for n in held)
    assert model.dtype == dtype and params["embed.weight"].dtype == dtype
    wo_a = {n: p.dtype for n, p in params.items() if ".wo_a." in n}
    assert len(wo_a) == 2 * len(model.layers + model.mtp)                # a weight and its scale per block
    assert all(t == (torch.float8_e4m3fn if n.endswith("weight") else torch.float8_e8m0fnu) for n, t in wo_a.items())
    assert not model.training


def _quant_emulation(model) -> set[bool]:
    # NOTE: not `model.quant_emulation`: that property recurses into itself (hasattr(self, ...) runs it).
    return {m.quant_emulation for m in model.modules() if m is not model and hasattr(m, "quant_emulation")}


def test_good_checkpoint_fp32(tiny_model_fp32, tensors):
    _check_loaded(tiny_model_fp32, tensors, torch.float32)
    assert _quant_emulation(tiny_model_fp32) == {False}


def test_good_checkpoint_bf16_defaults(tiny_ckpt, tensors):
    model = _load(tiny_ckpt, dtype=torch.bfloat16)
    _check_loaded(model, tensors, torch.bfloat16)
    assert _quant_emulation(model) == {True}
    assert _load(tiny_ckpt).dtype == torch.float32  # the public default


@pytest.mark.parametrize("dtype, quant_emulation", [(torch.float32, False), (torch.bfloat16, True)])
def test_wo_a_held_fp8_computes_the_logits_of_its_dequantised_copy(tiny_ckpt, tensors, dtype, quant_emulation):
    """wo_a is held as stored (FP8 + e8m0 scales) where the reference holds it dequantised (convert.py): the model's
    logits are bit for bit those of the dequantised copy in the compute dtype (the layout before: a plain weight),
    on the reference path, full forward and MTP."""
    from dsv4.model.primitives import BlockDiagLinear

    model = _load(tiny_ckpt, dtype=dtype, quant_emulation=quant_emulation)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(8))

    def logits():
        with torch.no_grad(), dsv4.ops.reference_only():
            h = model.hidden(ids)
            return model.main_logits(h), model.mtp_forward(h[:, :-1], ids[:, 1:])

    held = logits()
    blocks = [*model.layers, *model.mtp]
    for i, block in enumerate(blocks):
        old = block.attn.wo_a
        assert isinstance(old, BlockDiagLinear) and old.fmt == "fp8" and old.groups == model.cfg.o_groups
        prefix = f"layers.{i}" if i < len(model.layers) else f"mtp.{i - len(model.layers)}"
        copy = BlockDiagLinear(old.in_features, old.out_features, "plain", dtype, old.groups)
        copy.weight.data = dequant_fp8(tensors[f"{prefix}.attn.wo_a.weight"], tensors[f"{prefix}.attn.wo_a.scale"],
                                       torch.float32).to(dtype)
        block.attn.wo_a = copy
    dequantised = logits()
    assert all(torch.equal(a, b) for a, b in zip(held, dequantised, strict=True))
    assert not torch.equal(held[0], torch.zeros_like(held[0]))


@pytest.mark.gpu
def test_good_checkpoint_on_cuda(tiny_ckpt, tensors):
    _check_loaded(_load(tiny_ckpt, device="cuda", dtype=torch.bfloat16), tensors, torch.bfloat16, "cuda")


def _write_sharded(root: Path, tensors: dict[str, torch.Tensor], config: dict, n: int = 3) -> Path:
    """Shards holding every n-th tensor (so a weight and its scale usually sit in different files) + index."""
    root.mkdir(parents=True)
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, file in enumerate(files):
        save_file({k: tensors[k].contiguous() for k in names[i::n]}, root / file)
    weight_map = {k: files[j % n] for j, k in enumerate(names)}
    (root / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_sharded_and_single_file_load_identically(tmp_path, tiny_ckpt, tensors, tiny_model_fp32):
    sharded = _write_sharded(tmp_path / "sharded", tensors, _config(tiny_ckpt))
    single = _write(tmp_path / "single", tensors, _config(tiny_ckpt))  # one model.safetensors, no index
    copied = tmp_path / "file"
    shutil.copytree(single, copied)
    want = tiny_model_fp32.state_dict()  # loaded from the synthesizer's own (indexed) output
    for path in (sharded, single, copied / "model.safetensors"):  # the file itself, config.json beside it
        assert len(CheckpointReader(path).files) == (3 if path == sharded else 1)
        got = _load(path, dtype=torch.float32, quant_emulation=False).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want), path


def test_progress_bar_can_be_disabled(tiny_ckpt, capfd):
    dsv4.load_model(tiny_ckpt, progress=False)
    assert capfd.readouterr().err == ""
    dsv4.load_model(tiny_ckpt, progress=True)
    assert "loading" in capfd.readouterr().err
