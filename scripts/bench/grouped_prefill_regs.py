"""Registers, spills and shared memory of the FP4 grouped GEMM kernels per config, compiled offline for sm_90
(H100/H200) with Triton's bundled ptxas: no GPU needed, so configs can be screened before a GPU session. Also the
SASS instructions per weight element of the expert-major kernel's K loop(s) (nvdisasm; the innermost loops that
hold an MMA, each iteration 128 x block_n weights over num_warps x 32 threads; a packed config also shows its
default-decode fallback loop; an FP8-MMA config (`ops/triton/fp4_prefill_fp8mma.py`) its per-32 loops with the
exact e8m0 decode (scale bytes 0 / 255) and without, and with `fold` the folded loop, the one with FMULs, in the
order ptxas lays them out).
The pointer and size arguments get the divisibility-by-16 hint a real launch gives them (K, N, the pointers);
without it there is no cp.async pipelining and the register counts mean nothing.
Usage: python3 scripts/bench/grouped_prefill_regs.py
"""

import re

import triton
from grouped_prefill import CONFIGS, FP8MMA_CONFIGS, PACKED_CONFIGS, K  # this directory is on sys.path as a script
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsv4.bench.sass import INSTRUCTION, disassemble, innermost_loops, ptxas_usage
from dsv4.ops.triton.fp4_grouped import _fp4_grouped_gemm
from dsv4.ops.triton.fp4_grouped_prefill import _fp4_grouped_prefill
from dsv4.ops.triton.fp4_prefill_fp8mma import _fp4_prefill_fp8mma

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*u8", "out_ptr": "*fp32"}


def usage(kernel) -> str:
    """ptxas -v on the kernel's PTX: registers per thread and spill bytes; Triton's shared memory per program."""
    regs, spill_st, spill_ld = _ptxas_usage(kernel)
    return f"{regs:>3} regs, spills {spill_st}/{spill_ld} B, smem {kernel.metadata.shared // 1024} KiB"


def _ptxas_usage(kernel) -> tuple[int, int, int]:
    return ptxas_usage(kernel.asm["ptx"])


def k_loops(kernel, block_n: int, num_warps: int) -> str:
    """Instructions per weight element of each innermost loop of the kernel's SASS that runs an MMA."""
    counts, _, local = _loop_counts(kernel, block_n, num_warps)
    return "K loop " + " / ".join(f"{c:.2f}" for c in counts) + f" instr/weight{' (spills in it)' if local else ''}"


def sass(kernel) -> list[str]:
    """The compiled kernel's SASS lines (Triton's bundled nvdisasm)."""
    return disassemble(kernel.asm["cubin"])


def _loop_counts(kernel, block_n: int, num_warps: int) -> tuple[list[float], str, bool]:
    """(instructions per weight element of each innermost MMA loop, the first MMA instruction's name, whether any
    of those loops touches local memory: spills inside the K loop)."""
    per_thread = 128 * block_n / (num_warps * 32)
    counts, mma, local = [], "", False
    for body in innermost_loops(sass(kernel)):
        if any("MMA" in line for line in body):
            counts.append(sum(bool(INSTRUCTION.match(line)) for line in body) / per_thread)
            mma = mma or next(m.group(1) for line in body if (m := re.search(r"\s(\w*MMA[\w.]*)", line)))
            local = local or any(re.search(r"\s(LDL|STL)[\s.]", line) for line in body)
    return counts, mma, local


def fp8mma_kernel(block_m: int, block_n: int, num_warps: int, fold: bool, maxnreg: int | None = None):
    """The FP8-MMA variant compiled for sm_90 at the bench shape (K 4096), e4m3 x as a real launch passes it."""
    sig = {"xq_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "offs_ptr": "*i32", "w_ptr": "*i8", "s_ptr": "*u8",
           "out_ptr": "*fp32", "M": "i32", "N": "i32"}
    consts = {"K": K, "HALF": K // 2, "N_SCALES": K // 32, "BLOCK_M": block_m, "BLOCK_N": block_n, "FOLD": fold,
              "HW": True, "ASM": True, "TILED": False}
    return compiled(_fp4_prefill_fp8mma, sig, consts, 8, num_warps, maxnreg)


def fp8mma_report(block_m: int, block_n: int, num_warps: int, fold: bool, maxnreg: int | None = None) -> dict:
    """Registers, spill bytes, the MMA instruction, the K loops' instructions per weight element and whether they
    touch local memory (a test uses it: the hardware path compiles, nothing spilled inside the K loops)."""
    kernel = fp8mma_kernel(block_m, block_n, num_warps, fold, maxnreg)
    regs, spill_st, spill_ld = _ptxas_usage(kernel)
    counts, mma, local = _loop_counts(kernel, block_n, num_warps)
    return {"regs": regs, "spill_bytes": spill_st + spill_ld, "mma": mma, "loops": counts, "k_loop_spills": local}


def compiled(fn, signature: dict, constants: dict, hinted: int, num_warps: int, maxnreg: int | None = None):
    sig = {**signature, **{k: "constexpr" for k in constants}}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(hinted)}
    return triton.compile(ASTSource(fn, sig, constants, attrs), target=TARGET,
                          options={"num_warps": num_warps, "num_stages": 3,
                                                       **({"maxnreg": maxnreg} if maxnreg else {})})


def main() -> None:
    old = {"x_ptr": "*bf16", "eid_ptr": "*i64", "w_ptr": "*i8", "s_ptr": "*u8", "out_ptr": "*fp32", "M": "i32",
           "N": "i32", "K": "i32"}
    consts = {"HALF": K // 2, "N_SCALES": K // 32, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_B": 64, "IEEE": False,
              "TILED": False}
    print(f"{'fp4_grouped_gemm bm=16 bn=64 warps=4':<50} {usage(compiled(_fp4_grouped_gemm, old, consts, 8, 4))}")
    new = {"x_ptr": "*bf16", "xh_ptr": "*fp16", "xs_ptr": "*fp32", "offs_ptr": "*i32", "w_ptr": "*i8",
           "s_ptr": "*u8", "out_ptr": "*fp32", "N": "i32", "K": "i32"}
    for bm, bn, nw, gs, join in CONFIGS:
        consts = {"HALF": K // 2, "N_SCALES": K // 32, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_B": 64, "IEEE": False,
                  "GROUP_SCALES": gs, "JOIN": join, "PACKED": False, "ASM": False, "TILED": False}
        name = f"prefill bm={bm} bn={bn} warps={nw}{' group_scales' if gs else ''}{' join' if join else ''}"
        kernel = compiled(_fp4_grouped_prefill, new, consts, 9, nw)
        print(f"{name:<50} {usage(kernel)}, {k_loops(kernel, bn, nw)}", flush=True)
    for bm, bn, nw in PACKED_CONFIGS:
        consts = {"HALF": K // 2, "N_SCALES": K // 32, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_B": 64, "IEEE": False,
                  "GROUP_SCALES": True, "JOIN": True, "PACKED": True, "ASM": True, "TILED": False}
        name = f"prefill PACKED bm={bm} bn={bn} warps={nw}"
        kernel = compiled(_fp4_grouped_prefill, new, consts, 9, nw)
        print(f"{name:<50} {usage(kernel)}, {k_loops(kernel, bn, nw)}", flush=True)
    for bm, bn, nw, fold, cap in FP8MMA_CONFIGS:
        kernel = fp8mma_kernel(bm, bn, nw, fold, cap)
        name = f"prefill FP8MMA{' fold' if fold else ''} bm={bm} bn={bn} warps={nw}{f' maxnreg={cap}' if cap else ''}"
        print(f"{name:<50} {usage(kernel)}, {k_loops(kernel, bn, nw)}", flush=True)


if __name__ == "__main__":
    main()
