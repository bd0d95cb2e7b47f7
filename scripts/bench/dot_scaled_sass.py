"""Offline screen (no GPU): Triton's own microscaling dot, `tl.dot_scaled`, as an expert-major FP4 grouped GEMM,
compiled for sm_90 with Triton's bundled ptxas; prints registers, spills and SASS instructions per weight element
of the K loop, to set beside `grouped_prefill_regs.py`'s figures for the hand-written kernels.

Why: the stored expert format IS OCP MXFP4 (e2m1 two per byte, low nibble first, one e8m0 scale per 32 along K),
which `tl.dot_scaled` takes as it is; on Hopper Triton upcasts the e2m1 operand (scale applied) to bf16 in
registers for a bf16 wgmma. If the compiler's decode were cheaper than ours it would be the simplest fast path.
Outcome (twenty-fourth session, Triton 3.9 offline): 6.1-7.5 instructions per weight (swapped 16 x 64, 4 warps:
6.75; 16 x 128: 6.08; unswapped 64-128 row tiles: 7.2-7.5) against 4.6-5.3 for `fp4_grouped_swapped.py`'s korder
kernel at the same tiles: no better, so it was not taken to the GPU and nothing dispatches it (bench/NOTES.md).
Usage: python3 scripts/bench/dot_scaled_sass.py
"""

import triton
import triton.language as tl
from grouped_prefill_regs import K, _loop_counts, compiled, usage  # this directory is on sys.path as a script

# (block_m, block_n, block_k, num_warps, swap, fast_math): swap puts the weight in the dot's left slot (tokens = N)
CONFIGS = [(16, 64, 128, 4, True, False), (16, 64, 128, 4, True, True), (16, 128, 128, 4, True, True),
           (16, 128, 256, 8, True, True), (32, 64, 128, 4, True, True), (64, 64, 128, 4, False, True),
           (64, 128, 128, 8, False, True), (128, 128, 128, 8, False, True)]


@triton.jit
def _fp4_scaled(x_ptr, offs_ptr, w_ptr, s_ptr, out_ptr, N, K, HALF: tl.constexpr, N_SCALES: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
                FAST_MATH: tl.constexpr):
    e = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = e.to(tl.int64) * N + offs_n                                # [BLOCK_N] rows of the stacked weight
    offs_k, offs_b, offs_g = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_K // 2), tl.arange(0, BLOCK_K // 32)
    start, end = tl.load(offs_ptr + e), tl.load(offs_ptr + e + 1)
    m0 = start
    while m0 < end:                      # a while: the interpreter cannot range() over loaded scalars
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end                                           # rows past `end` are the next expert's
        x_row = x_ptr + offs_m[:, None].to(tl.int64) * K
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs_k[None, :], mask=m_ok[:, None], other=0.0)               # [BM, BK]
            sc = tl.load(s_ptr + rows[:, None] * N_SCALES + k0 // 32 + offs_g[None, :], mask=n_ok[:, None],
                         other=127)                                                                 # [BN, BK/32]
            if SWAP:
                w = tl.load(w_ptr + rows[:, None] * HALF + k0 // 2 + offs_b[None, :], mask=n_ok[:, None], other=0)
                acc = tl.dot_scaled(w.to(tl.uint8, bitcast=True), sc, "e2m1", tl.trans(x), None, "bf16", acc,
                                    fast_math=FAST_MATH)                                            # [BN, BM]
            else:
                w = tl.load(w_ptr + rows[None, :] * HALF + k0 // 2 + offs_b[:, None], mask=n_ok[None, :], other=0)
                acc = tl.dot_scaled(x, None, "bf16", w.to(tl.uint8, bitcast=True), sc, "e2m1", acc,
                                    fast_math=FAST_MATH)                                            # [BM, BN]
        # Masked rows (x = 0) times inf/NaN weights are NaN, but they are not stored.
        if SWAP:
            tl.store(out_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None], acc,
                     mask=m_ok[None, :] & n_ok[:, None])
        else:
            tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc,
                     mask=m_ok[:, None] & n_ok[None, :])
        m0 += BLOCK_M


def main() -> None:
    sig = {"x_ptr": "*bf16", "offs_ptr": "*i32", "w_ptr": "*i8", "s_ptr": "*u8", "out_ptr": "*fp32", "N": "i32",
           "K": "i32"}
    for bm, bn, bk, nw, swap, fast in CONFIGS:
        consts = {"HALF": K // 2, "N_SCALES": K // 32, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP": swap,
                  "FAST_MATH": fast}
        kernel = compiled(_fp4_scaled, sig, consts, 7, nw)
        counts, mma, local = _loop_counts(kernel, bn, nw)
        per_weight = " / ".join(f"{c * 128 / bk:.2f}" for c in counts)     # _loop_counts assumes 128 K a loop
        name = f"dot_scaled bm={bm} bn={bn} bk={bk} warps={nw}{' swap' if swap else ''}{' fast_math' if fast else ''}"
        print(f"{name:<55} {usage(kernel)}, K loop {per_weight} instr/weight, {mma}"
              f"{' (spills in it)' if local else ''}", flush=True)


if __name__ == "__main__":
    main()
