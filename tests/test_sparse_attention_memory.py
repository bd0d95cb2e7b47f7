"""The plain sparse attention's backward must stay linear in the KV rows (training runs it on 16k-token sequences).

A gather over kv expanded to [b, s, n, d] has a backward that allocates the whole expanded gradient: 80 GiB for one
16k-token sequence on the H200 (bench/results/builtin_v2_gpu_train_run2_concat16k_oom.log).
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4.ops import ref


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


def test_sparse_attention_backward_is_linear_in_kv_rows():
    s, n, h, d, k = 256, 4096, 2, 16, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, s, h, d, generator=gen, requires_grad=True)
    kv = torch.randn(1, n, d, generator=gen, requires_grad=True)
    idx = torch.randint(-1, n, (1, s, k), generator=gen)
    with LargestTensor() as seen:
        ref.sparse_attention(q, kv, torch.zeros(h), idx, d ** -0.5).square().sum().backward()
    assert kv.grad is not None and kv.grad.abs().sum() > 0
    assert seen.numel <= 4 * n * d, f"a {seen.numel}-element tensor: quadratic in the rows ({s * n * d})"


def test_indexer_selection_keeps_nothing_for_the_backward():
    """Only indices leave the indexer's top-k, so its quadratic [n, h, t] scores must not be saved for autograd."""
    from dsv4.config import tiny_config
    from dsv4.model.indexer import Indexer
    from dsv4.model.rope import Rotary

    cfg = tiny_config()
    ix = Indexer(cfg, Rotary(cfg, compressed=True), "plain", torch.float32)
    n, t, h, d = 64, 16, cfg.index_n_heads, cfg.index_head_dim
    w = torch.randn(1, n, h, requires_grad=True)
    q = torch.randn(1, n, h, d, requires_grad=True)
    keys = torch.randn(1, t, d, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        idx = ix.select(w, q, keys, 0, 0)
    assert idx.shape == (1, n, min(cfg.index_topk, t)) and not idx.requires_grad
    assert saved == [], f"tensors kept for the backward: {saved}"
