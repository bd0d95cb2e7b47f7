"""Tensor and expert parallelism on torch.distributed (docs/parallel.md)."""

from dsv4.dist.context import SINGLE, ParallelContext

__all__ = ["SINGLE", "ParallelContext"]
