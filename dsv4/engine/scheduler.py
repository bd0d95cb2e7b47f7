"""Continuous batching with chunked prefill, strict FCFS admission and recompute preemption.

Each `schedule()` builds one flattened step under a token budget (`max_num_batched_tokens`):
1. running sequences, oldest first: a decode token each, or the next chunk of an unfinished prefill;
2. then waiting sequences, FCFS, while a slot, the pages for their chunk and some budget remain. A prompt longer
   than the budget left is cut into chunks (chunked prefill). Admission is strict: if the head of the queue does not
   fit, nobody behind it is admitted, so a short request never overtakes an earlier long one.
When a running sequence cannot get a page for its tokens, the most recently arrived running sequence (possibly
itself) is preempted: slot and pages freed, `num_computed = 0` (recompute), back to the FRONT of the waiting queue.
A step that preempted admits nobody (the pages it just freed are for the running ones).
With prefix caching, an admitted sequence may start past 0 (`CacheManager.match_prefix`) and its prefill chunks
may stop early at snapshot points (`clip_chunk`); engine/prefix_cache.py says why.

Why it cannot deadlock: `add()` rejects any sequence that could not fit in the whole cache on its own. Running
sequences are kept in arrival order and victims are taken from the newest end, so the oldest running sequence is
never preempted (all others would be freed first, and then it fits) and it gets the first share of the budget: it
makes progress every step until it finishes. With nothing running, the head of the queue finds the cache empty.
Invariant (tested): every running sequence arrived before every waiting one, and the waiting queue is in arrival
order, preempted sequences included. "Arrival" here is the order of `add()` calls.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dsv4.engine.pages import CacheManager
from dsv4.engine.sequence import Sequence, Status


@dataclass
class ScheduledStep:
    """One step's work. Entry i feeds tokens `seq.all_ids[seq.num_computed : seq.num_computed + n]` at those
    positions; NOTE: `num_computed` is only advanced by `update_after_step`, so run the step before calling it."""

    entries: list[tuple[Sequence, int]] = field(default_factory=list)   # (seq, n_tokens), flattened row order
    samples: list[bool] = field(default_factory=list)         # per entry: the chunk reaches the last token
    newly_started: list[Sequence] = field(default_factory=list)   # in a fresh slot: reset it before the step
    preempted: list[Sequence] = field(default_factory=list)       # sent back to waiting during this schedule()

    @property
    def n_tokens(self) -> int:
        return sum(n for _, n in self.entries)

    @property
    def sampling(self) -> list[Sequence]:
        """The sequences that get one new token from this step."""
        return [seq for (seq, _), s in zip(self.entries, self.samples, strict=True) if s]

    def chunks(self) -> list[tuple[int, int, int, list[int]]]:
        """(slot, start, length, pages) per entry, the input of `StepBatch.build` (before `update_after_step`)."""
        return [(seq.slot, seq.num_computed, n, list(seq.pages)) for seq, n in self.entries]

    def append(self, seq: Sequence, n: int, new: bool) -> None:
        self.entries.append((seq, n))
        self.samples.append(n == seq.num_pending)
        if new:
            self.newly_started.append(seq)


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        if min(max_num_seqs, max_num_batched_tokens, max_model_len) < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must all be >= 1")
        self.cache, self.max_num_seqs = cache, max_num_seqs
        self.max_num_batched_tokens, self.max_model_len = max_num_batched_tokens, max_model_len
        self.waiting: deque[Sequence] = deque()      # arrival order; preempted ones re-enter at the front
        self.running: list[Sequence] = []            # arrival order (admission keeps it so, see module doc)
        self._seqs: dict[int, Sequence] = {}          # seq_id -> every unfinished sequence

    @property
    def has_work(self) -> bool:
        return bool(self._seqs)

    # ------------------------------------------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> None:
        """Queue a fresh sequence; ValueError when it could never run (too long, or bigger than the cache)."""
        if seq.status is not Status.WAITING or seq.slot is not None or seq.pages or seq.num_computed:
            raise ValueError(f"sequence {seq.seq_id} is not fresh (status {seq.status.value})")
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence {seq.seq_id} was already added")
        self._check_fits(seq)
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def _check_fits(self, seq: Sequence) -> None:
        total = len(seq.prompt_ids) + seq.params.max_tokens
        if not seq.prompt_ids:
            raise ValueError(f"sequence {seq.seq_id} has an empty prompt")
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.params.max_tokens}) = "
                             f"{total} is longer than max_model_len ({self.max_model_len})")
        # The last sampled token is never fed back, so the cache holds at most total - 1 tokens.
        need = self.cache.pages_for(total - 1)
        if need > self.cache.pages.capacity:
            raise ValueError(f"sequence {seq.seq_id} may need {need} pages for {total - 1} tokens but the cache "
                             f"has only {self.cache.pages.capacity} (page_size {self.cache.page_size})")

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish an unfinished sequence with reason "abort" and free its slot and pages now (between steps)."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish `seq` (unless already finished) and free its resources now."""
        if not seq.is_finished:
            seq.finish(reason)
        self._retire(seq)

    def _retire(self, seq: Sequence) -> bool:
        """Drop a finished sequence and free its resources; False if it was already gone."""
        if self._seqs.pop(seq.seq_id, None) is None:
            return False
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.release(seq)
        return True

    # ------------------------------------------------------------------------------------------------ stepping

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self._schedule_running(step, self.max_num_batched_tokens)
        if not step.preempted:
            self._admit_waiting(step, budget)
        return step

    def _schedule_running(self, step: ScheduledStep, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self.cache.clip_chunk(seq, min(seq.num_pending, budget))
            drafts = self._fit_draft(seq, n, budget)
            if not self._make_room(seq, n + drafts, step):
                break                           # seq preempted itself: it was the last running one
            self.cache.grow(seq, seq.num_computed + n + drafts)
            step.append(seq, n, new=False)
            budget -= n + drafts
            i += 1
        return budget

    @staticmethod
    def _fit_draft(seq: Sequence, n: int, budget: int) -> int:
        """Speculative drafts verified with the decode token (they need pages and budget too); trimmed to fit."""
        if not seq.num_draft:
            return 0
        if n != seq.num_pending:
            seq.draft = None
            return 0
        seq.draft.trim(budget - n)
        return seq.num_draft

    def _make_room(self, seq: Sequence, n: int, step: ScheduledStep) -> bool:
        """Preempt the newest running sequences until `seq` has pages for `n` more tokens; False if it went too."""
        while not self.cache.can_fit(seq, n):
            victim = self.running.pop()
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.cache.release(seq)
        seq.status, seq.num_computed, seq.draft = Status.WAITING, 0, None
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)            # victims come newest first, so the oldest ends up in front

    def _admit_waiting(self, step: ScheduledStep, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.cache.match_prefix(seq)        # a cached prefix: pages held, num_computed advanced
            n = self.cache.clip_chunk(seq, min(seq.num_pending, budget))
            if not self.cache.can_fit(seq, n):
                self.cache.unmatch_prefix(seq)
                break                           # strict FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.cache.admit(seq)
            self.cache.grow(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.append(seq, n, new=True)
            budget -= n

    def update_after_step(self, step: ScheduledStep) -> list[Sequence]:
        """Call once the runner ran `step`, before or after appending the sampled tokens: advances `num_computed`
        of the unfinished entries and frees those already finished (by `seq.finish`), which it returns."""
        done = []
        for seq, n in step.entries:
            if not seq.is_finished:
                seq.num_computed += n
            elif self._retire(seq):
                done.append(seq)
        return done

    def check_invariants(self) -> None:
        """Cache invariants plus the scheduler's own (for tests)."""
        self.cache.check_invariants()
        for seq in self.running:
            assert seq.status is Status.RUNNING and seq.slot is not None, f"running seq {seq.seq_id} has no slot"
            assert len(seq.pages) * self.cache.page_size >= seq.num_computed, f"seq {seq.seq_id} pages too short"
        for seq in self.waiting:
            assert seq.status is Status.WAITING and seq.slot is None and not seq.pages and not seq.num_computed
        assert len(self.running) <= self.max_num_seqs
        assert len(self.running) + len(self.waiting) == len(self._seqs), "a sequence is lost or listed twice"
