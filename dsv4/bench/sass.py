"""Compiled Triton kernels inspected offline for sm_90 (H100 / H200), no GPU needed: registers and spills (`ptxas -v`),
the SASS (`nvdisasm`), the innermost loops of it and their instructions.

Why: a kernel's register use, copy widths and instructions per weight decide much of its speed, and they can be read
before a GPU session measures it. The kernel tests' compile checks and the screens in scripts/bench
(`grouped_prefill_regs.py`, `decode_kernel_sass.py`, `fp4_gemv_sass.py`) share these helpers. Screen with the
device's Triton (bench/NOTES.md: Triton 3.6 and 3.9 lay some kernels out differently).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# an instruction line of nvdisasm's output (its address comment), and its opcode (after a predicate, if any)
INSTRUCTION = re.compile(r"\s+/\*[0-9a-f]+\*/\s")
OPCODE = re.compile(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)")


def ptxas() -> Path:
    """The ptxas Triton itself runs for sm_90. NOTE: Triton 3.9 emits PTX 9.4, which its legacy `ptxas` (12.9)
    rejects; it ships `ptxas-blackwell` for that."""
    return next((p for p in (_BIN / "ptxas-blackwell", _BIN / "ptxas") if p.exists()), _BIN / "ptxas")


def ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers per thread, spill-store bytes, spill-load bytes) of `ptxas -v` on the kernel's PTX for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        log = subprocess.run([str(ptxas()), "-v", "--gpu-name", "sm_90a", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log).group(1)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return int(regs), int(spill.group(1)), int(spill.group(2))


def disassemble(cubin: bytes) -> list[str]:
    """The kernel's SASS lines (Triton's bundled nvdisasm)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(_BIN / "nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout.splitlines()


def innermost_loops(lines: list[str]) -> list[list[str]]:
    """The lines of each innermost loop (from its label to its backward branch), in layout order."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\.(L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `\(\.(L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    return [lines[a:b + 1] for a, b in loops if not any(a < s < b for s, _ in loops)]


def opcodes(lines: list[str]) -> list[str]:
    """The opcodes of the instruction lines among `lines`, in order."""
    return [m.group(1) for line in lines if (m := OPCODE.match(line))]
