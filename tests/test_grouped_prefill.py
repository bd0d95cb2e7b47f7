"""The expert-major FP4 grouped GEMM for prefill (`ops/triton/fp4_grouped_prefill.py`), called directly: it is not
in the default dispatch until it is measured.

Tolerances by precision class (as for `fp4_grouped_gemm`): exact operands (FP4 values times powers of two, fp32 or
FP8-quantised bf16 activations), fp32 accumulation in another order than the float64 twin: relative error
(Frobenius) <= 1e-5. The FP4/e8m0 decoding itself is checked bit-exactly.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import run_in_interpreter

from dsv4 import ops
from dsv4.quant import fake_quant_fp8, quant_fp4

prefill = pytest.importorskip("dsv4.ops.triton.fp4_grouped_prefill", reason="needs triton")


def test_expert_offsets_on_the_device_and_their_checks():
    """Row ranges per expert, empty experts (first, middle, last) included; unsorted or out-of-range ids raise
    (on CPU `_assert_async` raises at once; on CUDA it fails the stream, no host sync)."""
    eid = torch.tensor([1, 1, 1, 3, 4, 4, 6])
    offs = prefill.expert_offsets(eid, 8)
    assert offs.dtype == torch.int32 and offs.tolist() == [0, 0, 3, 3, 4, 6, 6, 7, 7]
    assert prefill.expert_offsets(eid[:0], 3).tolist() == [0, 0, 0, 0]
    for bad in ([1, 3, 2], [-1, 0], [0, 8]):
        with pytest.raises(RuntimeError, match="sorted and within"):
            prefill.expert_offsets(torch.tensor(bad), 8)


def test_wrapper_names_mismatched_inputs():
    w, s = torch.zeros(3, 16, 64, dtype=torch.int8), torch.zeros(3, 16, 4, dtype=torch.uint8)
    x, eid = torch.zeros(5, 128), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="do not match"):
        prefill.fp4_grouped_gemm_prefill(x[:, :64], eid, w, s)
    with pytest.raises(ValueError, match="block_k"):
        prefill.fp4_grouped_gemm_prefill(x, eid, w, s, block_k=96)
    with pytest.raises(ValueError, match="int32/int64"):
        prefill.fp4_grouped_gemm_prefill(x, eid.float(), w, s)


_KERNEL_CHECK = """
import torch
from dsv4 import ops
from dsv4.ops.triton.fp4_grouped_prefill import fp4_grouped_gemm_prefill as gemm
from dsv4.quant import quant_fp4
gen = torch.Generator().manual_seed(31)
ws = [quant_fp4(torch.randn(80, 256, generator=gen) / 16) for _ in range(8)]
w, s = torch.stack([a for a, _ in ws]), torch.stack([b for _, b in ws])
# 83 rows (not a multiple of 32 or 64); experts 0, 2, 5, 7 have no rows; expert 4 owns rows 4..73, three row
# tiles at block_m=32 (the first starts mid-tile of the row grid, the last is partial); N = 80 is not a multiple
# of block_n = 32 or 64.
eid = torch.tensor([1] * 3 + [3] + [4] * 70 + [6] * 9)
x = torch.randn(83, 256, generator=gen)
want = ops.grouped_linear.twin(x, eid, w, s, 'fp4')
errs = [gemm(x, eid, w, s, block_m=32, block_n=32), gemm(x, eid.int(), w, s, block_m=64, block_k=256),
        gemm(x, eid, w, s, block_m=16, block_n=128), gemm(x, eid, w, s, block_m=32, group_scales=False),
        gemm(x, eid, w, s, block_m=32, join=False), gemm(x, eid, w, s, block_n=32, group_scales=False, join=False)]
# decoding, exactly: one-hot rows read back every code (both nibbles) under scale bytes 0 (2^-127), 1, ..., 160;
# 128 rows of one expert = two row tiles, each decoding the weights again
codes = torch.arange(16 * 128 * 8, dtype=torch.int32).view(16, 128, 8) % 16
wq = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8).view(torch.int8).view(1, 16, 4 * 128)
sq = torch.tensor([0, 1, 100, 127, 140, 160], dtype=torch.uint8)[torch.arange(16 * 32).view(1, 16, 32) % 6]
sq = sq.view(torch.float8_e8m0fnu)
eye = torch.eye(1024)[:128]
exact = True
for opts in ({}, {'group_scales': False, 'join': False}):
    got = torch.cat([gemm(eye.roll(128 * i, 1), torch.zeros(128, dtype=torch.long), wq, sq, **opts) for i in range(8)])
    exact &= torch.equal(got, ops.dequant_weight(wq[0], sq[0], 'fp4').T)
# a NaN scale in the one-row expert 3: its row tile also covers expert 4's rows (zeroed, times NaN), never stored
s[3, 7, 2] = torch.tensor(255, dtype=torch.uint8).view(s.dtype)
for opts in ({}, {'group_scales': False, 'join': False}):
    nan = gemm(x, eid, w, s, block_m=32, block_n=32, **opts).isnan()
    exact &= torch.equal(nan, ops.grouped_linear.twin(x, eid, w, s, 'fp4').isnan()) and nan.sum().item() == 1
print(exact, *[((got - want).norm() / want.norm()).item() for got in errs])
"""


def test_fp4_grouped_prefill_kernel_in_the_interpreter(tmp_path):
    """The kernel's logic on CPU through TRITON_INTERPRET=1 (set before triton is imported, hence a subprocess;
    PYTHONPATH so it imports this checkout's dsv4), with fp32 activations (the interpreter's bf16 tl.dot is wrong
    in triton 3.6): against the `grouped_linear` twin, rel. error <= 1e-5, over empty experts, an expert over
    several row tiles, partial row and column tiles, each switch on and off; every FP4 code and several scale bytes
    decoded exactly."""
    out = run_in_interpreter(_KERNEL_CHECK, tmp_path, timeout=300)
    exact, *errs = out.split()[-7:]
    assert exact == "True" and max(float(v) for v in errs) <= 1e-5, out


@pytest.mark.gpu
def test_fp4_grouped_prefill_on_cuda_at_flash_dims():
    """Flash w1/w3 shape (K=4096, N=2048, E=256) at the 1k-prefill pair count (1024 tokens x top-6), bf16
    activations FP8-quantised as the model feeds them: operands exact in bf16, products exact in fp32, only the
    fp32 accumulation order differs: rel. error (Frobenius) <= 1e-5 against the twin and the 16-row-block kernel.
    Captured in a CUDA graph and replayed with other expert ids (the offsets are found on the device)."""
    from dsv4.ops.triton.fp4_grouped import fp4_grouped_gemm

    dev, gen = "cuda", torch.Generator("cuda").manual_seed(32)
    pairs = [quant_fp4(torch.randn(2048, 4096, generator=gen, device=dev) / 64) for _ in range(256)]
    w, s = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    ids = torch.rand(1024, 256, generator=gen, device=dev).topk(6, dim=-1).indices.flatten()
    eid = ids.sort(stable=True).values
    x = fake_quant_fp8(torch.randn(6144, 4096, generator=gen, device=dev), 128).bfloat16()

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    got = prefill.fp4_grouped_gemm_prefill(x, eid, w, s)
    assert rel(got, ops.grouped_linear.twin(x, eid, w, s, "fp4")) <= 1e-5
    assert rel(got, fp4_grouped_gemm(x, eid, w, s)) <= 1e-5
    graph, eid_in = torch.cuda.CUDAGraph(), eid.clone()
    with torch.cuda.graph(graph):
        out = prefill.fp4_grouped_gemm_prefill(x, eid_in, w, s)
    eid_in.copy_(((eid + 7) % 256).sort().values)
    graph.replay()
    assert rel(out, fp4_grouped_gemm(x, eid_in, w, s)) <= 1e-5
