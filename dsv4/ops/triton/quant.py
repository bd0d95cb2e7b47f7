"""FP8 e4m3 fake quantisation (the QAT emulation of every FP8/FP4 linear's input and of the KV cache) in one
kernel: per block, the power-of-two scale 2^ceil(log2(amax/448)) and round-to-nearest-even onto the e4m3 grid,
both in exact integer/fp32 arithmetic, so the result is bit-identical to `dsv4.quant.fake_quant_fp8` on any
device (no hardware FP8 conversion is involved, which also lets the CPU interpreter check it bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.triton.fp4_grouped import _e8m0


@triton.jit
def fp8_block_round(x, amax):
    """fp32 x -> its FP8 fake-quant value (fp32, exact) given amax = max(block amax, 1e-4), broadcastable to x (a
    scalar for a 1-D block, [rows, 1] for per-row blocks of a 2-D tile). Shared with the FP8 GEMV's fused act quant."""
    q, s = fp8_block_quant(x, amax)
    return q * s


@triton.jit
def fp8_block_quant(x, amax):
    """(q, s): q the e4m3 code's value (fp32, exactly on the e4m3 grid), s the power-of-two scale (shaped like
    amax), so that q * s is `fp8_block_round(x, amax)`; what an FP8 GEMM multiplies."""
    # e = ceil(log2(amax / 448)) from the bits of an estimate, then corrected with exact comparisons.
    t = amax / 448.0
    tb = t.to(tl.int32, bitcast=True)
    e = ((tb >> 23) & 0xFF) - 127 + ((tb & 0x7FFFFF) != 0).to(tl.int32)
    s = ((e + 127) << 23).to(tl.float32, bitcast=True)
    up = amax > 448.0 * s
    e = tl.where(up, e + 1, e)
    down = amax <= 448.0 * (((e - 1 + 127) << 23).to(tl.float32, bitcast=True))
    e = tl.where(down, e - 1, e)
    s = ((e + 127) << 23).to(tl.float32, bitcast=True)
    v = tl.minimum(tl.maximum(x / s, -448.0), 448.0)
    a = tl.abs(v)
    # e4m3 keeps 3 mantissa bits: round the fp32 bits to nearest even at bit 20; below 2^-6 (subnormal) the
    # quantum is 2^-9, rounded by fp32 addition of 2^14 (also nearest even).
    ab = a.to(tl.int32, bitcast=True)
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    sub = (a + 16384.0) - 16384.0
    q = tl.where(a < 0.015625, sub, normal)
    # The sign goes back as a bit: -0.0 where a small negative rounds to zero (Triton's `-q` is `0 - q`, +0.0).
    sign = v.to(tl.int32, bitcast=True) & -2147483648
    q = (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return q, s


# Elements per program (4 warps): a tile of TILE // block rows x one block. One block per program (the first
# version) gave 128 threads one element each: an 8k Flash-width prefill spent 4.4 ms in 29 act quants and 2.7 ms in
# 14 fake quants (bench/results/h100_s28/call_c/profile.log), ~5x their bytes' time; 16 rows x 128 gives each thread
# 16 contiguous elements (vector loads) and the scales of a tile one coalesced store. Measured (H100,
# scripts/bench/quant_kernels.py): act quant 8192 x 4096 42 us, fake quant 52 us, 72-80 % of their bytes' time.
TILE = 2048


def _rows_per_program(block: int) -> int:
    return max(TILE // block, 1)


@triton.jit
def _fake_quant_fp8(x_ptr, y_ptr, n_rows, n_cols, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    mask = rows[:, None] < n_rows
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1, keep_dims=True), 1e-4)
    tl.store(y_ptr + offs, fp8_block_round(x, amax).to(y_ptr.dtype.element_ty), mask=mask)


def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Same contract as `dsv4.quant.fake_quant_fp8` for bf16 / fp16 / fp32 x (last dim a multiple of block)."""
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    assert x.shape[-1] % block == 0 and block & (block - 1) == 0, (x.shape, block)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(flat)
    if flat.numel():
        rows = _rows_per_program(block)
        _fake_quant_fp8[(triton.cdiv(flat.shape[0], rows), flat.shape[1] // block)](
            flat, out, flat.shape[0], flat.shape[1], BLOCK=block, ROWS=rows)
    return out.view(x.shape)


@triton.jit
def _act_quant_fp8(x_ptr, q_ptr, s_ptr, n_rows, n_cols, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    kb = tl.program_id(1)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    mask = rows[:, None] < n_rows
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q, s = fp8_block_quant(x, tl.maximum(tl.max(tl.abs(x), axis=1, keep_dims=True), 1e-4))
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    # column-major [rows, blocks]: what scaled_mm takes
    tl.store(s_ptr + kb.to(tl.int64) * n_rows + rows[:, None], s, mask=mask)


def act_quant_fp8(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """`dsv4.quant.act_quant` on CUDA in one launch: x [M, K] bf16/fp32 -> (float8_e4m3fn [M, K], fp32 scales
    [M, K/block] in column-major strides). The codes are exact (q is on the e4m3 grid before the cast)."""
    assert x.dim() == 2 and x.shape[1] % block == 0, (x.shape, block)
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(K // block, M, dtype=torch.float32, device=x.device)
    if M:
        rows = _rows_per_program(block)
        _act_quant_fp8[(triton.cdiv(M, rows), K // block)](x, q, s, M, K, BLOCK=block, ROWS=rows)
    return q, s.t()


@triton.jit
def _e8m0_to_float(s_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, _e8m0(tl.load(s_ptr + offs, mask=mask, other=127)), mask=mask)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """`dsv4.quant.e8m0.e8m0_to_float` in one launch (its bit placement: 2^(b - 127), byte 0 the subnormal 2^-127,
    255 NaN), bit for bit. The FP8 prefill linear converts its weight's scales at every call; torch's ~8
    elementwise kernels for it were ~1.3 us each inside the opaque linear op, 29 calls a step (~0.3 ms of the 1k
    prefill, bench/results/h100_s28/call_c/profile.log)."""
    src = scale.contiguous().view(torch.uint8)
    out = torch.empty(scale.shape, dtype=torch.float32, device=scale.device)
    if src.numel():
        _e8m0_to_float[(triton.cdiv(src.numel(), 1024),)](src, out, src.numel(), BLOCK=1024)
    return out
