"""One dispatch point per hot op.

Model code calls `dsv4.ops.<op>`; today every op resolves to its plain-PyTorch definition in `ops/ref.py`.
Fast kernels register here later, each behind an off switch, and are tested against the `ref` twin.
"""

from dsv4.ops.ref import (
    acc_dtype,
    dense,
    dequant_weight,
    fake_quant_kv,
    hc_split_sinkhorn,
    linear,
    sparse_attention,
)

__all__ = ["acc_dtype", "dense", "dequant_weight", "fake_quant_kv", "hc_split_sinkhorn", "linear",
           "sparse_attention"]
