"""The built-in default model used when no `--model` is given: a small DeepSeek-V4 trained on Python source.

It ships inside the package (`dsv4/builtin_model/`, package data): every V4 layer kind (sliding, CSA and HCA
layers, hash and top-k MoE with a shared expert, mHC, MTP) with a byte-level BPE tokenizer of its own (the V4 chat
markers as special tokens), stored in the official format (FP8/FP4 + e8m0 scales) and loaded through the normal
strict loader. Version 1 was trained on CPU (`scripts/train_builtin.py`), version 2 on a GPU
(`scripts/train_builtin_gpu.py`, installed by `scripts/install_builtin.py`, which sets BUILTIN_VERSION).
Model card: docs/builtin_model.md.
NOTE: its vocabulary is not V4's; tests that need the real 129k vocabulary synthesise `untrained_v4_vocab_config()`.
"""

from __future__ import annotations

from pathlib import Path

from dsv4.chat.tokens import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, TASK_TOKENS, THINK_END, THINK_START, USER
from dsv4.checkpoint.errors import CheckpointError
from dsv4.config import ModelConfig, tiny_config

BUILTIN_VERSION = 2               # of the shipped model; scripts/install_builtin.py rewrites this line
BUILTIN_NAME = f"builtin-python-v{BUILTIN_VERSION}"
# The built-in model's generation_config.json (scripts/install_builtin.py writes it): greedy by default, as
# `dsv4 chat` runs it; the server takes it for the sampling fields a request omits (sampled at temperature 1 a
# model this small writes noise).
BUILTIN_GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}
# The built-in tokenizer's first ids (BOS 0 and EOS 1 as in every V4 config, then the chat format's markers),
# followed by the byte-level BPE merges.
BUILTIN_SPECIALS = (BOS, EOS, "<｜▁pad▁｜>", USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER,
                    *TASK_TOKENS.values())


def builtin_config(version: int = BUILTIN_VERSION) -> ModelConfig:
    """Architecture of the built-in model (default: the shipped one, BUILTIN_VERSION): version 1 was trained on
    CPU (`scripts/train_builtin.py`); version 2 is the GPU-trained successor (`scripts/train_builtin_gpu.py`):
    every V4 layer kind twice over (sliding, then CSA/HCA alternating, + a sliding MTP block), sized to 39.1 MB of
    official-format safetensors (FP8 dense, FP4 experts, bf16 embedding/head: `dsv4.checkpoint.inventory`,
    checked in the tests)."""
    if version == 1:
        return tiny_config(vocab_size=4096)
    if version == 2:
        return tiny_config(vocab_size=6144, dim=512, n_layers=6, compress_ratios=(0, 4, 128, 4, 128, 4, 0),
                           n_heads=8, head_dim=128, q_lora_rank=256, o_lora_rank=128, o_groups=4, window_size=64,
                           index_n_heads=16, index_topk=16, n_routed_experts=6, n_activated_experts=2,
                           moe_inter_dim=256, n_hash_layers=2, max_seq_len=2048)
    raise ValueError(f"unknown built-in model version {version}")


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
