"""Micro-benchmark of the FP4 grouped GEMM (`ops/triton/fp4_grouped.py`) at the 1k-prefill shape of the bench
model (6144 sorted (token, expert) pairs over 256 experts, K 4096 -> N 2048) for several BLOCK_M, against
torch._grouped_mm over bf16 copies of the same experts. Usage: python3 scripts/bench/grouped_block_m.py"""

import torch

from dsv4.bench.timing import cuda_time, summary
from dsv4.ops.triton.fp4_grouped import fp4_grouped_gemm

E, N, K, M = 256, 2048, 4096, 6144
gen = torch.Generator("cuda").manual_seed(0)
w = torch.randint(-128, 128, (E, N, K // 2), dtype=torch.int8, device="cuda", generator=gen) & 0x77   # |v| <= 6
s = torch.full((E, N, K // 32), 120, dtype=torch.uint8, device="cuda").view(torch.float8_e8m0fnu)
eid = torch.randint(0, E, (M,), device="cuda", generator=gen).sort().values
x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
for bm in (16, 32, 64, 128):
    try:
        t = summary(cuda_time(lambda bm=bm: fp4_grouped_gemm(x, eid, w, s, block_m=bm), 5))
        print(f"fp4_grouped_gemm block_m={bm}: {t['median_s'] * 1e3:.2f} ms", flush=True)
    except Exception as e:           # a config that does not compile / fit: report and go on
        print(f"block_m={bm}: {type(e).__name__}: {str(e)[:200]}", flush=True)
offs = torch.bincount(eid, minlength=E).cumsum(0).to(torch.int32)
wb = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16, generator=gen)
t = summary(cuda_time(lambda: torch._grouped_mm(x, wb.transpose(1, 2), offs=offs), 5))
print(f"torch._grouped_mm bf16 copies: {t['median_s'] * 1e3:.2f} ms", flush=True)
