"""The split-K FP8-MMA FP4 decode kernel (`ops/triton/fp4_decode_fp8mma.py`) compiled offline for sm_90 (H100/H200)
with Triton's bundled ptxas: registers, spills, the MMA instruction and the SASS instructions per weight element of
the K loops (`grouped_prefill_regs.py`'s counting), at the bench's decode configuration (16 tokens x 64 weight rows,
4 warps, tile-major weights, K 4096 split 2), and the widths of its global -> shared async copies (LDGSTS.E = 4
bytes: a kernel whose weights came out so under Triton 3.6 ran its decode step 1.5x slower at bs64, h100_s37 call
D, while Triton 3.9 gave 8-byte copies). No GPU needed: it screens a change before a GPU session measures it.
Screen with the device's Triton (3.6), which may lay the kernel out differently from a newer local one:
`pip install --no-deps --target /tmp/tri36 triton==3.6.0`, then
`PYTHONPATH=/tmp/tri36 python3 scripts/bench/decode_kernel_sass.py`.
Usage: python3 scripts/bench/decode_kernel_sass.py
"""

from collections import Counter

import triton
from grouped_prefill_regs import _loop_counts, _ptxas_usage, compiled, sass  # this directory is on sys.path

from dsv4.bench.sass import opcodes
from dsv4.ops.triton.fp4_decode_fp8mma import _fp4_decode_fp8mma

K, SPLIT, E = 4096, 2, 256


def report(pairs: bool, block_m: int = 16, block_n: int = 64, num_warps: int = 4, asm: bool = True) -> dict:
    sig = {"xq_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "eid_ptr": "*i64", "offs_ptr": "*i32",
           "w_ptr": "*i8", "s_ptr": "*u8", "out_ptr": "*fp32", "M": "i32", "N": "i32"}
    consts = {"K": K, "HALF": K // 2, "N_SCALES": K // 32, "BLOCKS_PER_SPLIT": K // 128 // SPLIT, "E": E,
              "E_POW2": E, "BLOCK_M": block_m, "BLOCK_N": block_n, "PAIRS": pairs, "HW": True, "ASM": asm,
              "TILED": True, "UNROLL": 1}
    kernel = compiled(_fp4_decode_fp8mma, sig, consts, 7, num_warps)
    regs, spill_st, spill_ld = _ptxas_usage(kernel)
    counts, mma, local = _loop_counts(kernel, block_n, num_warps)
    return {"regs": regs, "spill_bytes": spill_st + spill_ld, "mma": mma, "loops": counts, "k_loop_spills": local,
            "async_copies": _async_copies(kernel)}


def _async_copies(kernel) -> dict[str, int]:
    """LDGSTS instructions of the whole kernel by their modifiers (E = 4 bytes, E.64, E.128, E.BYPASS.128)."""
    return dict(Counter(op.removeprefix("LDGSTS.") for op in opcodes(sass(kernel)) if op.startswith("LDGSTS.")))


def main() -> None:
    print(f"Triton {triton.__version__}")
    for pairs in (True, False):
        r = report(pairs)
        loops = " / ".join(f"{c:.2f}" for c in r["loops"])
        print(f"{'pairs' if pairs else 'sorted':<7} {r['regs']:>3} regs, spills {r['spill_bytes']} B, {r['mma']}, "
              f"K loops {loops} instr/weight{' (spills in them)' if r['k_loop_spills'] else ''}; "
              f"async copies {r['async_copies']}", flush=True)


if __name__ == "__main__":
    main()
