"""One dispatch point per hot op.

Model code calls `dsv4.ops.<op>`. Each op's definition is its plain-PyTorch twin in `ops/ref.py`; a fast
implementation may be registered for it (`ops/registry.py`), used only where it declares it applies, and switched
off globally with `DSV4_FAST_OPS=0` or locally with `with ops.reference_only(): ...` (what tests use to run both).
"""

from dsv4.ops import ref
from dsv4.ops.fake_quant import fake_quant_fp8, fake_quant_kv
from dsv4.ops.hc import hc_split_sinkhorn
from dsv4.ops.ref import acc_dtype, dense, dequant_weight
from dsv4.ops.registry import dispatch, fast_ops_status, reference_only, register, warn_removed_switches

linear = dispatch("linear", ref.linear)

from dsv4.ops import fp8_linear  # noqa: E402, F401  (registers its fast path)
from dsv4.ops.attention import sparse_attention, sparse_attention_dense_tail  # noqa: E402
from dsv4.ops.block_diag_linear import block_diag_linear  # noqa: E402
from dsv4.ops.dequant import dequant_fp4_bf16  # noqa: E402
from dsv4.ops.grouped_linear import grouped_linear  # noqa: E402
from dsv4.ops.hc_mix import hc_head_mix, hc_post, hc_pre_mix  # noqa: E402
from dsv4.ops.head import logits  # noqa: E402
from dsv4.ops.indexer_scores import indexer_scores  # noqa: E402
from dsv4.ops.moe_pairs import pair_linear  # noqa: E402
from dsv4.ops.topk import stable_topk  # noqa: E402
from dsv4.ops.widened_dense import widened_dense  # noqa: E402

warn_removed_switches()

__all__ = ["acc_dtype", "block_diag_linear", "dense", "dequant_fp4_bf16", "dequant_weight", "fake_quant_fp8",
           "fake_quant_kv", "fast_ops_status", "grouped_linear", "hc_head_mix", "hc_post", "hc_pre_mix",
           "hc_split_sinkhorn", "indexer_scores", "linear", "logits", "pair_linear", "reference_only", "register",
           "sparse_attention", "sparse_attention_dense_tail", "stable_topk", "widened_dense"]
