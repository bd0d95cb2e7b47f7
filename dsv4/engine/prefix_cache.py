"""Automatic prefix caching: a request whose token prefix was computed before starts from the cached state.

A cache block is one page (`page_size` tokens, a multiple of 128, so both compression ratios are whole). Blocks
are keyed by (parent block, the block's token ids), a hash chain checked by equality (a dict), so a collision can
never hand out another prefix's state. What V4 needs at a block boundary N:
* the compressed entries (ratio 4 and 128) and indexer keys of every layer, position-addressed in the pages.
  Entry j of a ratio-r layer is written when token (j+1)r-1 completes its block, and lives in page (j r) // P:
  every entry of a page is written by a token inside that page. So a full page is immutable once its tokens are
  computed, and full pages are shared read-only (reference counted) with no copy-on-write.
* the window ring (last `window_size` tokens of every layer) and the compressors' partial-block buffers: per
  slot. They are snapshotted with `ModelState.save_slot` when a sequence's computed length lands exactly on a
  block boundary, and a hit restores the deepest snapshotted block of its matched chain with `load_slot`.
  Why not re-prefill the tail instead: a token's window KV at layer l depends on layer l-1's window at the
  tokens before it, so rebuilding the ring exactly means re-running n_layers * window tokens (5.5k on Flash),
  not one window; a snapshot is exact by construction and costs one slot copy.
  Cost (`snapshot_bytes`): Flash bf16 17.0 MiB per snapshot (about 10 pages of 256 tokens), of which 10 MiB are
  the ratio-128 compressor buffers, empty at a boundary (a compact snapshot is a possible follow-up);
  the 4-layer bench model 1.08 MiB. So snapshots are few and bounded (`max_prefix_snapshots`, LRU), and
  sequences stop a prefill chunk at two boundaries so that a snapshot exists where the next request needs it:
  the last block boundary of their tokens (the next turn of a conversation continues from there), and the end
  of their matched chain when it had no snapshot there (a shared system prompt gets one on its second use).
  Decode steps cross boundaries one token at a time, so long replies get snapshots for free.
Memory: cached pages stay in the page pool, held by their sequences (refcount) and, once idle, evicted LRU
(leaves first, so a chain is never cut in its middle) when a sequence needs pages: idle cached pages count as free
for admission and growth, so they never make a running request wait or be preempted.
Eviction order is two-level (like 2Q): "cold" blocks (written by a sequence that had no hit: one-off prompts)
go before "warm" ones (blocks that were hit, and blocks written by a sequence that started from a hit: the next
turn of a conversation continues them), least recently used first within each. Plain LRU would flush a
conversation's prefix for every one-off request that finished after it (the vLLM 43447 failure: hit rate 0%
under churn); tests/test_prefix_cache.py interleaves two sessions with one-off requests to show it does not.
Snapshots are evicted in the same order. Sequences hold whole chains
from the root (a sequence that computed a block someone else cached meanwhile switches to the cached page), so
an idle block's descendants are idle too and every idle block is evictable.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch

from dsv4.engine.sequence import Sequence

ROOT = -1


@dataclass(eq=False)
class Block:
    """One cached page: tokens [depth * P, (depth + 1) * P) of every sequence whose prefix matches its chain."""

    key: tuple
    page: int
    depth: int
    parent: Block | None
    id: int
    refs: int = 0
    children: int = 0
    last_used: int = 0
    snapshot: list[torch.Tensor] | None = None
    snapshot_used: int = 0
    warm: bool = False                                   # hit, or written after a hit (evicted after cold ones)


@dataclass
class _SeqInfo:
    held: list[Block] = field(default_factory=list)     # the blocks of seq.pages[:len(held)], a chain from the root
    cuts: list[int] = field(default_factory=list)       # prefill chunks stop at these lengths (snapshot points)
    restore: list[torch.Tensor] | None = None           # the snapshot to load into its slot before its first step
    warm: bool = False                                  # started from a hit: the blocks it writes are warm


class SlotStates:
    """Several `ModelState`s whose slots are saved and restored together (the model's and the MTP drafter's)."""

    def __init__(self, *states):
        self.states = states

    def save_slot(self, slot: int) -> list:
        return [s.save_slot(slot) for s in self.states]

    def load_slot(self, slot: int, saved: list) -> None:
        for s, x in zip(self.states, saved, strict=True):
            s.load_slot(slot, x)


def snapshot_bytes(cfg, page_size: int, dtype: torch.dtype) -> int:
    """Bytes of one snapshot (`save_slot` of one slot), computed on the meta device."""
    from dsv4.model.state import ModelState

    state = ModelState(cfg, 1, 1, page_size, dtype, "meta")
    return sum(t.numel() * t.element_size() for t in state.save_slot(0))


class PrefixCache:
    def __init__(self, page_size: int, max_snapshots: int, state=None):
        self.page_size, self.max_snapshots, self.state = page_size, max_snapshots, state
        self.blocks: dict[tuple, Block] = {}
        self.num_idle = 0                     # blocks no sequence holds: all evictable
        self.num_snapshots = 0
        self.query_tokens = self.hit_tokens = 0   # prompt tokens of first admissions, and how many were cached
        self._seqs: dict[int, _SeqInfo] = {}
        self._clock = itertools.count(1)
        self._ids = itertools.count()
        self._heap: list[tuple] = []          # (warm, last_used, -depth, id, block) of idle leaves; stale skipped

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    # ------------------------------------------------------------------------------------------ admission
    def match(self, seq: Sequence) -> None:
        """Give a fresh sequence its longest cached prefix that ends at a snapshot (held: refs + 1), and the
        lengths where its prefill chunks stop. At least one token is left to compute (its logits)."""
        P, ids, info = self.page_size, seq.all_ids, _SeqInfo()
        chain, parent = [], None
        for d in range((seq.num_tokens - 1) // P):
            block = self.blocks.get((parent.id if parent else ROOT, tuple(ids[d * P:(d + 1) * P])))
            if block is None:
                break
            chain.append(parent := block)
        hit = max((i + 1 for i, b in enumerate(chain) if b.snapshot is not None), default=0)
        now = next(self._clock)
        for block in chain[:hit]:
            self._hold(block)
            block.last_used, block.warm = now, True
        if hit:
            info.restore = chain[hit - 1].snapshot
            chain[hit - 1].snapshot_used = now
        info.held, info.warm = chain[:hit], hit > 0
        seq.pages, seq.num_computed = [b.page for b in info.held], hit * P
        info.cuts = sorted({c for c in (len(chain) * P, (seq.num_tokens - 1) // P * P) if c > hit * P})
        self._seqs[seq.seq_id] = info

    def admitted(self, seq: Sequence) -> None:
        if seq.num_cached_tokens is None:              # the first admission is the request's (not a re-admission)
            seq.num_cached_tokens = seq.num_computed
            self.query_tokens += len(seq.prompt_ids)
            self.hit_tokens += seq.num_computed

    def clip(self, seq: Sequence, n: int) -> int:
        """`n` tokens, or fewer so that the chunk ends at the sequence's next snapshot point."""
        info = self._seqs.get(seq.seq_id)
        if info is None:
            return n
        while info.cuts and info.cuts[0] <= seq.num_computed:
            info.cuts.pop(0)
        return min(n, info.cuts[0] - seq.num_computed) if info.cuts else n

    def take_restore(self, seq: Sequence) -> list[torch.Tensor] | None:
        info = self._seqs.get(seq.seq_id)
        if info is None:
            return None
        saved, info.restore = info.restore, None
        return saved

    # ------------------------------------------------------------------------------------------ after a step
    def after_step(self, seqs: list[Sequence]) -> list[int]:
        """Cache the blocks the sequences completed and snapshot those on a boundary; returns pages to free."""
        freed = []
        for seq in seqs:
            if seq.is_finished or seq.seq_id not in self._seqs:
                continue
            freed += self._register(seq)
            info = self._seqs[seq.seq_id]
            if seq.num_computed and seq.num_computed % self.page_size == 0:
                self._snapshot(seq, info.held[seq.num_computed // self.page_size - 1])
        return freed

    def _register(self, seq: Sequence) -> list[int]:
        """Make the sequence's full computed pages cache blocks; a block cached meanwhile by another sequence (same
        tokens, so the same contents) replaces its own copy, whose page is returned to be freed."""
        P, info, ids, freed = self.page_size, self._seqs[seq.seq_id], seq.all_ids, []
        for d in range(len(info.held), seq.num_computed // P):
            parent = info.held[-1] if info.held else None
            key = (parent.id if parent else ROOT, tuple(ids[d * P:(d + 1) * P]))
            block = self.blocks.get(key)
            if block is None:
                block = self.blocks[key] = Block(key, seq.pages[d], d, parent, next(self._ids), warm=info.warm)
                if parent is not None:
                    parent.children += 1
                self.num_idle += 1                    # _hold takes it back
            elif block.page != seq.pages[d]:
                freed.append(seq.pages[d])
                seq.pages[d] = block.page
            self._hold(block)
            block.last_used = next(self._clock)
            info.held.append(block)
        return freed

    def _snapshot(self, seq: Sequence, block: Block) -> None:
        if block.snapshot is not None or self.max_snapshots == 0 or self.state is None:
            return
        if self.num_snapshots >= self.max_snapshots:
            victim = min((b for b in self.blocks.values() if b.snapshot is not None),
                         key=lambda b: (b.warm, b.snapshot_used))
            self._drop_snapshot(victim)
        block.snapshot, block.snapshot_used = self.state.save_slot(seq.slot), next(self._clock)
        self.num_snapshots += 1

    def _drop_snapshot(self, block: Block) -> None:
        if block.snapshot is not None:
            block.snapshot = None
            self.num_snapshots -= 1

    # ------------------------------------------------------------------------------------------ release / evict
    def release(self, seq: Sequence) -> list[int]:
        """A sequence gives back its pages (finished, aborted or preempted): its full computed pages stay cached,
        idle once nobody holds them; returns the pages to free (its partial last page and the like)."""
        if seq.seq_id not in self._seqs:
            return list(seq.pages)
        freed = self._register(seq) if seq.pages else []
        info = self._seqs.pop(seq.seq_id)
        now = next(self._clock)
        for block in reversed(info.held):
            block.last_used = now
            self._unhold(block)
        return freed + seq.pages[len(info.held):]

    def evict(self, n: int) -> list[int]:
        """Free up to `n` idle pages, cold before warm, least recently used leaves first; returns their page ids."""
        pages = []
        while len(pages) < n and self._heap:
            entry = heapq.heappop(self._heap)
            if not self._valid(entry):
                continue                              # stale entry
            block = entry[-1]
            del self.blocks[block.key]
            self._drop_snapshot(block)
            self.num_idle -= 1
            pages.append(block.page)
            if block.parent is not None:
                block.parent.children -= 1
                self._push_if_leaf(block.parent)
        return pages

    def _hold(self, block: Block) -> None:
        if block.refs == 0:
            self.num_idle -= 1
        block.refs += 1

    def _unhold(self, block: Block) -> None:
        block.refs -= 1
        if block.refs == 0:
            self.num_idle += 1
            self._push_if_leaf(block)

    def _push_if_leaf(self, block: Block) -> None:
        if block.refs == 0 and block.children == 0:
            heapq.heappush(self._heap, (block.warm, block.last_used, -block.depth, block.id, block))
            if len(self._heap) > 4 * len(self.blocks) + 64:      # stale entries pile up (a queue head that waits)
                self._heap = [e for e in self._heap if self._valid(e)]
                heapq.heapify(self._heap)

    def _valid(self, entry: tuple) -> bool:
        warm, stamp, _, _, block = entry
        return (self.blocks.get(block.key) is block and not block.refs and not block.children
                and (block.warm, block.last_used) == (warm, stamp))

    # ------------------------------------------------------------------------------------------ checks
    def cached_pages(self) -> set[int]:
        return {b.page for b in self.blocks.values()}

    def check(self, holders: list[Sequence]) -> None:
        """Refcounts equal the holders, chains are whole, counters agree (for tests)."""
        refs = {id(b): 0 for b in self.blocks.values()}
        for seq in holders:
            info = self._seqs.get(seq.seq_id)
            for d, block in enumerate(info.held if info else []):
                assert self.blocks.get(block.key) is block, f"seq {seq.seq_id} holds an evicted block"
                assert block.depth == d and block.page == seq.pages[d], f"seq {seq.seq_id}: block {d} misplaced"
                assert block.parent is (info.held[d - 1] if d else None), f"seq {seq.seq_id}: chain broken"
                refs[id(block)] += 1
        for block in self.blocks.values():
            assert block.refs == refs[id(block)], f"block {block.id}: refs {block.refs} != {refs[id(block)]}"
        kids = {}
        for block in self.blocks.values():
            if block.parent is not None:
                assert self.blocks.get(block.parent.key) is block.parent, "a cached block's parent was evicted"
                kids[block.parent.id] = kids.get(block.parent.id, 0) + 1
        assert all(b.children == kids.get(b.id, 0) for b in self.blocks.values()), "children counts wrong"
        assert self.num_idle == sum(b.refs == 0 for b in self.blocks.values()), "idle count wrong"
        assert self.num_snapshots == sum(b.snapshot is not None for b in self.blocks.values()) <= self.max_snapshots
        assert len(self.cached_pages()) == len(self.blocks), "a page is cached twice"
