"""The built-in default model used when no `--model` is given.

Until a trained one ships, it is the tiny test architecture (every layer type present) with the real V4
vocabulary and deterministic random weights, written once in the official checkpoint format to a cache
directory and then loaded through the normal strict loader. It is UNTRAINED: its text is noise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dsv4.config import ModelConfig, tiny_config

BUILTIN_NAME = "builtin-untrained-v1"
BUILTIN_SEED = 20260422


def builtin_config() -> ModelConfig:
    return tiny_config(vocab_size=129280)


def cache_dir() -> Path:
    root = os.environ.get("DSV4_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsv4")
    return Path(root)


def builtin_model_path() -> Path:
    """Directory of the built-in checkpoint, synthesised on first use (a few seconds)."""
    from dsv4.checkpoint import synthesize

    path = cache_dir() / BUILTIN_NAME
    if not (path / "model.safetensors.index.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        synthesize(builtin_config(), tmp, seed=BUILTIN_SEED, progress=False)
        os.makedirs(path.parent, exist_ok=True)
        try:
            os.replace(tmp, path)               # atomic: concurrent first runs never see half a checkpoint
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / "model.safetensors.index.json").exists():
                raise
    return path
