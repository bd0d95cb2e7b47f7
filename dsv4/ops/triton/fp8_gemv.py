"""FP8 block-scaled GEMV for decode (small M) reading the stored e4m3 bytes: y [M, N] = act(x) [M, K] @ W^T.

W is float8_e4m3fn [N, K] with one e8m0 scale per 128x128 block; the kernel loads the bytes as int32 words (four
codes each; byte J meets x's columns 4i + J) and decodes e4m3 by bit placement (no hardware FP8 conversion, so
the CPU interpreter checks it exactly), which reads half the bytes of today's cached bf16 copy
(`ops/cached_linear.py`). The decode costs a few integer ops per element. SASS for sm_90 at M = 1, all told per
weight element: 12.7 instructions (block_n 32, no act quant; 17 when each lane held one byte), with the fused act
quant 22 (block_n 32) / 15 (64) / 12 (128), its cost shared by the block's columns. At 4.2 TB/s an H200 issues
~8 per byte, so the M = 1 kernel may still be issue-bound below the copy bandwidth; the bench will tell.
With `act_quant_on`, x is fake-quantised per 128 in the kernel by the same exact arithmetic as
`ops/triton/quant.py` (`fp8_block_round`, bit-identical to `dsv4.quant.fake_quant_fp8`). Per 128-wide K block,
the exact products x * e4m3 (bf16/FP8 x times an e4m3 value: at most 8 + 4 significant bits) are summed in fp32
and the block sum is multiplied by the weight block's power-of-two scale, as the reference's blockwise kernel
does; the output is rounded once to x's dtype.
Precision class: fp32 accumulation of exact products; before the output rounding the error against a float64
product of the same operands is <= (128 + K/128 + splits + 1) * 2^-24 * sum_k |x_k w_k| (<= 1e-5 of it up to
K = 1024, <= 2e-5 up to K = 8192); after it, within one ulp (of x's dtype) of the twin `ops.ref.linear` plus that.

Two inner products: DOT=False multiplies the decoded tile with each row of x in turn (broadcast + tl.sum, the
GEMV shape for M of 1 to a few); DOT=True runs tl.dot over 16-row blocks (bf16 operands, exact for e4m3 and bf16
/ FP8 x; fp32 x in IEEE mode). Split-K spreads few output columns over enough programs to fill the GPU; the
partial sums are added in a fixed order (deterministic, no atomics).

Measured on an H200 (a micro-benchmark since replaced by scripts/bench/fp8_linear.py;
bench/results/h200_fp8_gemv.log, a partial sweep): at M = 1 it
reaches 0.05-0.35 of the copy bandwidth (wq_b 32768 x 1024: 23 us; wo_b 4096 x 8192: 28 us), while cuBLAS over the
bf16 copies takes ~6-20 us per call inside the decode step (bench/results/h200_v7_profile_kernels.log; the script's
"cached bf16" column also times the act-quant twin, so it overstates the copies' cost). Not dispatched: at M = 1 it
is issue-bound below the bandwidth, as the instruction count above predicted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.triton.fp4_grouped import _e8m0
from dsv4.ops.triton.quant import fp8_block_round

BLOCK_K = 128                                   # = the weight's scale block and the act-quant block
# A quiet NaN as fp32 bits: a float("nan") global fails Triton's "global changed since compiled" check on every
# launch after the first (NaN != NaN).
_NAN_BITS = tl.constexpr(0x7FC00000)
_TWO_POW_120 = tl.constexpr(2.0**120)


@triton.jit
def _e4m3_lane(word, J: tl.constexpr):
    """Byte J (element 4i + J, little-endian) of int32 words of e4m3 codes -> fp32, by bit placement: exponent and
    mantissa (bits 6-0) go to fp32 bits 26-20 and the sign to bit 31, which is the e4m3 value times 2^-120 (an
    fp32 subnormal for an e4m3 subnormal, still exact); one exact multiply by 2^120 (no flush-to-zero in Triton's
    fp32 multiply) finishes it, with no subnormal branch. -0.0 stays -0.0. NaN codes (0x7F, 0xFF) come out as
    +-480: `_nan_codes` flags them. A few integer ops per element, so the decode keeps up with HBM."""
    if J == 0:
        mag, sign = word << 20, word << 24
    elif J == 1:
        mag, sign = word << 12, word << 16
    elif J == 2:
        mag, sign = word << 4, word << 8
    else:
        mag, sign = word >> 4, word
    bits = (mag & 0x07F00000) | (sign & -2147483648)
    return bits.to(tl.float32, bitcast=True) * _TWO_POW_120


@triton.jit
def _nan_codes(word):
    """Non-zero where a word holds a NaN code (low 7 bits all set): adding 1 to each masked byte carries into
    its bit 7 only then (no carry leaves a byte: each is <= 0x7F)."""
    return ((word & 0x7F7F7F7F) + 0x01010101) & -2139062144           # 0x80808080


@triton.jit
def _x_lanes(x_ptr, rows, M, K, at_k, ACT_QUANT: tl.constexpr):
    """x[rows, at_k + J] for J = 0..3 ([BLOCK_M, 32] each, fp32, zero rows past M): the K columns that meet
    byte J of the weight words; fake-quantised to FP8 per 128 (the four parts share one amax) when ACT_QUANT."""
    at = x_ptr + rows[:, None].to(tl.int64) * K + at_k[None, :]
    ok = rows[:, None] < M
    x0 = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(at + 1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(at + 2, mask=ok, other=0.0).to(tl.float32)
    x3 = tl.load(at + 3, mask=ok, other=0.0).to(tl.float32)
    if ACT_QUANT:
        amax = tl.maximum(tl.maximum(tl.max(tl.abs(x0), axis=1), tl.max(tl.abs(x1), axis=1)),
                          tl.maximum(tl.max(tl.abs(x2), axis=1), tl.max(tl.abs(x3), axis=1)))
        amax = tl.maximum(amax, 1e-4)[:, None]
        x0, x1 = fp8_block_round(x0, amax), fp8_block_round(x1, amax)
        x2, x3 = fp8_block_round(x2, amax), fp8_block_round(x3, amax)
    return x0, x1, x2, x3


@triton.jit
def _dot4(x0, x1, x2, x3, w0, w1, w2, w3, IEEE: tl.constexpr):
    """sum_J x_J @ w_J^T over the four byte lanes: [BLOCK_M, BLOCK_N] fp32."""
    if IEEE:                                                          # fp32 x: no TF32 rounding of operands
        part = tl.dot(x0, tl.trans(w0), input_precision="ieee")
        part = tl.dot(x1, tl.trans(w1), part, input_precision="ieee")
        part = tl.dot(x2, tl.trans(w2), part, input_precision="ieee")
        part = tl.dot(x3, tl.trans(w3), part, input_precision="ieee")
    else:                                                             # bf16 operands: exact (see the docstring)
        part = tl.dot(x0.to(tl.bfloat16), tl.trans(w0).to(tl.bfloat16))
        part = tl.dot(x1.to(tl.bfloat16), tl.trans(w1).to(tl.bfloat16), part)
        part = tl.dot(x2.to(tl.bfloat16), tl.trans(w2).to(tl.bfloat16), part)
        part = tl.dot(x3.to(tl.bfloat16), tl.trans(w3).to(tl.bfloat16), part)
    return part


@triton.jit
def _fp8_gemv(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, KB_PER_SPLIT: tl.constexpr, ACT_QUANT: tl.constexpr,
              DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)        # N is a multiple of BLOCK_N: no mask
    split = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, 32)                                         # the 32 words of a 128-wide K block
    n_kb = K // 128
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    nan = tl.zeros([BLOCK_N, 32], dtype=tl.int32)
    for i in range(0, KB_PER_SPLIT):                                  # splits divide K // 128
        kb = split * KB_PER_SPLIT + i
        word = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * (K // 4) + kb * 32 + offs_w[None, :])
        nan |= _nan_codes(word)
        w0, w1, w2, w3 = _e4m3_lane(word, 0), _e4m3_lane(word, 1), _e4m3_lane(word, 2), _e4m3_lane(word, 3)
        scale = _e8m0(tl.load(s_ptr + (offs_n // 128) * n_kb + kb))   # [BLOCK_N]: one block row per column
        if DOT:
            x0, x1, x2, x3 = _x_lanes(x_ptr, rows, M, K, kb * 128 + 4 * offs_w, ACT_QUANT)
            acc += _dot4(x0, x1, x2, x3, w0, w1, w2, w3, IEEE) * scale[None, :]
        else:
            for m in tl.static_range(BLOCK_M):
                row = tl.program_id(2) * BLOCK_M + m + tl.arange(0, 1)
                x0, x1, x2, x3 = _x_lanes(x_ptr, row, M, K, kb * 128 + 4 * offs_w, ACT_QUANT)
                prod = w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3           # [BLOCK_N, 32]: exact products
                part = tl.sum(prod, axis=1) * scale                   # [BLOCK_N]
                acc = tl.where(tl.arange(0, BLOCK_M)[:, None] == m, acc + part[None, :], acc)
    # A NaN weight makes its whole output column NaN (x * NaN is NaN even for x = 0), as in the twin.
    nan_value = tl.full([BLOCK_M, BLOCK_N], _NAN_BITS, tl.int32).to(tl.float32, bitcast=True)
    acc = tl.where(tl.max((nan != 0).to(tl.int32), axis=1)[None, :] != 0, nan_value, acc)
    out = out_ptr + split.to(tl.int64) * M * N + rows[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] < M)


@triton.jit
def _sum_splits(part_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum over the K splits of the fp32 partials, in split order (deterministic), rounded once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for k in tl.static_range(1, SPLIT):
        acc += tl.load(part_ptr + k * MN + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def auto_split(n_tiles: int, device: torch.device, programs_per_sm: int) -> int:
    """K splits so that about `programs_per_sm` programs per SM run: a GEMV keeps the bytes in flight that the
    memory needs only with many programs (1 off CUDA: the interpreter gains nothing)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return -(-programs_per_sm * sms // n_tiles)


def divisor_at_most(n: int, want: int) -> int:
    """The largest divisor of n that is <= want (equal splits: every program runs the same K loop)."""
    return max(d for d in range(1, min(n, max(want, 1)) + 1) if n % d == 0)


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_n: int) -> None:
    K, N = x.shape[-1], weight.shape[0]
    if weight.dtype != torch.float8_e4m3fn or weight.shape != (N, K):
        raise ValueError(f"fp8_gemv: weight must be float8_e4m3fn [N, {K}], got {weight.dtype} {tuple(weight.shape)}")
    if N % 128 or K % 128 or tuple(scale.shape) != (N // 128, K // 128) or scale.element_size() != 1:
        raise ValueError(f"fp8_gemv: N, K must be multiples of 128 with an e8m0 scale [N/128, K/128]; got weight "
                         f"{tuple(weight.shape)}, scale {scale.dtype} {tuple(scale.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"fp8_gemv: x must be bf16 or fp32, got {x.dtype}")
    if not (weight.is_contiguous() and scale.is_contiguous()):
        raise ValueError("fp8_gemv: weight and scale must be contiguous (the kernel reads the weight as int32 words)")
    if 128 % block_n or block_n < 16:
        raise ValueError(f"fp8_gemv: block_n must divide 128 and be >= 16, got {block_n}")


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant_on: bool,
             out_dtype: torch.dtype | None = None, dot: bool | None = None, block_n: int = 32,
             split_k: int | None = None, programs_per_sm: int = 4, num_warps: int = 4) -> torch.Tensor:
    """`ops.ref.linear(x, weight, scale, "fp8", act_quant_on)` for x [..., K] bf16 / fp32; weight float8_e4m3fn
    [N, K], scale e8m0 [N/128, K/128], N and K multiples of 128. Output in `out_dtype` (default x's); fp32 gives
    the accumulator before the output rounding. dot=None picks tl.dot for M > 2 (a guess until measured);
    split_k=None splits K to run `programs_per_sm` programs per SM (a guess until measured); with more than one
    split a second small kernel adds the fp32 partials."""
    _check(x, weight, scale, block_n)
    K, N = x.shape[-1], weight.shape[0]
    flat = x.reshape(-1, K).contiguous()
    M = flat.shape[0]
    dot = M > 2 if dot is None else dot
    block_m = 16 if dot else min(16, triton.next_power_of_2(max(M, 1)))
    n_kb = K // BLOCK_K
    tiles = (N // block_n) * triton.cdiv(M, block_m)
    split = divisor_at_most(n_kb, split_k or auto_split(tiles, x.device, programs_per_sm))
    out = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    part = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    if M:
        grid = (N // block_n, split, triton.cdiv(M, block_m))
        _fp8_gemv[grid](flat, weight.view(torch.int32), scale.view(torch.uint8), part, M, N, K, n_kb // split,
                        ACT_QUANT=act_quant_on, DOT=dot, IEEE=x.dtype == torch.float32, BLOCK_M=block_m,
                        BLOCK_N=block_n, num_warps=num_warps)
        if split > 1:
            _sum_splits[(triton.cdiv(M * N, 1024),)](part, out, M * N, SPLIT=split, BLOCK=1024)
    return out.view(*x.shape[:-1], N)
