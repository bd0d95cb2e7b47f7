"""Strict, memory-mapped access to an official-format checkpoint, and its check against a config.

A checkpoint is one `.safetensors` file, a directory holding exactly one, or a directory of shards with
`model.safetensors.index.json`. The index is validated against the shards' own headers at construction:
a missing shard file, a tensor the index promises but its shard lacks, a tensor stored in two shards, or one
stored but not indexed each raise a `CheckpointError`. Headers are read directly (8-byte length + JSON), which
is cheap and keeps the `safe_open` mmap handles lazy: a shard is opened on the first tensor read from it.
"""

from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from dsv4.checkpoint.errors import CheckpointError, problem_report
from dsv4.checkpoint.inventory import TensorSpec, inventory
from dsv4.config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
# A safetensors header is small JSON; a huge length means a corrupt or foreign file.
MAX_HEADER_BYTES = 100 * 2**20


class CheckpointReader:
    """Tensors of a checkpoint by name, read through cached mmap handles; nothing is loaded up front."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where = _locate(self.path)  # name -> shard file
        self._handles: dict[Path, object] = {}

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self):
        return iter(self.keys())

    def file_of(self, name: str) -> Path:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.path}")
        return self._where[name]

    def get_slice(self, name: str):
        """The lazy safetensors slice: `.get_shape()`, `.get_dtype()`, and `[rows]` reads only those bytes."""
        return self._handle(self.file_of(name)).get_slice(name)

    def spec(self, name: str) -> TensorSpec:
        sl = self.get_slice(name)
        return TensorSpec(tuple(sl.get_shape()), sl.get_dtype())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.file_of(name)).get_tensor(name)

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = open_safetensors(file)
        return self._handles[file]

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors in {len(self.files)} files)"


class _Found(NamedTuple):
    shape: tuple[int, ...]
    dtype: str


def check_inventory(reader: CheckpointReader, cfg: ModelConfig, against: str = "the config") -> None:
    """Raise one `CheckpointError` naming every missing, unexpected, mis-shaped and mis-typed tensor.

    `against` names where `cfg` came from in the message (e.g. the checkpoint's own config.json).
    """
    expected = inventory(cfg)
    # Raw header entries, not TensorSpecs: a dtype this package has no name for (e.g. "F4" from a converted
    # checkpoint) must be reported as a wrong dtype, not crash the check.
    found = {name: _Found(tuple(sl.get_shape()), sl.get_dtype()) for name in reader
             for sl in (reader.get_slice(name),)}
    groups = {
        "missing": [f"{n}: expected {s}" for n, s in expected.items() if n not in found],
        "unexpected": [f"{n}: found {s.dtype}{list(s.shape)}" for n, s in found.items() if n not in expected],
        "wrong shape": [f"{n}: expected {list(expected[n].shape)}, found {list(s.shape)}"
                        for n, s in found.items() if n in expected and s.shape != expected[n].shape],
        "wrong dtype": [f"{n}: expected {expected[n].dtype}, found {s.dtype}"
                        for n, s in found.items() if n in expected and s.dtype != expected[n].dtype],
    }
    if any(groups.values()):
        raise CheckpointError(problem_report(f"checkpoint {reader.path} does not match {against}", groups))


def open_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, CheckpointReader]:
    """The config and reader of a checkpoint (a directory, or a `.safetensors` file with `config.json` beside
    it), with the tensors already checked against the config."""
    reader = CheckpointReader(path)
    config_dir = reader.path if reader.path.is_dir() else reader.path.parent
    cfg = ModelConfig.from_file(config_dir)
    check_inventory(reader, cfg, against=f"its config ({config_dir})")
    return cfg, reader


def checkpoint_tokenizer(model_dir: str | os.PathLike):
    """`dsv4.tokenizer.load_tokenizer(model_dir)`, a damaged `tokenizer.json` of the checkpoint reported as a
    `CheckpointError` naming it. NOTE: the `tokenizers` library raises a bare `Exception` for a file it cannot
    parse, so that is what is caught, and only around the checkpoint's own file (not V4's default tokenizer)."""
    from dsv4.tokenizer import load_tokenizer

    file = Path(model_dir) / "tokenizer.json"
    try:
        return load_tokenizer(model_dir)
    except Exception as e:
        if not file.exists():
            raise
        raise CheckpointError(f"{file} is not a readable tokenizer: {e}") from e


# ---------------------------------------------------------------------------------------------- locating
def header_keys(file: Path) -> list[str]:
    """Tensor names in a safetensors file's header, without opening it for tensor reads."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"header length {size} is implausible")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e
    return [k for k in header if k != "__metadata__"]


def open_safetensors(file: Path):
    """`safe_open(file)`, a damaged file (e.g. truncated: its header promises more bytes than it holds) reported
    as a `CheckpointError` naming it. Why: `header_keys` reads only the header, so a cut-off shard passes it and
    would otherwise surface as a bare `SafetensorError` traceback on the first tensor read."""
    try:
        return safe_open(str(file), framework="pt")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e


def _locate(path: Path) -> dict[str, Path]:
    if path.is_file():
        return dict.fromkeys(header_keys(path), path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path} (neither a .safetensors file nor a directory)")
    if (path / INDEX_NAME).exists():
        return _from_index(path, path / INDEX_NAME)
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return dict.fromkeys(header_keys(files[0]), files[0])
    if not files:
        raise CheckpointError(f"no .safetensors file in {path}")
    raise CheckpointError(f"{path} holds {len(files)} .safetensors files but no {INDEX_NAME} to say which is which")


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid index (need JSON with a 'weight_map' object): {e!r}") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _from_index(root: Path, index: Path) -> dict[str, Path]:
    weight_map = _weight_map(index)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (root / s).is_file()]
    if missing:
        raise CheckpointError(problem_report(f"{index} refers to shard files that do not exist",
                                             {"missing files": missing}))
    stored: dict[str, list[str]] = defaultdict(list)  # name -> shards whose header holds it
    for shard in shards:
        for name in header_keys(root / shard):
            stored[name].append(shard)
    _check_index(index, weight_map, stored)
    return {name: root / shard for name, shard in weight_map.items()}


def _check_index(index: Path, weight_map: dict[str, str], stored: dict[str, list[str]]) -> None:
    groups = {
        "listed in the index but absent from their shard": [
            f"{n}: index says {s}" + (f", found in {', '.join(stored[n])}" if stored.get(n) else "")
            for n, s in weight_map.items() if s not in stored.get(n, ())],
        "stored in more than one shard": [f"{n}: in {', '.join(fs)}" for n, fs in stored.items() if len(fs) > 1],
        "stored but not listed in the index": [f"{n}: in {fs[0]}" for n, fs in stored.items()
                                               if n not in weight_map and len(fs) == 1],
    }
    if any(groups.values()):
        raise CheckpointError(problem_report(f"{index} does not agree with its shards", groups))
