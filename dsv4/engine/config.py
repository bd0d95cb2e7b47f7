"""Engine options (one frozen dataclass; the CLI and `dsv4.LLM` read their defaults from it) and cache sizing."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from dsv4.engine.graphs import COMPILE_SCOPES
from dsv4.loader import torch_dtype as resolve_dtype  # (EngineConfig.torch_dtype is its own method)
from dsv4.model.state import layer_bytes_per_page


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    dtype: str | torch.dtype | None = None  # a floating torch dtype or its name ("bfloat16", "float32" ...);
                                            # None or "auto" = bf16 on CUDA, fp32 on CPU; stored as the name
    quant_emulation: bool = True
    max_model_len: int | None = None    # None = the model's max_seq_len
    max_num_seqs: int = 16              # sequence slots (window rings and compressor state)
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decode tokens)
    page_size: int = 256                # tokens per cache page (a multiple of 128)
    num_pages: int | None = None        # None = sized from memory (see `cache_pages`)
    memory_fraction: float = 0.9        # CUDA: fraction of the free memory the cache may take
    cpu_cache_gib: float = 4.0          # CPU: cache budget
    cuda_graphs: bool = True            # CUDA: decode steps replay captured graphs (one per batch-size bucket)
    compile_decode: bool = False        # CUDA: torch.compile each captured decode step first (bench/NOTES.md: bs1
                                        # 3.9 -> 2.7 ms on the Flash-width bench; ~35 s of compiling per bucket)
    compile_scope: str = "step"         # "step": the whole decode step one graph; "block": one graph per block
                                        # kind (engine/graphs.py `compiled_blocks`: far less compiling at depth)
    decode_batch: bool = False          # CPU: run decode steps through the fixed-shape path too (tests)
    prefill_graphs: bool | None = None  # general steps (prefill chunks, mixed steps) as per-token segment graphs
                                        # per token bucket, attention cores eager (engine/prefill_graphs.py; 1k
                                        # prefill 47.9 -> 30.9 ms on the Flash-width bench, H100). None: where
                                        # decode steps are captured (CUDA, cuda_graphs); True: also on a CPU (the
                                        # same padded segments run eagerly, for tests); False: off
    compile_prefill: bool | None = None  # CUDA: torch.compile the prefill graphs' per-token segments (per block
                                        # kind and token bucket) before capturing them (inductor fuses their
                                        # elementwise work: 1k / 8k prefill 30.8 / 163.8 -> 25.9 / 122.6 ms on
                                        # the Flash-width bench, H100; compiling at start). None: as
                                        # compile_decode; True / False: on / off
    async_decode: bool | None = None    # steady decode steps launched before the host reads the step before
                                        # (its tokens fed on the device), so scheduling, appending and detokenising
                                        # overlap the GPU's step; the caller gets each step's tokens a call later
                                        # (engine/engine.py). Exact where the decode step is batch-invariant, as
                                        # the captured CUDA step is (the GPU test, thirty-fifth session: the same
                                        # tokens both ways). None: on where decode steps are captured (CUDA,
                                        # cuda_graphs); True: wherever the fixed-shape path runs (also a CPU with
                                        # decode_batch: there a row's bits depend on the padded bucket); False: off
    tensor_parallel_size: int = 1       # ranks the model is sharded over (docs/parallel.md); the engine runs on rank 0
    num_speculative_tokens: int = 0     # drafts per decode step from the MTP block (engine/speculative.py); 0 = off
    enable_prefix_caching: bool = True  # requests start from a cached prefix (engine/prefix_cache.py; TP = 1 only)
    max_prefix_snapshots: int = 64      # prefix cache: slot-state snapshots kept at block boundaries (LRU)

    def __post_init__(self):
        _check_types(self)
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        checks = [(self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
                  (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
                  (self.page_size >= 128 and self.page_size % 128 == 0, "page_size must be a multiple of 128"),
                  (self.num_pages is None or self.num_pages >= 1, "num_pages must be >= 1"),
                  (0 < self.memory_fraction <= 1, "memory_fraction must be in (0, 1]"),
                  (self.cpu_cache_gib > 0, "cpu_cache_gib must be > 0"),
                  (self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1"),
                  (self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1"),
                  (self.max_prefix_snapshots >= 0, "max_prefix_snapshots must be >= 0"),
                  (self.num_speculative_tokens >= 0, "num_speculative_tokens must be >= 0"),
                  (self.compile_scope in COMPILE_SCOPES,
                   "compile_scope must be " + " or ".join(map(repr, COMPILE_SCOPES))),
                  # The MTP step is not sent to the follower ranks (dist/worker.py), whose collectives would hang.
                  (self.num_speculative_tokens == 0 or self.tensor_parallel_size == 1,
                   "num_speculative_tokens > 0 needs tensor_parallel_size 1 (for now)")]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))

    def prefill_compiled(self) -> bool:
        """Are the prefill graphs' segments compiled (`compile_prefill`, None following `compile_decode`)?"""
        return self.compile_decode if self.compile_prefill is None else self.compile_prefill

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


_KINDS = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}


def _check_types(econf: EngineConfig) -> None:
    """The range checks assume the annotated types: quant_emulation="no" (a true str) would turn the emulation on,
    max_num_seqs="4" fail with a bare comparison error. device and dtype are checked where they are parsed."""
    for f in dataclasses.fields(econf):
        value = getattr(econf, f.name)
        kind, optional = f.type.removesuffix(" | None"), f.type.endswith(" | None")
        check = _KINDS.get(kind)
        if f.name in ("device", "dtype") or check is None or (value is None and optional) or check(value):
            continue
        article = "an" if kind == "int" else "a"
        raise TypeError(f"engine option {f.name} must be {'None or ' if optional else ''}{article} {kind}, "
                        f"got {value!r}")


def _dtype_name(dtype) -> str | None:
    """What `load_model` accepts (a floating torch dtype, or its name as in `torch.<name>`), or None / "auto"."""
    if dtype is None or dtype == "auto":
        return None
    try:
        resolved = resolve_dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be a floating-point torch.dtype, its name (e.g. 'bfloat16', 'float32') or "
                         f"'auto', got {dtype!r}") from None
    return str(resolved).removeprefix("torch.")


def bytes_per_page(cfg, page_size: int, dtype: torch.dtype) -> int:
    return sum(layer_bytes_per_page(cfg, r, page_size, dtype) for r in cfg.compress_ratios[:cfg.n_layers])


def cache_pages(cfg, econf: EngineConfig, max_model_len: int) -> int:
    """Pages for the growing cache: what the memory budget allows, at most enough for every slot at full length
    (more could never be used), at least one full-length sequence (else nothing long could ever run)."""
    if econf.num_pages is not None:
        return econf.num_pages
    per_page = max(bytes_per_page(cfg, econf.page_size, econf.torch_dtype()), 1)
    if torch.device(econf.device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(econf.device))
        budget = free * econf.memory_fraction
    else:
        budget = econf.cpu_cache_gib * 2**30
    per_seq = math.ceil(max_model_len / econf.page_size)
    if per_seq * per_page > budget:
        # Allocating it anyway would exceed the budget the user set (CPU: the OS may kill the process, silently).
        where = "memory_fraction of the free GPU memory" if torch.device(econf.device).type == "cuda" \
            else "cpu_cache_gib (dsv4 serve --cpu-cache-gib)"
        raise ValueError(f"max_model_len {max_model_len} needs {per_seq * per_page / 2**30:.3g} GiB of cache for one "
                         f"sequence, more than the cache budget ({budget / 2**30:.3g} GiB, {where}): lower "
                         f"max_model_len (--max-model-len) or raise the budget")
    if econf.enable_prefix_caching:                   # the snapshots come out of the same budget
        from dsv4.engine.prefix_cache import snapshot_bytes

        budget -= econf.max_prefix_snapshots * snapshot_bytes(cfg, econf.page_size, econf.torch_dtype())
    return max(per_seq, min(int(budget // per_page), per_seq * econf.max_num_seqs))
