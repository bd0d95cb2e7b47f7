"""Bookkeeping for the decode state's two resources: sequence slots and pages of `page_size` tokens.

Plain objects with no tensors: `ModelState` owns the memory, these only say which sequence owns which ids.
A sequence's `pages` list maps its tokens [0, len(pages) * page_size) in order; `slot` holds its fixed-size state.
Misuse (double free, freeing an id nobody allocated) raises at once: a page owned twice would silently mix two
sequences' caches, which is far harder to find than an exception here.
With a `PrefixCache` (engine/prefix_cache.py) a sequence's first pages may be cached blocks it shares (reference
counted there); idle cached pages count as free and are evicted when a sequence needs them.
"""

from __future__ import annotations

import math

from dsv4.engine.prefix_cache import PrefixCache
from dsv4.engine.sequence import Sequence


class IdPool:
    """Ids 0..n-1 on a free list. Freed ids are reused first (LIFO), allocation order is otherwise ascending."""

    kind = "id"

    def __init__(self, n: int):
        if n < 0:
            raise ValueError(f"{type(self).__name__} size must be >= 0, got {n}")
        self.capacity = n
        self._free = list(range(n - 1, -1, -1))   # pop() from the end hands out 0, 1, 2 ...
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int] | None:
        """`n` ids, or None (and nothing taken) when fewer than `n` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} {self.kind}s")
        if n > len(self._free):
            return None
        ids = [self._free.pop() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        """Return `ids`; all are checked before any is freed, so a bad call changes nothing."""
        bad = [i for i in ids if i not in self._used]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"freeing {self.kind}s {sorted(ids)}: {bad or 'duplicates'} not allocated "
                             "(double free or foreign id)")
        self._used.difference_update(ids)
        self._free.extend(ids)

    def check(self, owned: list[int]) -> None:
        """Invariants, given every id the owners hold: nothing owned twice, owned == used, free + used == all."""
        name = self.kind
        assert len(owned) == len(set(owned)), f"a {name} is owned twice: {sorted(owned)}"
        assert set(owned) == self._used, f"owned {name}s {sorted(owned)} != allocated {sorted(self._used)}"
        assert len(self._free) == len(set(self._free)), f"a {name} is on the free list twice"
        assert not self._used & set(self._free), f"a {name} is both free and allocated"
        assert len(self._free) + len(self._used) == self.capacity, f"{name}s lost or invented"


class PagePool(IdPool):
    """Pages; with a prefix cache, the pages of idle cached blocks are allocated here but count as free (the cache
    evicts them when the truly free ones run out), so `num_used` is what sequences hold."""

    kind = "page"
    cache: PrefixCache | None = None

    @property
    def num_idle(self) -> int:
        return self.cache.num_idle if self.cache is not None else 0

    @property
    def num_clean(self) -> int:
        """Free pages that hold no cached block."""
        return len(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free) + self.num_idle

    @property
    def num_used(self) -> int:
        return len(self._used) - self.num_idle


class SlotPool(IdPool):
    kind = "slot"


class CacheManager:
    """Slots and pages of one `ModelState`, handed to sequences (`seq.slot`, `seq.pages`)."""

    def __init__(self, num_slots: int, num_pages: int, page_size: int, prefix: PrefixCache | None = None):
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        self.slots, self.pages, self.page_size = SlotPool(num_slots), PagePool(num_pages), page_size
        self.prefix = self.pages.cache = prefix
        self._holders: dict[int, Sequence] = {}   # seq_id -> sequence holding a slot or pages

    def pages_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.page_size)

    def pages_needed(self, seq: Sequence, upto_tokens: int) -> int:
        """Pages `seq` lacks to cover tokens [0, upto_tokens)."""
        return max(0, self.pages_for(upto_tokens) - len(seq.pages))

    def can_fit(self, seq: Sequence, n_new_tokens: int) -> bool:
        """Could `seq` compute its next `n_new_tokens` now (a free slot if it has none, and the pages)?"""
        if seq.slot is None and self.slots.num_free == 0:
            return False
        return self.pages_needed(seq, seq.num_computed + n_new_tokens) <= self.pages.num_free

    # -- prefix caching hooks (no-ops without a prefix cache) --
    def match_prefix(self, seq: Sequence) -> None:
        """A waiting sequence takes its cached prefix (pages held, `num_computed` advanced)."""
        if self.prefix is not None and not seq.num_computed:
            self.prefix.match(seq)

    def unmatch_prefix(self, seq: Sequence) -> None:
        """Undo `match_prefix` for a sequence that stays waiting."""
        if self.prefix is not None:
            self.pages.free(self.prefix.release(seq))
            seq.pages, seq.num_computed = [], 0

    def clip_chunk(self, seq: Sequence, n: int) -> int:
        return self.prefix.clip(seq, n) if self.prefix is not None else n

    def after_step(self, seqs: list[Sequence]) -> None:
        if self.prefix is not None:
            self.pages.free(self.prefix.after_step(seqs))

    def admit(self, seq: Sequence) -> bool:
        """Give `seq` a slot; False when none is free. NOTE: the runner must `reset_slot` it before use."""
        if seq.slot is not None:
            raise ValueError(f"sequence {seq.seq_id} already holds slot {seq.slot}")
        got = self.slots.allocate(1)
        if got is None:
            return False
        seq.slot = got[0]
        self._holders[seq.seq_id] = seq
        if self.prefix is not None:
            self.prefix.admitted(seq)
        elif seq.num_cached_tokens is None:
            seq.num_cached_tokens = 0
        return True

    def grow(self, seq: Sequence, upto_tokens: int) -> list[int]:
        """Append pages so `seq.pages` covers tokens [0, upto_tokens); returns the new pages."""
        need = self.pages_needed(seq, upto_tokens)
        if self.prefix is not None and need > self.pages.num_clean:
            self.pages.free(self.prefix.evict(need - self.pages.num_clean))
        new = self.pages.allocate(need)
        if new is None:
            raise RuntimeError(f"out of pages: sequence {seq.seq_id} needs {self.pages_needed(seq, upto_tokens)} "
                               f"for {upto_tokens} tokens, {self.pages.num_free} free (check can_fit first)")
        seq.pages = seq.pages + new
        if new:
            self._holders[seq.seq_id] = seq
        return new

    def release(self, seq: Sequence) -> None:
        """Free `seq`'s slot and pages (a no-op for a sequence holding neither)."""
        if seq.slot is not None:
            self.slots.free([seq.slot])
        self.pages.free(self.prefix.release(seq) if self.prefix is not None else seq.pages)
        seq.slot, seq.pages = None, []
        self._holders.pop(seq.seq_id, None)

    def check_invariants(self) -> None:
        holders = list(self._holders.values())
        cached = self.prefix.cached_pages() if self.prefix is not None else set()
        self.pages.check([p for s in holders for p in s.pages if p not in cached] + sorted(cached))
        if self.prefix is not None:
            self.prefix.check(holders)
        self.slots.check([s.slot for s in holders if s.slot is not None])
        assert all(s.slot is not None or s.pages for s in holders), "a holder holds nothing"
