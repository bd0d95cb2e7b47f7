"""SASS instructions per weight element in the K loop of the FP4 pair GEMV (`ops/triton/fp4_gemv.py`), default
decode vs the packed one, compiled offline for sm_90 (H100/H200) with Triton's bundled ptxas and nvdisasm: no GPU
needed. The loop body is the code between the backward branch and its target; each iteration covers
block_n x block_g x 32 weight elements, spread over num_warps x 32 threads. Also prints registers / spills.
At 4.2 TB/s and ~1.98 GHz x 132 SMs x 4 schedulers an H200 issues ~1e15 warp-instructions/s x 32 lanes, i.e. about
4 instructions per FP4 element (8 per byte) if the kernel is to keep up with HBM.
Usage: python3 scripts/bench/fp4_gemv_sass.py
"""

import collections
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsv4.bench.sass import OPCODE, disassemble, ptxas_usage
from dsv4.ops.triton.fp4_gemv import _fp4_pair_gemv

SIG = {"x_ptr": "*bf16", "ids_ptr": "*i64", "w_ptr": "*i32", "s_ptr": "*u8", "out_ptr": "*fp32", "N": "i32",
       "K": "i32"}
K = 4096                                     # w1/w3 at Flash's shape (w2: K 2048, the same loop)


def sass(block_n: int, block_g: int, num_warps: int, packed: bool) -> tuple[str, str]:
    """(SASS text, ptxas -v summary) of the kernel for this config."""
    cs = {"WORDS": K // 8, "N_SCALES": K // 32, "BLOCK_N": block_n, "BLOCK_G": block_g,
          "HALF2": packed, "ASM": packed, "TILED": False}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}         # what a real launch tells the compiler
    kernel = triton.compile(ASTSource(_fp4_pair_gemv, {**SIG, **dict.fromkeys(cs, "constexpr")}, cs, attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    regs, spill, _ = ptxas_usage(kernel.asm["ptx"])
    return "\n".join(disassemble(kernel.asm["cubin"])), f"{regs} regs, {spill} B spilled"


def loop_opcodes(text: str) -> collections.Counter:
    """Opcode counts between the K loop's backward branch and its label (the one loop of the kernel)."""
    lines = text.splitlines()
    back = next(i for i, line in enumerate(lines) if re.search(r"BRA `\(\.L_x_\d+\)", line)
                and "@" in line)
    label = re.search(r"\(\.(L_x_\d+)\)", lines[back]).group(1)
    start = next(i for i, line in enumerate(lines) if line.startswith(f".{label}:"))
    ops = collections.Counter()
    for line in lines[start:back + 1]:
        if m := OPCODE.match(line):
            ops[m.group(1).split(".")[0]] += 1            # the opcode without its modifiers
    return ops


def main() -> None:
    for block_n, block_g, num_warps in ((16, 32, 4), (8, 32, 4), (32, 32, 8), (16, 64, 4)):
        per_thread = block_n * block_g * 32 / (num_warps * 32)
        for packed in (False, True):
            text, usage = sass(block_n, block_g, num_warps, packed)
            ops = loop_opcodes(text)
            top = ", ".join(f"{op} {n / per_thread:.2f}" for op, n in ops.most_common(8))
            name = "packed" if packed else "default"
            print(f"bn={block_n:<3} bg={block_g:<3} warps={num_warps} {name:<15}: "
                  f"{sum(ops.values()) / per_thread:5.2f} instr/element ({usage}) | {top}", flush=True)


if __name__ == "__main__":
    main()
