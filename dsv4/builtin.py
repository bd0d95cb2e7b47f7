"""The built-in default model used when no `--model` is given: a tiny DeepSeek-V4 trained on Python source.

It ships inside the package (`dsv4/builtin_model/`, package data): the tiny test architecture (sliding, CSA and
HCA layers, hash and top-k MoE with a shared expert, mHC, MTP) with a 4096-id byte-level BPE tokenizer of its
own, trained by `scripts/train_builtin.py` on the CPython standard library's source, stored in the official
format (FP8/FP4 + e8m0 scales) and loaded through the normal strict loader. Model card: docs/builtin_model.md.
NOTE: its vocabulary is not V4's; tests that need the real 129k vocabulary synthesise `untrained_v4_vocab_config()`.
"""

from __future__ import annotations

from pathlib import Path

from dsv4.chat.tokens import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, TASK_TOKENS, THINK_END, THINK_START, USER
from dsv4.checkpoint.errors import CheckpointError
from dsv4.config import ModelConfig, tiny_config

BUILTIN_NAME = "builtin-python-v1"
# The built-in tokenizer's first ids (BOS 0 and EOS 1 as in every V4 config, then the chat format's markers),
# followed by the byte-level BPE merges.
BUILTIN_SPECIALS = (BOS, EOS, "<｜▁pad▁｜>", USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER,
                    *TASK_TOKENS.values())


def builtin_config() -> ModelConfig:
    """Architecture of the built-in model (what `scripts/train_builtin.py` trains)."""
    return tiny_config(vocab_size=4096)


def untrained_v4_vocab_config() -> ModelConfig:
    """The same architecture with DeepSeek-V4's 129k vocabulary: random-weight test models that need the real
    tokenizer (chat template, server) are synthesised from it."""
    return tiny_config(vocab_size=129280)


def builtin_model_path() -> Path:
    """Directory of the built-in checkpoint (inside the installed package)."""
    path = Path(__file__).resolve().parent / "builtin_model"
    if not (path / "model.safetensors.index.json").exists():
        raise CheckpointError(f"the built-in model is missing from {path} (a broken install? reinstall dsv4, "
                              "or pass --model)")
    return path
