"""Triton kernels. Imported lazily (only where Triton is installed); each has a plain twin in `ops/`."""
