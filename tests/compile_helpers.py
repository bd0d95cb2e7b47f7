"""Shared by the tests of compiled block graphs (decode's compile_scope="block", PrefillGraphs' compile=)."""

from __future__ import annotations

import torch

# Ratios 0, 4, 128, 4, 128: the HCA layers 2 and 4 are of one kind (both top-k routed), so a graph per block kind
# shows as fewer graphs than blocks.
KIND_RATIOS = (0, 4, 128, 4, 128, 0)


def five_layer_model(path):
    """A bf16 5-layer tiny model of KIND_RATIOS with the quantisation emulation, Dynamo's caches reset."""
    import dsv4
    from dsv4.checkpoint import synthesize
    from dsv4.config import tiny_config

    cfg = tiny_config(n_layers=5, compress_ratios=KIND_RATIOS)
    torch._dynamo.reset()
    return dsv4.load_model(synthesize(cfg, path, seed=1234, progress=False), dtype=torch.bfloat16,
                           quant_emulation=True, progress=False)


def graph_counter():
    """(backend, graphs): a torch.compile backend that runs Dynamo's traced graphs as they are and records each."""
    graphs = []

    def counting(gm, inputs):
        graphs.append(gm)
        return gm.forward
    return counting, graphs
