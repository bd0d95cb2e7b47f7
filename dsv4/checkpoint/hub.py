"""Where a model argument points: nothing (the built-in model), a local checkpoint directory, or a Hugging Face
Hub id, downloaded with `huggingface_hub` (only the files the loader reads: safetensors, index, configs,
tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

from dsv4.checkpoint.errors import CheckpointError

HUB_FILES = ["*.safetensors", "*.json", "inference/*.json"]


def resolve_model(model: str | os.PathLike | None, revision: str | None = None,
                  cache_dir: str | None = None) -> Path:
    """A local directory holding the checkpoint for `model`."""
    if model is None:
        from dsv4.builtin import builtin_model_path

        return builtin_model_path()
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a checkpoint directory")
        return path
    if str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        raise CheckpointError(f"{model}: no such directory, and not a Hugging Face Hub id (owner/name)")
    return _download(str(model), revision, cache_dir)


def _download(repo_id: str, revision: str | None, cache_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_FILES))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        # One line: huggingface_hub's messages span several (the CLI's errors are one line each).
        reason = " ".join(str(e).split())
        raise CheckpointError(f"{repo_id}: could not download from the Hugging Face Hub: {reason}") from e
