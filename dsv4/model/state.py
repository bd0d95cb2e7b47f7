"""Decode state of DeepSeek-V4 (spec §4) and the per-step batch description the model runs on.

Two kinds of state per layer:
* fixed-size, one per sequence *slot*: the window ring (token p in row p mod W) and the compressors'
  partial-block buffers (reference layout: rows [0, r) = previous complete block, used by the overlapping
  ratio-4 pooling; rows [r, 2r) = the current block; kv 0 / score -inf when empty);
* growing, in *pages* of `page_size` tokens shared by all layers: a page of a ratio-r layer holds
  page_size / r compressed entries (and, on CSA layers, as many indexer keys). A sequence's page list maps
  entry j to (page j // per_page, row j % per_page).
Nothing here does model math; `Attention` reads and writes these tensors.
NOTE: `reset_slot` must run whenever a slot starts a new sequence: stale compressor state would leak into the
first entries (the reference has exactly this bug).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class CompressorState:
    kv: torch.Tensor        # [slots, coff*r, coff*c] fp32
    score: torch.Tensor     # same, gate scores with `ape` already added; -inf = empty

    def reset(self, slot: int) -> None:
        self.kv[slot].zero_()
        self.score[slot].fill_(float("-inf"))


@dataclass
class LayerState:
    ring: torch.Tensor                           # [slots, W, head_dim]
    ratio: int = 0
    entries: torch.Tensor | None = None          # [pages, page_size // r, head_dim]
    compressor: CompressorState | None = None
    index_keys: torch.Tensor | None = None       # [pages, page_size // 4, index_head_dim] (CSA only)
    index_compressor: CompressorState | None = None

    def reset(self, slot: int) -> None:
        for state in (self.compressor, self.index_compressor):
            if state is not None:
                state.reset(slot)


def _compressor_state(slots: int, ratio: int, head_dim: int, device) -> CompressorState:
    coff = 2 if ratio == 4 else 1
    shape = (slots, coff * ratio, coff * head_dim)
    return CompressorState(torch.zeros(shape, device=device),
                           torch.full(shape, float("-inf"), device=device))


def layer_bytes_per_page(cfg, ratio: int, page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page (page_size tokens) costs in one layer of ratio `ratio`."""
    if not ratio:
        return 0
    size = torch.empty((), dtype=dtype).element_size()
    n = page_size // ratio * cfg.head_dim
    if ratio == 4:
        n += page_size // 4 * cfg.index_head_dim
    return n * size


class ModelState:
    """All decode state of a model: `slots` sequence slots and `pages` pages of `page_size` tokens."""

    def __init__(self, cfg, slots: int, pages: int, page_size: int, dtype: torch.dtype, device="cpu",
                 layer_ids: list[int] | None = None):
        if page_size <= 0 or page_size % 128:
            raise ValueError(f"page_size must be a positive multiple of 128, got {page_size}")
        self.cfg, self.slots, self.pages, self.page_size = cfg, slots, pages, page_size
        self.dtype, self.device = dtype, torch.device(device)
        layer_ids = range(cfg.n_layers) if layer_ids is None else layer_ids
        self.layers = [self._layer(cfg.compress_ratios[i], slots, pages) for i in layer_ids]

    def _layer(self, ratio: int, slots: int, pages: int) -> LayerState:
        cfg, dev, dt = self.cfg, self.device, self.dtype
        st = LayerState(ring=torch.zeros(slots, cfg.window_size, cfg.head_dim, dtype=dt, device=dev), ratio=ratio)
        if ratio:
            st.entries = torch.zeros(pages, self.page_size // ratio, cfg.head_dim, dtype=dt, device=dev)
            st.compressor = _compressor_state(slots, ratio, cfg.head_dim, dev)
        if ratio == 4:
            st.index_keys = torch.zeros(pages, self.page_size // 4, cfg.index_head_dim, dtype=dt, device=dev)
            st.index_compressor = _compressor_state(slots, 4, cfg.index_head_dim, dev)
        return st

    def reset_slot(self, slot: int) -> None:
        for layer in self.layers:
            layer.reset(slot)

    def save_slot(self, slot: int) -> list[torch.Tensor]:
        """Copies of one slot's fixed-size state (window rings and compressor buffers, every layer): what a
        sequence cannot rebuild from its pages. `load_slot` puts them back (speculative rollback, prefix caching)."""
        return [t[slot].clone() for layer in self.layers for t in _slot_tensors(layer)]

    def load_slot(self, slot: int, saved: list[torch.Tensor]) -> None:
        """Restore a slot (any slot: a snapshot may move) from `save_slot`'s copies."""
        tensors = [t for layer in self.layers for t in _slot_tensors(layer)]
        if len(saved) != len(tensors):
            raise ValueError(f"snapshot holds {len(saved)} tensors, this state has {len(tensors)} per slot")
        for t, s in zip(tensors, saved, strict=True):
            t[slot].copy_(s)

    def pages_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.page_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in _tensors(layer))

    def clone(self) -> ModelState:
        """An independent copy (same slots, pages, contents): to run one step several ways from one state."""
        new = ModelState.__new__(ModelState)
        new.__dict__.update(self.__dict__)
        new.layers = [_clone_layer(layer) for layer in self.layers]
        return new


def _clone_layer(layer: LayerState) -> LayerState:
    def copy(st):
        return None if st is None else CompressorState(st.kv.clone(), st.score.clone())
    return LayerState(layer.ring.clone(), layer.ratio, None if layer.entries is None else layer.entries.clone(),
                      copy(layer.compressor), None if layer.index_keys is None else layer.index_keys.clone(),
                      copy(layer.index_compressor))


def _slot_tensors(layer: LayerState):
    """The per-slot tensors of a layer (first dimension = slot), in a fixed order."""
    yield layer.ring
    for st in (layer.compressor, layer.index_compressor):
        if st is not None:
            yield st.kv
            yield st.score


def _tensors(layer: LayerState):
    yield layer.ring
    for t in (layer.entries, layer.index_keys):
        if t is not None:
            yield t
    for st in (layer.compressor, layer.index_compressor):
        if st is not None:
            yield st.kv
            yield st.score


@dataclass
class SeqChunk:
    """One sequence's share of a step: `length` new tokens at positions start .. start+length-1, rows
    offset .. offset+length-1 of the flattened batch; its state lives in `slot` and `pages`."""

    slot: int
    start: int
    length: int
    offset: int
    pages: list[int] = field(default_factory=list)


@dataclass
class StepBatch:
    """A flattened batch: every sequence's new tokens concatenated (prefill chunks and decode steps mixed)."""

    seqs: list[SeqChunk]
    positions: torch.Tensor      # [T] absolute positions, on the model's device

    @property
    def n_tokens(self) -> int:
        return sum(s.length for s in self.seqs)

    @staticmethod
    def build(chunks: list[tuple[int, int, int, list[int]]], device) -> StepBatch:
        """From (slot, start, length, pages) tuples, in flattened order."""
        seqs, offset, pos = [], 0, []
        for slot, start, length, pages in chunks:
            seqs.append(SeqChunk(slot, start, length, offset, list(pages)))
            pos.append(torch.arange(start, start + length))
            offset += length
        return StepBatch(seqs, to_device(torch.cat(pos), device) if pos else torch.zeros(0, dtype=torch.long))


@dataclass
class FreshBatch:
    """b fresh sequences of s tokens each from position 0, flattened in order (rows i*s .. i*s+s-1 = sequence i):
    the training probe's equal-length sequences. Attention runs them as one [b, s] batch (one call per layer, not
    one per sequence) and keeps no decode state: nothing follows the forward. `positions` [b*s] is made on the
    device (no host copy)."""

    b: int
    s: int
    positions: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return self.b * self.s

    @staticmethod
    def build(b: int, s: int, device) -> FreshBatch:
        return FreshBatch(b, s, torch.arange(s, device=device).repeat(b))


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor copied to `device` without waiting for the GPU. NOTE: a copy from pageable host memory
    synchronises the stream first (the host waits for every queued kernel); one from pinned memory is queued like a
    kernel, and the caching host allocator keeps the pinned buffer until the copy has run."""
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def page_ids(pages: list[int], device) -> torch.Tensor:
    """A sequence's page list as a long tensor on `device`. A run of consecutive pages (training's and
    `fresh_state`'s) is made there by `arange`: a host list would be a host->device copy, which waits for the GPU
    (one per layer and sequence)."""
    if not pages:
        return torch.empty(0, dtype=torch.long, device=device)
    if pages == list(range(pages[0], pages[0] + len(pages))):
        return torch.arange(pages[0], pages[0] + len(pages), device=device)
    return torch.tensor(pages, dtype=torch.long, device=device)


def fresh_state(cfg, batch: int, seqlen: int, dtype: torch.dtype, device, page_size: int = 128,
                layer_ids: list[int] | None = None) -> tuple[ModelState, StepBatch]:
    """State and batch for `batch` fresh sequences of `seqlen` tokens from position 0 (the full forward)."""
    per_seq = math.ceil(max(seqlen, 1) / page_size)
    state = ModelState(cfg, batch, batch * per_seq, page_size, dtype, device, layer_ids)
    chunks = [(b, 0, seqlen, list(range(b * per_seq, (b + 1) * per_seq))) for b in range(batch)]
    return state, StepBatch.build(chunks, device)


@dataclass
class DecodeBatch:
    """A step of T new tokens per sequence (T = 1: plain decode; T = k + 1: speculative verification) at
    consecutive positions, described by device tensors of fixed shape, so the step has no host synchronisation and
    can be captured in a CUDA graph and replayed with new contents.

    slots [B], positions [B*T] (row b*T + j is sequence b's token at position p_b + j, the flattened order of the
    step's tokens), page_table [B, max_pages] (unused tail: any page id; entries past a sequence's end are masked
    by position, never read as data).
    """

    slots: torch.Tensor
    positions: torch.Tensor
    page_table: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def tokens_per_seq(self) -> int:
        """T, a static shape (not data): the same for every replay of a captured step."""
        return self.positions.shape[0] // self.slots.shape[0]

    @staticmethod
    def build(rows: list[tuple[int, int, list[int]]], max_pages: int, device, tokens_per_seq: int = 1) -> DecodeBatch:
        """From (slot, first new position, pages) per sequence; page lists are padded to `max_pages` with their
        first page."""
        flat = torch.tensor(DecodeBatch.values(rows, max_pages, tokens_per_seq), dtype=torch.long, device=device)
        return DecodeBatch.view(flat, len(rows), max_pages, tokens_per_seq)

    @staticmethod
    def values(rows: list[tuple[int, int, list[int]]], max_pages: int, tokens_per_seq: int = 1) -> list[int]:
        """`build`'s contents as one flat list: slots [B], positions [B*T], page table [B*max_pages] (row-major)."""
        if any(len(pages) > max_pages for _, _, pages in rows):
            raise ValueError(f"a sequence holds more than max_pages={max_pages} pages")
        if tokens_per_seq < 1:
            raise ValueError(f"tokens_per_seq must be >= 1, got {tokens_per_seq}")
        out = [r[0] for r in rows]
        out += [r[1] + j for r in rows for j in range(tokens_per_seq)]
        for _, _, pages in rows:
            out += pages + [pages[0]] * (max_pages - len(pages))
        return out

    @staticmethod
    def view(flat: torch.Tensor, batch: int, max_pages: int, tokens_per_seq: int = 1) -> DecodeBatch:
        """A batch whose tensors are views of `flat` (`values`' layout): one copy into `flat` refills all three."""
        a, b = batch, batch + batch * tokens_per_seq
        return DecodeBatch(flat[:a], flat[a:b], flat[b:b + batch * max_pages].view(batch, max_pages))


def gather_rows(pool: torch.Tensor, page_table: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Entries of each sequence's paged store: pool [pages, per_page, d], page_table [B, P] ->
    all P*per_page entries [B, P*per_page, d], or only entries `rows` [B, k] -> [B, k, d]."""
    per_page = pool.shape[1]
    if rows is None:
        return pool[page_table].flatten(1, 2)
    return pool[page_table.gather(1, rows // per_page), rows % per_page]


def write_rows(pool: torch.Tensor, page_table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """pool[entry rows[b] of sequence b] = values[b] (rows [B], values [B, d])."""
    per_page = pool.shape[1]
    page = page_table.gather(1, (rows // per_page).unsqueeze(1)).squeeze(1)
    pool[page, rows % per_page] = values.to(pool.dtype)
