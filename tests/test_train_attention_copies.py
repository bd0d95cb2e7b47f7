"""The sparse attention twins upcast the gathered KV rows (and the split tail's entries) once for both products
(`ops.ref.upcast_pair`): outputs and gradients bit for bit as the previous code, which upcast once per product
(frozen below), in fp32, bf16 and float64, eager, recomputed in the backward and traced by torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4 import ops
from dsv4.ops.ref import LIST_ALIGN, acc_dtype


def _old_sparse_attention(q, kv, sink, idx, scale):
    """ops/ref.py's sparse_attention before the shared upcast (frozen here)."""
    b, s, h, d = q.shape
    acc = acc_dtype(q.dtype)
    if idx.shape[-1] % LIST_ALIGN:
        idx = F.pad(idx, (0, -idx.shape[-1] % LIST_ALIGN), value=-1)
    valid = idx >= 0
    rows = idx.clamp_min(0).long()
    flat = (rows + kv.shape[1] * torch.arange(b, device=kv.device).view(b, 1, 1)).flatten()
    kv_sel = kv.reshape(-1, d).index_select(0, flat).view(b, s, -1, d)
    scores = torch.einsum("bshd,bskd->bshk", q.to(acc), kv_sel.to(acc)) * scale
    scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True) + torch.exp(sink.to(acc).view(1, 1, h, 1) - m)
    o = torch.einsum("bshk,bskd->bshd", p.to(kv.dtype).to(acc), kv_sel.to(acc)) / denom
    return o.to(q.dtype)


def _old_split_tail(q, kv, sink, idx, tail, visible, scale):
    """ops/ref.py's sparse_attention_split_tail before the shared upcast (frozen here)."""
    if tail.shape[1] == 0:
        return _old_sparse_attention(q, kv, sink, idx, scale)
    b, s, h, d = q.shape
    acc = acc_dtype(q.dtype)
    rows = (idx.clamp_min(0).long() + kv.shape[1] * torch.arange(b, device=kv.device).view(b, 1, 1)).flatten()
    kv_sel = kv.reshape(-1, d).index_select(0, rows).view(b, s, -1, d).to(acc)
    qa = q.to(acc)
    near = torch.einsum("bshd,bskd->bshk", qa, kv_sel) * scale
    near = near.masked_fill((idx < 0).unsqueeze(2), float("-inf"))
    far = torch.einsum("bshd,bed->bshe", qa, tail.to(acc)) * scale
    j = torch.arange(tail.shape[1], device=q.device)
    far = far.masked_fill((j >= visible.unsqueeze(-1)).unsqueeze(2), float("-inf"))
    m = torch.maximum(near.amax(dim=-1, keepdim=True), far.amax(dim=-1, keepdim=True))
    p_near, p_far = torch.exp(near - m), torch.exp(far - m)
    denom = p_near.sum(dim=-1, keepdim=True) + p_far.sum(dim=-1, keepdim=True) + torch.exp(
        sink.to(acc).view(1, 1, h, 1) - m)
    o = (torch.einsum("bshk,bskd->bshd", p_near.to(kv.dtype).to(acc), kv_sel)
         + torch.einsum("bshe,bed->bshd", p_far.to(tail.dtype).to(acc), tail.to(acc)))
    return (o / denom).to(q.dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _inputs(dtype, seed=0, b=2, s=24, h=4, d=32, n=40, k=20, e=7):
    """q, kv, sink (fp32), tail in `dtype`; idx with masked (-1) entries (k not a multiple of LIST_ALIGN: padded)
    and rows picked several times; visible: the first queries see no tail entry."""
    g = torch.Generator().manual_seed(seed)
    q, kv, tail = (torch.randn(*shape, generator=g).to(dtype) for shape in ((b, s, h, d), (b, n, d), (b, e, d)))
    sink = torch.randn(h, generator=g) * 2
    idx = torch.randint(-1, n, (b, s, k), generator=g)
    idx[:, :, :3] = -1
    visible = (torch.arange(1, s + 1) // 3).clamp_max(e).expand(b, s)
    return q, kv, sink, idx, tail, visible


def _run(fn, q, kv, sink, idx, tail, visible, with_tail):
    """fn's output and the gradients of q, kv, sink (and tail) for a fixed, non-uniform output gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in ((q, kv, sink, tail) if with_tail else (q, kv, sink))]
    out = fn(*leaves[:3], idx, leaves[3], visible, 0.3) if with_tail else fn(*leaves, idx, 0.3)
    grad = torch.linspace(-2, 3, out.numel()).view(out.shape).to(out.dtype)
    return [out, *torch.autograd.grad(out, leaves, grad)]


def _assert_equal(got, want):
    assert len(got) == len(want)
    for name, a, b in zip(("out", "q", "kv", "sink", "tail")[:len(got)], got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_attention_bit_identical_to_two_upcasts(dtype):
    args = _inputs(dtype)
    want = _run(_old_sparse_attention, *args, with_tail=False)
    _assert_equal(_run(ops.ref.sparse_attention, *args, with_tail=False), want)
    _assert_equal(_run(ops.sparse_attention, *args, with_tail=False), want)         # recomputed in the backward


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_tail_bit_identical_to_two_upcasts(dtype):
    args = _inputs(dtype, seed=1)
    want = _run(_old_split_tail, *args, with_tail=True)
    _assert_equal(_run(ops.ref.sparse_attention_split_tail, *args, with_tail=True), want)
    assert ops.registry.which("sparse_attention_dense_tail", *[t.requires_grad_() if t.is_floating_point() else t
                                                               for t in args], 0.3) == "split_tail"
    _assert_equal(_run(ops.sparse_attention_dense_tail, *_inputs(dtype, seed=1), with_tail=True), want)


def test_shared_upcast_bit_identical_under_torch_compile():
    """What the compiled training step traces (aot_eager: the same ATen ops as eager)."""
    args = _inputs(torch.bfloat16, seed=2)
    want = _run(_old_split_tail, *args, with_tail=True)
    compiled = torch.compile(ops.ref.sparse_attention_split_tail, backend="aot_eager", fullgraph=True)
    _assert_equal(_run(compiled, *args, with_tail=True), want)


class _Upcasts(TorchDispatchMode):
    """Counts the fp32 copies made of bf16 tensors of a given shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16 and out.shape == self.shape:
            self.count += out.dtype == torch.float32
        return out


def test_gathered_rows_upcast_once():
    q, kv, sink, idx, tail, visible = _inputs(torch.bfloat16, seed=3)
    leaves = [t.requires_grad_(True) for t in (q, kv, sink, tail)]
    with _Upcasts((*idx.shape[:2], LIST_ALIGN, q.shape[-1])) as rows:
        ops.ref.sparse_attention(*leaves[:3], idx, 0.3)
    with _Upcasts(tail.shape) as entries:
        ops.ref.sparse_attention_split_tail(*leaves[:3], idx, leaves[3], visible, 0.3)
    assert rows.count == 1 and entries.count == 1
