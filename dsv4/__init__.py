"""dsv4: a reference-exact PyTorch stack for DeepSeek-V4 (Flash, Pro)."""

from dsv4.chat import encode_messages, parse_completion
from dsv4.config import ConfigError, ModelConfig, tiny_config

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "encode_messages", "load_model", "parse_completion", "tiny_config"]


def load_model(path, device="cpu", dtype=None, quant_emulation=True, progress=True):
    """Load an official-format checkpoint; `model(input_ids [b, s])` returns fp32 logits [b, s, vocab]."""
    import torch

    from dsv4.loader import load_model as _load

    return _load(path, device=device, dtype=torch.float32 if dtype is None else dtype,
                 quant_emulation=quant_emulation, progress=progress)
