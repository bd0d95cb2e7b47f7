"""FP4 routed experts at decode batches on FP8 tensor cores, split over K: the FP8-MMA kernel's arithmetic
(`fp4_prefill_fp8mma`, the reference `fp4_gemm`'s own) laid out for a few rows per expert.

Why: at decode the MoE multiplies 1-6 rows per expert, so every kernel is a GEMV over the expert's weights, and the
time is the FP4 bytes' if the GPU keeps enough of them in flight and decodes them in fewer instructions than the
bytes' time allows (an H100 issues ~5 thread-instructions per FP4 weight at 3.35 TB/s). The kernels measured so far
miss both: the pair GEMV decodes on the CUDA cores at ~8.3 SASS instructions per weight (22 us a batch-1 call for
7.5 us of bytes), the swapped fp16 kernel at ~5.3 (575 us at batch 64 for ~270 us of bytes), and the expert-major
kernels give each program a whole K loop over 64-128 weight rows, so at batch 1 (6 experts) 100-200 programs wait
on their loads one 128-K block at a time. Here:
* the weight decode is the FP8-MMA kernel's: e2m1 nibbles -> e4m3 codes by bit placement (four codes per ~3 integer
  ops), one K = 32 FP8 wgmma per 32-K scale group from zero (offline ~2.9 SASS instructions per weight at 16 x 128);
* the K range is split over `split` programs, whose fp32 partials [split, M, N] the caller sums (in the compiled
  decode step the sum fuses into the consumer, SwiGLU or the combine), so a batch-1 call runs 6 x N / block_n x
  split programs instead of 6 x N / block_n;
* programs map to work directly: `pairs=True`, one per row (the MoE's pair rows, any order: row r's expert is
  eid[r]); else one per expert WITH rows (rows sorted by expert; program i finds the i-th such expert from the
  offsets), not one per expert of the 256, most of which exit at once at decode batches;
* the e8m0 scales: one load of the program's scale words first finds whether a byte 0 or 255 (2^-127, NaN) is
  among them (`_special_scales`); then the K loop decodes the bytes exactly, else by placing them in the fp32
  exponent (offline 3.3 -> 2.9 instructions per weight at 16 x 128).
Exactness: x on the FP8 grid per 128-K block (the MoE's act-quant emulation) becomes e4m3 codes and power-of-two
scales (`x_operand`, exact); every product of an e4m3 code and an e2m1 value is exact; scalings are powers of two.
On the GPU the FP8 MMA sums a sub-block's 32 products in its own accumulator, below fp32 (the reference kernel's
class, see `fp4_prefill_fp8mma`); in the CPU interpreter the dot is fp32 (IEEE). The fp32 sums over sub-blocks,
blocks and splits run in a fixed order: the result does not depend on the batch or on the other rows.
Measured (H100, bench/results/h100_s30, per call with x's operand and the sum): NOT the win predicted. bs1 29.4 us
against the pair GEMV's 22.8, bs8 146 against 139, bs64 565 against the swapped kernel's 572; 8-token tiles ran 2x
slower than 16 with Triton 3.6. Every tensor-core FP4 kernel lands at ~1.6 TB/s at bs64 whatever its instruction
count: the fetch pattern (BLOCK_N rows 2 KB apart, 64 bytes of each per step) is the limit. Over a tile-major copy
of the weights (each program's 128-K block one contiguous run; now `dsv4.ops.fp4_layout`, which every FP4 kernel
reads) the same kernel at 16 x 64 took bs8 to 111.5 us (-20 %) and bs64 to 439 us (-24 %, 2.08 TB/s). So the
kernel became the base of that layout; `unroll` (UNROLL blocks per loop step: each row's next 64 x UNROLL bytes
requested together) is the cheaper variant over the stored layout. Dispatch: the MoE's steps of at most
`ops.moe_pairs.DECODE_KERNEL_MAX_TOKENS` tokens with DSV4_FP4_DECODE_MMA=1 (opt-in: `decode_fp8mma_plan`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.fp4_layout import is_tiled
from dsv4.ops.triton.fp4_grouped import stack_dims
from dsv4.ops.triton.fp4_prefill_fp8mma import _per32_block, x_operand


@triton.jit
def _slot_rows(slot, eid_ptr, offs_ptr, E: tl.constexpr, E_POW2: tl.constexpr, PAIRS: tl.constexpr):
    """(expert, first row, end row) of program slot `slot`: row `slot` alone (PAIRS), or the slot-th expert that has
    rows (by its offsets; start == end for a slot past the last one)."""
    if PAIRS:
        e = tl.load(eid_ptr + slot).to(tl.int64)
        start = slot
        end = slot + 1
    else:
        ex = tl.arange(0, E_POW2)
        lo = tl.load(offs_ptr + ex, mask=ex < E, other=0)
        hi = tl.load(offs_ptr + ex + 1, mask=ex < E, other=0)
        active = (hi > lo).to(tl.int32)
        hit = (active > 0) & (tl.cumsum(active, axis=0) == slot + 1)
        e = tl.sum(tl.where(hit, ex, 0), axis=0).to(tl.int64)
        start = tl.sum(tl.where(hit, lo, 0), axis=0)
        end = tl.sum(tl.where(hit, hi, 0), axis=0)
    return e, start, end


@triton.jit
def _special_scales(s_ptr, rows, n_ok, kb0, BLOCKS: tl.constexpr, N_SCALES: tl.constexpr):
    """Does a scale byte 0 or 255 (the exact e8m0 decode's cases) sit in the rows' K range (128-K blocks kb0 ..
    kb0 + BLOCKS)? One load of the range's int32 words (a block's four bytes each); per word, a byte b is 0 or 255
    iff its bits 1-7 each equal the bit below, i.e. iff its byte of (w ^ (w << 1)) & 0xFEFEFEFE is zero, which the
    classic zero-byte test finds exactly."""
    words = tl.load(s_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (N_SCALES // 4) + kb0
                    + tl.arange(0, BLOCKS)[None, :], mask=n_ok[:, None], other=0x7F7F7F7F)
    v = (words ^ (words << 1)) & -16843010                               # 0xFEFEFEFE
    zero_byte = (v - 0x01010101) & ~v & -2139062144                      # 0x80808080
    return tl.max(tl.max((zero_byte != 0).to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _k_range(acc, xq_row, xs_ptr, offs_m, m_ok, M, w_ptr, s_ptr, row0, offs_n, n_ok, kb0, BLOCKS: tl.constexpr,
             HALF: tl.constexpr, N_SCALES: tl.constexpr, K: tl.constexpr, EXACT: tl.constexpr, TILED: tl.constexpr,
             UNROLL: tl.constexpr, HW: tl.constexpr, ASM: tl.constexpr):
    """acc plus the blocks kb0 .. kb0 + BLOCKS of the rows row0 + offs_n (expert row0 // N), UNROLL blocks a step.
    TILED: the weight is tile-major (`dsv4.ops.fp4_layout`)."""
    for k0 in range(kb0, kb0 + BLOCKS, UNROLL):
        for j in tl.static_range(UNROLL):
            kb = k0 + j
            xs = tl.load(xs_ptr + kb * M + offs_m, mask=m_ok, other=0.0)
            acc = _per32_block(acc, xq_row, xs, m_ok, w_ptr, s_ptr, row0 + offs_n, n_ok, kb, HALF, N_SCALES, K,
                               EXACT, False, HW, ASM, TILED)
    return acc


@triton.jit
def _fp4_decode_fp8mma(xq_ptr, xs_ptr, eid_ptr, offs_ptr, w_ptr, s_ptr, out_ptr, M, N, K: tl.constexpr,
                       HALF: tl.constexpr, N_SCALES: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr,
                       E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       PAIRS: tl.constexpr, HW: tl.constexpr, ASM: tl.constexpr, TILED: tl.constexpr = False,
                       UNROLL: tl.constexpr = 1):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    e, start, end = _slot_rows(tl.program_id(1), eid_ptr, offs_ptr, E, E_POW2, PAIRS)
    rows = e * N + offs_n                                             # [BLOCK_N] rows of the stacked weight
    split = tl.program_id(2)
    kb0 = split * BLOCKS_PER_SPLIT
    special = _special_scales(s_ptr, rows, n_ok, kb0, BLOCKS_PER_SPLIT, N_SCALES)   # (no rows: expert 0, unused)
    m0 = start
    while m0 < end:                 # (a while: no rows, no iteration)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        xq_row = xq_ptr + offs_m[:, None].to(tl.int64) * K
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)          # out^T tile
        if special:                 # the exact e8m0 decode in the loop (~0.4 instructions per weight more)
            acc = _k_range(acc, xq_row, xs_ptr, offs_m, m_ok, M, w_ptr, s_ptr, e * N, offs_n, n_ok, kb0,
                           BLOCKS_PER_SPLIT, HALF, N_SCALES, K, True, TILED, UNROLL, HW, ASM)
        else:                       # bytes 1 .. 254: placed in the fp32 exponent
            acc = _k_range(acc, xq_row, xs_ptr, offs_m, m_ok, M, w_ptr, s_ptr, e * N, offs_n, n_ok, kb0,
                           BLOCKS_PER_SPLIT, HALF, N_SCALES, K, False, TILED, UNROLL, HW, ASM)
        # masked rows (x = 0) times inf/NaN weights are NaN, but they are not stored
        at = out_ptr + (split * M + offs_m[None, :]).to(tl.int64) * N + offs_n[:, None]
        tl.store(at, acc * 64.0, mask=m_ok[None, :] & n_ok[:, None])      # 64: the codes' bias 2^-6
        m0 += BLOCK_M


def fp4_decode_fp8mma(x: torch.Tensor, eid: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      offs: torch.Tensor | None = None, split: int = 1, block_m: int = 16, block_n: int = 64,
                      num_warps: int = 4, num_stages: int = 3, asm: bool = True,
                      unroll: int = 1) -> torch.Tensor:
    """x [M, K] (on the FP8 grid per 128-K block for exact products; other x is act-quantised, as the reference's
    FP4 GEMM input), eid [M] expert per row, weight int8 [E, N, K/2] or tile-major (`dsv4.ops.fp4_layout`), scale
    e8m0 [E, N, K/32] -> fp32 partial sums
    [split, M, N] (their sum over dim 0 is x[m] @ W[eid[m]]^T). `offs` None: the rows are pairs, any order, one
    program per row; else rows sorted by expert with `offs` int32 [E + 1] their offsets (`expert_offsets`), one
    program per expert with rows. `split` must divide K / 128. block_n: weight rows per program (the wgmma's M, a
    multiple of 64); block_m: tokens per tile (its N, a power of two >= 8).
    `unroll`: 128-K blocks per loop step (dividing the blocks per split), the same sums in the same order."""
    M, K = x.shape
    E, N, half = stack_dims("fp4_decode_fp8mma", weight)
    if (half * 2 != K or K % 128 or tuple(scale.shape) != (E, N, K // 32) or eid.shape != (M,)
            or (offs is not None and offs.shape != (E + 1,))):
        raise ValueError(f"fp4_decode_fp8mma: x {tuple(x.shape)}, eid {tuple(eid.shape)}, weight "
                         f"{tuple(weight.shape)}, scale {tuple(scale.shape)}"
                         f"{'' if offs is None else f', offs {tuple(offs.shape)}'} do not fit [M, K], [M], "
                         f"[E, N, K/2], [E, N, K/32], [E + 1] with K a multiple of 128")
    if split < 1 or (K // 128) % split or block_n % 64 or block_m < 8 or block_m & (block_m - 1):
        raise ValueError(f"fp4_decode_fp8mma: split ({split}) must divide K / 128 ({K // 128}), block_n "
                         f"({block_n}) be a multiple of 64 and block_m ({block_m}) a power of two >= 8")
    if unroll < 1 or (K // 128 // split) % unroll:
        raise ValueError(f"fp4_decode_fp8mma: unroll ({unroll}) must divide the blocks per split ({K // 128 // split})")
    out = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    hw = x.device.type == "cuda"
    xq, xs = x_operand(x, False)
    slots = M if offs is None else min(M, E)
    _fp4_decode_fp8mma[(triton.cdiv(N, block_n), slots, split)](
        xq if hw else xq.view(torch.uint8), xs, eid.contiguous(), eid if offs is None else offs.contiguous(),
        weight.contiguous(), scale.contiguous().view(torch.uint8), out, M, N, K, half, K // 32, K // 128 // split,
        E, triton.next_power_of_2(E), BLOCK_M=block_m, BLOCK_N=block_n, PAIRS=offs is None, HW=hw,
        ASM=hw and asm, TILED=is_tiled(weight), UNROLL=unroll, num_warps=num_warps, num_stages=num_stages)
    return out
