"""transformers' `DeepseekV4ForCausalLM` built on the GPU from official-format tensors, one layer at a time.

`dsv4.parity.hf_oracle.load_hf_model` builds the model in fp32 on the CPU, which a 27B-parameter benchmark model
cannot afford. Here the model is built on the meta device, each layer's tensors are dequantised to bf16 on the GPU,
renamed by the oracle's table and assigned in place, so the peak is the bf16 model plus one layer.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from dsv4.parity.hf_oracle import _keep_fp32, convert_state_dict, hf_config_from_dict
from dsv4.quant import dequant_fp4, dequant_fp8


def _dequantised(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        if name.endswith(".scale") or name.startswith("mtp."):
            continue
        t, scale = tensors[name], tensors.get(name[: -len("weight")] + "scale")
        if scale is not None and t.dtype == torch.float8_e4m3fn:
            t = dequant_fp8(t, scale, torch.bfloat16)
        elif scale is not None:
            t = dequant_fp4(t, scale, torch.bfloat16)
        out[name] = t
    return out


def build_hf_model(cfg, tensors: dict[str, torch.Tensor], device) -> torch.nn.Module:
    """The bf16 transformers model (fp32 where transformers keeps fp32) holding `tensors`' weights."""
    from transformers import DeepseekV4ForCausalLM
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    config = hf_config_from_dict(cfg.to_hf())
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config)
    keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    expected = dict(model.state_dict())
    groups = defaultdict(list)
    for name in tensors:
        m = re.match(r"layers\.(\d+)\.", name)
        groups[int(m.group(1)) if m else -1].append(name)
    assigned = set()
    for _, names in sorted(groups.items()):
        sd, _, _ = convert_state_dict(_dequantised(tensors, names), n_experts=cfg.n_routed_experts)
        sd = {k: v.to(device, torch.float32 if _keep_fp32(k, keep) and v.is_floating_point() else None)
              for k, v in sd.items()}
        sd = {k: v.to(expected[k].dtype) if not v.is_floating_point() else v for k, v in sd.items()}
        result = model.load_state_dict(sd, strict=False, assign=True)
        if result.unexpected_keys:
            raise ValueError(f"no transformers target for {result.unexpected_keys}")
        assigned |= set(sd)
        del sd
    missing = sorted(set(expected) - assigned)
    if missing:
        raise ValueError(f"transformers weights not assigned: {missing}")
    for parent in list(model.modules()):                  # non-persistent RoPE tables were built on meta
        for child_name, child in list(parent.named_children()):
            if isinstance(child, DeepseekV4RotaryEmbedding):
                setattr(parent, child_name, DeepseekV4RotaryEmbedding(config, device=device))
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"transformers tensors left on meta: {left[:20]}")
    model.config.dtype = torch.bfloat16
    return model.eval()
