"""dsv4: a reference-exact PyTorch stack for DeepSeek-V4 (Flash, Pro)."""

from dsv4.chat import encode_messages, parse_completion
from dsv4.config import ConfigError, ModelConfig, tiny_config

__version__ = "0.1.0"
__all__ = ["LLM", "ConfigError", "ModelConfig", "SamplingParams", "StructuredOutputsParams", "encode_messages",
           "load_model", "parse_completion", "tiny_config"]


def __getattr__(name):
    # LLM and SamplingParams import the engine (and torch) on first use, so `import dsv4` stays light.
    if name == "LLM":
        from dsv4.llm import LLM

        return LLM
    if name == "SamplingParams":
        from dsv4.engine.sampling import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from dsv4.engine.structured import StructuredOutputsParams

        return StructuredOutputsParams
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")


def load_model(path, device="cpu", dtype=None, quant_emulation=True, progress=True):
    """Load an official-format checkpoint; `model(input_ids [b, s])` returns fp32 logits [b, s, vocab]."""
    import torch

    from dsv4.loader import load_model as _load

    return _load(path, device=device, dtype=torch.float32 if dtype is None else dtype,
                 quant_emulation=quant_emulation, progress=progress)
