"""Shared fixtures: tiny checkpoints written once per session in the official format."""

from __future__ import annotations

import pytest
import torch

from dsv4.config import tiny_config


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_cfg):
    """A random tiny checkpoint (every layer type, hash + top-k MoE, MTP) in the official format."""
    from dsv4.checkpoint import synthesize

    return synthesize(tiny_cfg, tmp_path_factory.mktemp("tiny"), seed=1234, progress=False)


@pytest.fixture(scope="session")
def tiny_model_fp32(tiny_ckpt):
    import dsv4

    return dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=False, progress=False)


@pytest.fixture(scope="session")
def builtin_ckpt(tmp_path_factory):
    """The tiny architecture with the real V4 vocabulary (what `dsv4 generate` uses without --model)."""
    from dsv4.builtin import BUILTIN_SEED, builtin_config
    from dsv4.checkpoint import synthesize

    return synthesize(builtin_config(), tmp_path_factory.mktemp("builtin"), seed=BUILTIN_SEED, progress=False)


@pytest.fixture(scope="session")
def builtin_model_fp32(builtin_ckpt):
    """The built-in model (real V4 vocabulary) loaded once, for tests that need text prompts (the server's)."""
    import dsv4

    return dsv4.load_model(builtin_ckpt, dtype=torch.float32, progress=False)
