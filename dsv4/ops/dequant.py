"""`dequant_fp4_bf16`: FP4 e2m1 weights + e8m0 scales -> bf16, for whole expert stacks made for one call.

Twin: expert by expert through `quant.dequant_fp4` (fp32, then bf16: exact), so its fp32 temporaries stay one
expert's size. On CUDA one Triton launch over the whole stack (`ops/triton/fp4_dequant.py`), bit-identical.
"""

from __future__ import annotations

import torch

from dsv4.ops.fp4_layout import rows_shape, to_rows
from dsv4.ops.registry import custom_op, dispatch, register_triton
from dsv4.quant.fp4 import dequant_fp4


def _twin(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[..., N, K/2] packed codes (or tile-major: `ops.fp4_layout`) + e8m0 [..., N, K/32] -> bf16 [..., N, K]."""
    weight = to_rows(weight)
    if weight.dim() == 2:
        return dequant_fp4(weight, scale, torch.float32).to(torch.bfloat16)
    out = torch.empty(*weight.shape[:-1], 2 * weight.shape[-1], dtype=torch.bfloat16, device=weight.device)
    for i in range(weight.shape[0]):        # one leading index at a time: no fp32 temporary of the whole stack
        out[i] = _twin(weight[i], scale[i])
    return out


dequant_fp4_bf16 = dispatch("dequant_fp4_bf16", _twin)


@custom_op("dequant_fp4_bf16", lambda weight, scale: weight.new_empty(
    *rows_shape(weight)[:-1], 2 * rows_shape(weight)[-1], dtype=torch.bfloat16))
def _kernel(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from dsv4.ops.triton.fp4_dequant import dequant_fp4_bf16 as launch

    return launch(weight, scale)


register_triton("dequant_fp4_bf16", "triton_dequant_fp4", lambda weight, scale: weight.is_cuda, _kernel)
