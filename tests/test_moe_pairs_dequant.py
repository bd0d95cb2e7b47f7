"""`ops/moe_pairs._dequant_gathered`, the pair twin's dequantisation of the gathered experts: one batched call over
the pairs, bit for bit the per-pair `dequant_weight` (the loop it replaced), with a traced graph that does not
grow with the number of pairs (the loop traced into ~10k nodes per MoE under torch.compile)."""

from __future__ import annotations

import secrets

import pytest
import torch

from dsv4.ops.moe_pairs import _dequant_gathered
from dsv4.ops.ref import dequant_weight


def _random_stored(fmt: str, p: int, n: int, k: int, gen: torch.Generator):
    """Random stored bytes: every FP4 code, every e4m3 byte (NaN included) and every e8m0 byte (0: 2**-127,
    255: NaN) can occur. FP8 shapes are not multiples of 128, so there are partial scale blocks."""
    def bytes_(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if fmt == "fp4":
        return bytes_(p, n, k // 2).view(torch.int8), bytes_(p, n, k // 32).view(torch.float8_e8m0fnu)
    if fmt == "fp8":
        return bytes_(p, n, k).view(torch.float8_e4m3fn), bytes_(p, -(-n // 128), -(-k // 128)).view(
            torch.float8_e8m0fnu)
    return torch.randn(p, n, k, generator=gen), None


@pytest.mark.parametrize("fmt, n, k", [("fp4", 24, 64), ("fp4", 5, 256), ("fp8", 130, 200), ("fp8", 7, 384),
                                       ("plain", 6, 40)])
def test_batched_dequant_is_the_per_pair_loop_bit_for_bit(fmt, n, k):
    seed = secrets.randbits(32)                  # fresh inputs each run (the seed in the message); global RNG untouched
    gen = torch.Generator().manual_seed(seed)
    for p in (1, 3, 17):
        w, s = _random_stored(fmt, p, n, k, gen)
        got = _dequant_gathered(w, s, fmt)
        want = torch.stack([dequant_weight(w[i], None if s is None else s[i], fmt) for i in range(p)])
        assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == (p, n, k)
        # bits, so NaN payloads and signed zeros count too
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (fmt, p, seed)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_traced_dequant_does_not_grow_with_the_pairs(fmt):
    """One graph, no break (no host read), and the same node count for 2 and 16 pairs: batched, not unrolled."""
    counts = []
    for p in (2, 16):
        graphs = []

        def counting(gm, inputs, graphs=graphs):
            graphs.append(gm)
            return gm.forward
        torch._dynamo.reset()
        w, s = _random_stored(fmt, p, 8, 128, torch.Generator().manual_seed(p))
        got = torch.compile(_dequant_gathered, backend=counting, fullgraph=True, dynamic=False)(w, s, fmt)
        assert torch.equal(got.view(torch.int32), _dequant_gathered(w, s, fmt).view(torch.int32))
        assert len(graphs) == 1
        counts.append(len(graphs[0].graph.nodes))
    torch._dynamo.reset()
    assert counts[0] == counts[1], counts
