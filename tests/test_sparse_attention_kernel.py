"""The fused sparse attention kernel (`ops/triton/sparse_attention.py`) against golden's tiled variant and float64.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported: one
subprocess runs every case and reports JSON), with fp32 q / kv: triton 3.6's interpreter computes bf16 tl.dot
wrongly, so the bf16 rounding of the probabilities is a no-op here and is checked on the GPU only.

Tolerances by precision class:
* vs `golden.attention_tiled(tile=BLOCK_K)`: the same operations in the same order, the dot products' summation
  order and the exp implementation aside: fp32 rounding, relative (Frobenius) error <= 1e-5.
* vs float64 (fp32 inputs): fp32 scores / softmax / PV over <= 150 rows: relative error <= 1e-5.
* GPU, bf16 at Flash dims: docs/parity.md measures golden's tiled variant at rel. err 2.07e-3 (tile 64) from
  float64; the kernel must land in that class (<= 3e-3) and within fp32 noise of bf16 rounding of golden tiled
  (<= 5e-3 relative: a bf16 output rounding may flip, each flip is one bf16 ulp).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kernel_helpers import interpreted_json

import dsv4

pytest.importorskip("triton", reason="needs triton (its CPU interpreter runs the kernel here)")

FP32_CLASS = 1e-5

_CHECK = r'''
import json
import torch
from dsv4.ops import golden, ref
from dsv4.ops.triton.sparse_attention import sparse_attention


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(gen, b, s, h, d, n, k, sink_at, masked=0.3, repeats=True):
    q = torch.randn(b, s, h, d, generator=gen)
    kv = torch.randn(b, n, d, generator=gen)
    sink = torch.randn(h, generator=gen) + sink_at
    idx = torch.randint(0, n, (b, s, k), generator=gen, dtype=torch.int32)
    if not repeats:
        idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b * s)]).view(b, s, k).int()
    idx = torch.where(torch.rand(idx.shape, generator=gen) < masked, -1, idx)
    if k > 70:
        idx[0, 0, :70] = -1                      # the first tile(s) see nothing yet: the finfo.min reference
    return q, kv, sink, idx, d ** -0.5


CASES = {  # b, s, h, d, n, k, sink offset, block_h, block_k, splits (split k: a merge of partial softmaxes)
    "d64-h20-k150-bk64-sink_small": (2, 3, 20, 64, 90, 150, -30.0, 16, 64, 1),
    "d128-h32-k150-bk32-sink_big-split3": (1, 2, 32, 128, 60, 150, 12.0, 16, 32, 3),
    "d64-h16-k40-bk64-one_tile-split2_one_empty": (3, 2, 16, 64, 40, 40, 0.0, 16, 64, 2),
    "d48-h8-k100-bk16-padded-split4": (1, 2, 8, 48, 50, 100, 0.0, 16, 16, 4),
}
gen = torch.Generator().manual_seed(55)
res = {}
for name, (b, s, h, d, n, k, sink_at, bh, bk, splits) in CASES.items():
    q, kv, sink, idx, scale = inputs(gen, b, s, h, d, n, k, sink_at, repeats="one_tile" not in name)
    o = sparse_attention(q, kv, sink, idx, scale, block_h=bh, block_k=bk, splits=splits)
    tiled = golden.attention_tiled(q, kv, sink, idx, scale, bk)
    f64 = ref.sparse_attention(q.double(), kv.double(), sink.double(), idx, scale)
    no_sink = ref.sparse_attention(q, kv, torch.full_like(sink, -1e4), idx, scale)
    res[name] = {"tiled": rel(o, tiled), "f64": rel(o, f64), "dtype": str(o.dtype), "finite": bool(o.isfinite().all()),
                 "repeats": bool(any(len(set(r.tolist()) - {-1}) < (r >= 0).sum() for r in idx.view(-1, k))),
                 "sink_effect": rel(no_sink, f64),
                 "shifted": rel(golden.attention_tiled(q, kv, sink, torch.where(idx >= 0, (idx + 1) % n, -1), scale,
                                                       bk), o)}

q, kv, sink, idx, scale = inputs(gen, 2, 3, 16, 64, 30, 80, 0.0)
idx[1, 2] = -1                                   # a query with no key at all
twin = ref.sparse_attention(q, kv, sink, idx, scale)
for splits in (1, 3):
    o = sparse_attention(q, kv, sink, idx, scale, block_k=16, splits=splits)
    nan_rows = o.isnan().all(-1).all(-1)
    res[f"all_masked-split{splits}"] = {"kernel_nan": nan_rows.tolist(),
                                        "twin_nan": twin.isnan().all(-1).all(-1).tolist(),
                                        "rest_finite": bool(o[~nan_rows].isfinite().all()),
                                        "rest": rel(o[~nan_rows], twin[~nan_rows])}

# HCA in inference (`ops.attention._dense_tail_kernel`): window rows by index, then the compressed entries each
# query sees (visible = 0 for the first queries: no entry yet), through the kernel over the definition's layout
from dsv4.ops.attention import _dense_tail_kernel
q, kv, sink, idx, scale = inputs(gen, 2, 5, 16, 64, 40, 24, 0.0)
tail = torch.randn(2, 7, 64, generator=gen)
visible = torch.tensor([[0, 0, 3, 5, 7], [1, 2, 2, 6, 7]])
o = _dense_tail_kernel(q, kv, sink, idx, tail, visible, scale)
f64 = ref.sparse_attention_dense_tail(q.double(), kv.double(), sink.double(), idx, tail.double(), visible, scale)
res["dense_tail"] = {"f64": rel(o, f64), "dtype": str(o.dtype),
                     "no_tail": rel(ref.sparse_attention(q, kv, sink, idx, scale), f64)}
print(json.dumps(res))
'''


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return interpreted_json(_CHECK, tmp_path_factory.mktemp("sparse_attention"))


def test_kernel_matches_golden_tiled_and_float64(interpreted):
    cases = {k: v for k, v in interpreted.items() if not k.startswith(("all_masked", "dense_tail"))}
    assert len(cases) == 4
    for case, r in cases.items():
        assert r["tiled"] <= FP32_CLASS, (case, r)
        assert r["f64"] <= FP32_CLASS, (case, r)
        assert r["finite"] and r["dtype"] == "torch.float32", (case, r)
        assert r["shifted"] > 0.1, (case, r)           # control: reading each row one off is seen
    assert all(v["repeats"] for k, v in cases.items() if "one_tile" not in k)   # repeated rows were exercised


def test_sink_dominating_and_negligible(interpreted):
    """Controls: dropping the sink moves the result far where it dominates (sink ~ +12), not where it is
    negligible (~ -30): both regimes are in the comparison above."""
    assert interpreted["d128-h32-k150-bk32-sink_big-split3"]["sink_effect"] > 0.5
    assert interpreted["d64-h20-k150-bk64-sink_small"]["sink_effect"] <= FP32_CLASS


@pytest.mark.parametrize("splits", [1, 3])
def test_query_with_no_key_is_nan_like_the_twin(interpreted, splits):
    r = interpreted[f"all_masked-split{splits}"]
    want = [[False, False, False], [False, False, True]]
    assert r["kernel_nan"] == want and r["twin_nan"] == want, r
    assert r["rest_finite"] and r["rest"] <= FP32_CLASS, r


def test_dense_tail_kernel_matches_the_definition(interpreted):
    """HCA in inference takes the kernel over `ref.dense_tail_lists`' layout (fp32 class against float64); the
    control shows the entries matter (leaving the tail out is far off)."""
    r = interpreted["dense_tail"]
    assert r["f64"] <= FP32_CLASS and r["dtype"] == "torch.float32", r
    assert r["no_tail"] > 0.05, r


def test_hca_has_an_inference_path_besides_the_training_one():
    """The dense tail's inference path is registered after the training ones (the fused training op, opt-in, then
    split_tail: both apply only with autograd on): before the thirteenth session it had none, and every HCA layer
    ran the twin on CUDA."""
    from dsv4.ops import registry

    names = [name for name, _, _ in registry._FAST["sparse_attention_dense_tail"]]
    assert names == ["triton_dense_tail_train", "split_tail", "triton_sparse_attention_dense_tail"]


def test_bad_input_names_the_offender():
    from dsv4.ops.triton.sparse_attention import sparse_attention

    q, kv = torch.randn(1, 2, 4, 16), torch.randn(1, 5, 16)
    sink, idx = torch.zeros(4), torch.zeros(1, 2, 3, dtype=torch.int32)
    cases = [((q[0], kv, sink, idx), "want q"), ((q, kv[..., :8], sink, idx), "kv"), ((q, kv, sink[:3], idx), "sink"),
             ((q, kv, sink.double(), idx), "sink"), ((q, kv.bfloat16(), sink, idx), "bf16 or fp32"),
             ((q, kv, sink, idx.float()), "idx must be int"), ((q, kv, sink, idx[:, :1]), "idx"),
             ((q, kv, sink, idx + 5), "row 5")]
    for args, words in cases:
        with pytest.raises(ValueError, match=words):
            sparse_attention(*args, 0.25)


def test_kernel_compiles_for_hopper_without_a_gpu():
    """The bf16 tl.dot path at Flash's head_dim 512 compiles ahead of time to sm_90 (what the interpreter does not
    check: layouts, the dtypes of both dots, the pipelined `for` loop), direct and split with the merge."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv4.ops.triton.sparse_attention import _combine, _sparse_attention

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    sig = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "sink_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*bf16",
           "m_ptr": "*fp32", "l_ptr": "*fp32", "S": "i32", "N": "i32", "K": "i32", "TILES": "i32", "scale": "fp32"}
    for partial, pipelined in ((False, True), (True, True), (False, False)):
        cs = {"H": 64, "D": 512, "BLOCK_H": 16, "BLOCK_D": 512, "BLOCK_K": 64, "IEEE": False, "PARTIAL": partial,
              "PIPELINED": pipelined, "LSE": False}
        kernel = triton.compile(ASTSource(_sparse_attention, {**sig, **dict.fromkeys(cs, "constexpr"),
                                                              **({"out_ptr": "*fp32"} if partial else {})},
                                          constexprs=cs), target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], cs
    sig = {"part_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "sink_ptr": "*fp32", "out_ptr": "*bf16",
           "SPLITS": "i32"}
    cs = {"H": 64, "D": 512, "BLOCK_H": 16, "BLOCK_D": 512}
    kernel = triton.compile(ASTSource(_combine, {**sig, **dict.fromkeys(cs, "constexpr")}, constexprs=cs),
                            target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"]


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("block_k", [32, 64])
def test_sparse_attention_on_cuda_at_flash_dims(block_k, splits):
    """64 heads x 512, 640 rows per query, a quarter masked, bf16 (golden.realistic_attention_inputs): in the class
    of golden's tiled variant (docs/parity.md: rel. err 2.07e-3 from float64) and near golden tiled itself."""
    from dsv4.ops import golden
    from dsv4.ops.triton.sparse_attention import sparse_attention

    q, kv, sink, idx, scale = golden.realistic_attention_inputs(0, 64)
    want = golden.attention_fp32(q.double(), kv.double(), sink.double(), idx, scale, acc=torch.float64)
    tiled = golden.attention_tiled(q, kv, sink, idx, scale, block_k)
    o = sparse_attention(q.cuda(), kv.cuda(), sink.cuda(), idx.int().cuda(), scale, block_k=block_k,
                         splits=splits).cpu()
    assert o.dtype == torch.bfloat16
    assert golden.distance(o, want)["rel_err"] <= 3e-3
    assert golden.distance(o, tiled)["rel_err"] <= 5e-3
    # The same 64 queries as a decode batch (b = 64, s = 1, each row its own copy of the cache; splits by default).
    dq, dkv = q.view(64, 1, 64, 512).cuda(), kv.expand(64, -1, -1).contiguous().cuda()
    o = sparse_attention(dq, dkv, sink.cuda(), idx.view(64, 1, -1).cuda(), scale, block_k=block_k).cpu()
    assert golden.distance(o.view_as(want), want)["rel_err"] <= 3e-3


@pytest.mark.gpu
def test_dispatched_op_takes_the_kernel_for_prefill_and_decode_on_cuda():
    """`ops.sparse_attention` runs the kernel (64 heads per program, 32-row tiles) for a bf16 chunk of several
    queries on CUDA, within the tiled class of float64, and for one query per sequence (decode) too, where a
    sequence's output is the same bits alone or in a batch of 3; the reference switch runs the twin, bit-identical
    to calling it directly."""
    from dsv4 import ops
    from dsv4.ops import golden

    q, kv, sink, idx, scale = (t.cuda() if torch.is_tensor(t) else t for t in golden.realistic_attention_inputs(0, 64))
    want = golden.attention_fp32(q.double(), kv.double(), sink.double(), idx, scale, acc=torch.float64)
    with torch.inference_mode():                                      # as the model runs (no autograd kernel)
        fast = ops.sparse_attention(q, kv, sink, idx, scale)
        twin = ops.sparse_attention.twin(q, kv, sink, idx, scale)
        with ops.reference_only("sparse_attention"):
            assert torch.equal(ops.sparse_attention(q, kv, sink, idx, scale), twin)
        one = (q[:, :1], kv, sink, idx[:, :1], scale)
        alone = ops.sparse_attention(*one)
        assert not torch.equal(alone, ops.sparse_attention.twin(*one))           # decode: the kernel too
        three = (q[:, :3].transpose(0, 1).contiguous(), kv.expand(3, -1, -1).contiguous(), sink,
                 idx[:, :3].transpose(0, 1).contiguous(), scale)              # 3 sequences of one query each
        batched = ops.sparse_attention(*three)
        assert torch.equal(batched[:1], alone)                                # batch-invariant
    assert golden.distance(fast.cpu(), want.cpu())["rel_err"] <= 3e-3
    assert not torch.equal(fast, twin)                                # the kernel ran, not the twin
    assert torch.equal(ops.sparse_attention(q, kv, sink, idx, scale), twin)      # autograd on: the twin


@pytest.mark.gpu
def test_dense_tail_takes_the_kernel_in_inference_on_cuda():
    """HCA in inference on CUDA: `ops.sparse_attention_dense_tail` runs the kernel over the definition's rows and
    lists, the same bits as `ops.sparse_attention` over that layout (what the fixed decode step calls), within the
    tiled class of float64; with autograd on it takes the training form."""
    from dsv4 import ops
    from dsv4.ops import golden, ref

    q, kv, sink, idx, scale = (t.cuda() if torch.is_tensor(t) else t for t in golden.realistic_attention_inputs(0, 64))
    kv, tail = kv[:, :704], kv[:, 704:]                                  # 704 window/picked rows, 64 entries
    idx = torch.where(idx < 704, idx, -1)
    visible = (torch.arange(64, device="cuda") + 1).view(1, 64)           # query i sees i + 1 entries
    args = (q, kv, sink, idx, tail, visible, scale)
    rows, lists = ref.dense_tail_lists(kv, idx, tail, visible)
    want = golden.attention_fp32(q.double(), rows.double(), sink.double(), lists, scale, acc=torch.float64)
    with torch.inference_mode():
        assert ops.registry.which("sparse_attention_dense_tail", *args) == "triton_sparse_attention_dense_tail"
        fast = ops.sparse_attention_dense_tail(*args)
        assert torch.equal(fast, ops.sparse_attention(q, rows, sink, lists, scale))
        assert not torch.equal(fast, ops.sparse_attention_dense_tail.twin(*args))     # the kernel ran
    assert golden.distance(fast.cpu(), want.cpu())["rel_err"] <= 3e-3


def test_split_count_depends_on_the_sequence_not_on_the_batch():
    """The splits set the merge order of a query's partial softmaxes: the same query must get the same count alone
    (general step, batch 1) and batched (fixed decode step, batch B). Planned from one sequence's programs."""
    from dsv4.ops.triton.sparse_attention import MAX_SPLITS, plan_splits

    sms = 132
    for s, heads, tiles in [(1, 1, 20), (1, 4, 20), (3, 1, 20), (1, 1, 2), (512, 1, 20)]:
        got = plan_splits(s * heads, tiles, sms)
        assert 1 <= got <= min(tiles, MAX_SPLITS)
        assert got == (1 if s * heads >= 2 * sms else min(tiles, MAX_SPLITS, -(-2 * sms // (s * heads))))
    src = (Path(dsv4.__file__).parent / "ops" / "triton" / "sparse_attention.py").read_text()
    assert "default_splits(s * heads," in src and "default_splits(b *" not in src


def test_kernel_tiles_depend_on_the_sequence_not_on_the_batch():
    """The dispatched kernel's tiles come from (queries per sequence, heads) alone; decode-sized chunks run unsplit
    with 16-head, 64-row tiles (the micro-benchmark's best at Flash decode), longer chunks the prefill tiles."""
    import inspect

    import dsv4.ops.attention as attention
    from dsv4.ops.attention import DECODE_QUERIES, kernel_config

    assert list(inspect.signature(kernel_config).parameters) == ["s", "h"]
    for s in range(1, DECODE_QUERIES + 1):
        assert kernel_config(s, 64) == {"block_h": 16, "block_k": 64, "num_warps": 4, "num_stages": 2, "splits": 1}
    assert kernel_config(DECODE_QUERIES + 1, 64)["block_h"] == 64 and kernel_config(512, 64)["splits"] is None
    assert kernel_config(512, 8)["block_h"] == 16
    assert "**kernel_config(q.shape[1], q.shape[2])" in inspect.getsource(attention)      # what the custom op runs


def test_bench_script_counts_the_bytes_a_fused_kernel_must_move():
    """scripts/bench/sparse_attention.py's GB/s: q and out once, the index list, each visible row once per query."""
    from bench_scripts import load

    bench = load("sparse_attention", "sparse_attention_bench")
    q = torch.zeros(2, 3, bench.H, bench.D, dtype=torch.bfloat16)
    idx = torch.tensor([[[0, -1, 4], [1, 1, -1], [-1, -1, -1]]] * 2, dtype=torch.int32)
    assert bench.min_bytes(q, idx) == 2 * q.numel() * 2 + idx.numel() * 4 + 8 * bench.D * 2
    assert (bench.H, bench.D, bench.WINDOW + bench.PICKED) == (64, 512, 640)
