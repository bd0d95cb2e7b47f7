"""Page/slot pools and the scheduler, driven by a mock model (no weights, no GPU).

The mock writes every fed token into its sequence's pages and samples a token that is a function of what it reads
back from them, so a page shared by two sequences, a skipped or repeated chunk or a missed slot reset shows up as a
wrong output, whatever the batching, chunking or preemption. Expected outputs come from running that function
directly, without any scheduler. Random workloads are seeded loops (reproducible, no extra dependency).
"""

from __future__ import annotations

import random

import pytest

from dsv4.engine.pages import CacheManager, PagePool, SlotPool
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.scheduler import ScheduledStep, Scheduler
from dsv4.engine.sequence import Sequence, Status

VOCAB, STOP = 50, 0


def next_token(ids: list[int]) -> int:
    h = 0
    for t in ids:
        h = (h * 31 + t + 7) % 1_000_003
    return h % VOCAB


def reference(prompt: list[int], params: SamplingParams) -> tuple[list[int], str]:
    ids, out = list(prompt), []
    while True:
        out.append(next_token(ids + out))
        if out[-1] in params.stop_token_ids:
            return out, "stop"
        if len(out) >= params.max_tokens:
            return out, "length"


class MockModel:
    """Pages hold tokens; `slot_pos[slot]` is the next position the slot expects (a stand-in for its ring)."""

    def __init__(self, cache: CacheManager):
        self.ps, self.pages = cache.page_size, {}
        self.slot_pos = [-1] * cache.slots.capacity

    def run(self, step: ScheduledStep) -> dict[Sequence, int]:
        for seq in step.newly_started:
            self.slot_pos[seq.slot] = 0                      # ModelState.reset_slot
        out = {}
        for (seq, n), samples in zip(step.entries, step.samples, strict=True):
            start = seq.num_computed
            assert self.slot_pos[seq.slot] == start, "slot not reset, or a chunk skipped / repeated"
            for pos in range(start, start + n):
                self.pages.setdefault(seq.pages[pos // self.ps], {})[pos % self.ps] = seq.all_ids[pos]
            self.slot_pos[seq.slot] = start + n
            if samples:
                out[seq] = next_token([self.pages[seq.pages[p // self.ps]][p % self.ps] for p in range(start + n)])
        return out


def postprocess(sched: Scheduler, sampled: dict[Sequence, int]) -> None:
    for seq, tok in sampled.items():
        seq.output_ids.append(tok)
        if tok in seq.params.stop_token_ids:
            sched.finish(seq, "stop")
        elif len(seq.output_ids) >= seq.params.max_tokens:
            sched.finish(seq, "length")


def make_seq(prompt_len: int, max_tokens: int, rng: random.Random | None = None, stop: bool = True) -> Sequence:
    rng = rng or random.Random(prompt_len)
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=[STOP] if stop else None)
    return Sequence([rng.randrange(1, VOCAB) for _ in range(prompt_len)], params)


# ---------------------------------------------------------------------------------------------------- the driver

class Harness:
    """Runs a scheduler to completion, checking every step."""

    def __init__(self, sched: Scheduler, finish_before_update: bool = False):
        self.sched, self.model = sched, MockModel(sched.cache)
        self.finish_before_update = finish_before_update
        self.rank: dict[int, int] = {}            # seq_id -> order of add()
        self.first_admissions: list[int] = []
        self.steps = 0

    def add(self, seq: Sequence) -> None:
        self.rank[seq.seq_id] = len(self.rank)
        self.sched.add(seq)

    def step(self) -> ScheduledStep:
        step = self.sched.schedule()
        self.check_step(step)
        sampled = self.model.run(step)
        if self.finish_before_update:
            postprocess(self.sched, sampled)
            self.sched.update_after_step(step)
        else:
            self.sched.update_after_step(step)
            postprocess(self.sched, sampled)
        self.sched.check_invariants()
        self.check_fcfs()
        self.steps += 1
        return step

    def check_step(self, step: ScheduledStep) -> None:
        s = self.sched
        assert step.entries or not s.has_work, "work left but nothing scheduled"
        assert step.n_tokens <= s.max_num_batched_tokens
        assert len(step.entries) <= s.max_num_seqs
        assert all(n >= 1 for _, n in step.entries)
        assert len({seq.seq_id for seq, _ in step.entries}) == len(step.entries)
        assert not {seq.seq_id for seq in step.preempted} & {seq.seq_id for seq, _ in step.entries}
        for seq, _ in step.entries:
            assert (seq in step.newly_started) == (seq.num_computed == 0)
        self.first_admissions += [self.rank[q.seq_id] for q in step.newly_started if not q.num_preemptions]

    def check_fcfs(self) -> None:
        running = [self.rank[q.seq_id] for q in self.sched.running]
        waiting = [self.rank[q.seq_id] for q in self.sched.waiting]
        assert running == sorted(running) and waiting == sorted(waiting)
        assert not running or not waiting or max(running) < min(waiting)
        assert self.first_admissions == sorted(self.first_admissions)


def make_sched(num_slots=4, num_pages=64, page_size=4, max_num_seqs=4, budget=32, max_model_len=256) -> Scheduler:
    return Scheduler(CacheManager(num_slots, num_pages, page_size), max_num_seqs, budget, max_model_len)


def run_all(h: Harness, seqs: list[Sequence], max_steps: int = 10_000) -> None:
    for seq in seqs:
        h.add(seq)
    while h.sched.has_work:
        assert h.steps < max_steps, "no progress (deadlock or livelock)"
        h.step()


def assert_drained(sched: Scheduler) -> None:
    cache = sched.cache
    assert not sched.running and not sched.waiting and not sched.has_work
    assert cache.pages.num_used == 0 and cache.pages.num_free == cache.pages.capacity
    assert cache.slots.num_used == 0 and cache.slots.num_free == cache.slots.capacity


# ---------------------------------------------------------------------------------------------------- pools

@pytest.mark.parametrize("pool_cls", [PagePool, SlotPool])
def test_pool_allocate_free(pool_cls):
    pool = pool_cls(5)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 2 and pool.num_used == 3
    assert pool.allocate(3) is None and pool.num_free == 2          # not enough: nothing taken
    assert pool.allocate(0) == []
    pool.free([1])
    pool.check([0, 2])
    with pytest.raises(ValueError, match="double free"):
        pool.free([1])
    with pytest.raises(ValueError, match="foreign"):
        pool.free([7])
    with pytest.raises(ValueError):
        pool.free([0, 0])
    with pytest.raises(ValueError):
        pool.free([0, 1])                                          # 1 is free: 0 must stay allocated
    pool.check([0, 2])
    with pytest.raises(AssertionError, match="owned twice"):
        pool.check([0, 2, 2])
    pool.free([0, 2])
    pool.check([])
    assert pool.num_free == 5


def test_cache_manager_grow_release():
    cache = CacheManager(num_slots=2, num_pages=5, page_size=4)
    a, b = make_seq(9, 4), make_seq(3, 4)
    assert cache.can_fit(a, 9) and cache.admit(a)
    assert cache.grow(a, 9) == a.pages and len(a.pages) == 3          # ceil(9 / 4)
    assert cache.grow(a, 12) == [] and len(a.pages) == 3
    assert cache.admit(b) and not cache.can_fit(b, 9)                  # 3 pages needed, 2 free
    cache.grow(b, 8)
    cache.check_invariants()
    assert not cache.can_fit(make_seq(1, 1), 1)                        # no slot left
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.grow(b, 9)
    with pytest.raises(ValueError):
        cache.admit(a)
    cache.release(a)
    assert a.slot is None and a.pages == [] and cache.pages.num_free == 3
    cache.release(b)
    cache.check_invariants()
    assert cache.pages.num_free == 5 and cache.slots.num_free == 2


# ---------------------------------------------------------------------------------------------------- scheduler

def test_chunked_prefill_samples_only_at_the_end():
    h = Harness(make_sched(budget=16, max_num_seqs=4))
    long, short = make_seq(40, 3), make_seq(2, 3)
    h.add(long)
    h.add(short)
    steps = [h.step() for _ in range(3)]
    assert [e for s in steps for e in s.entries] == [(long, 16), (long, 16), (long, 8), (short, 2)]
    assert [s.samples for s in steps] == [[False], [False], [True, True]]
    assert steps[0].newly_started == [long] and steps[2].newly_started == [short]


def test_strict_fcfs_short_request_does_not_overtake():
    h = Harness(make_sched(num_pages=6, page_size=4, budget=64))
    first, head, short = make_seq(16, 8, stop=False), make_seq(12, 2), make_seq(2, 2)
    h.add(first)
    h.step()                                   # first holds 4 pages, 2 are free
    h.add(head)                                # needs 3 pages: must wait
    h.add(short)                               # would fit in 1 page, but must not overtake
    step = h.step()
    assert step.entries == [(first, 1)]
    run_all(h, [])
    assert h.first_admissions == [0, 1, 2]


def test_memory_pressure_preempts_and_outputs_match():
    def workload():
        rng = random.Random(7)
        return [make_seq(rng.randint(5, 20), rng.randint(20, 40), rng, stop=False) for _ in range(6)]

    roomy, tight = Harness(make_sched(num_pages=200)), Harness(make_sched(num_pages=16))
    run_all(roomy, easy := workload())
    run_all(tight, hard := workload())
    assert sum(s.num_preemptions for s in easy) == 0
    assert sum(s.num_preemptions for s in hard) > 0
    for a, b in zip(easy, hard, strict=True):
        assert a.output_ids == b.output_ids == reference(a.prompt_ids, a.params)[0]
        assert a.finish_reason == b.finish_reason == "length"
    assert_drained(tight.sched)


def test_one_sequence_can_use_the_whole_cache():
    h = Harness(make_sched(num_pages=8, page_size=4, budget=8))
    big = make_seq(20, 13, stop=False)                              # 32 tokens cached at most = 8 pages
    run_all(h, [make_seq(6, 20, stop=False), big, make_seq(3, 30, stop=False)])
    assert big.output_ids == reference(big.prompt_ids, big.params)[0]
    assert_drained(h.sched)


def test_abort_frees_at_once():
    h = Harness(make_sched(num_slots=2, max_num_seqs=2, num_pages=64))
    seqs = [make_seq(10, 20, stop=False) for _ in range(3)]
    for seq in seqs:
        h.add(seq)
    h.step()
    running, waiting = seqs[0], seqs[2]
    assert running.status is Status.RUNNING and waiting.status is Status.WAITING
    used_pages, used_slots = h.sched.cache.pages.num_used, h.sched.cache.slots.num_used
    n_pages = len(running.pages)
    assert h.sched.abort(running.seq_id) is running
    assert running.finish_reason == "abort" and running.slot is None and not running.pages
    assert h.sched.cache.pages.num_used == used_pages - n_pages
    assert h.sched.cache.slots.num_used == used_slots - 1
    assert h.sched.abort(waiting.seq_id) is waiting and waiting.is_finished
    assert h.sched.abort(waiting.seq_id) is None and h.sched.abort(10**9) is None
    h.sched.check_invariants()
    run_all(h, [])
    assert seqs[1].finish_reason == "length"
    assert_drained(h.sched)


def test_add_rejects_impossible_requests():
    sched = make_sched(num_pages=4, page_size=4, max_model_len=40)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(make_seq(30, 11))
    with pytest.raises(ValueError, match="pages"):
        sched.add(make_seq(10, 8))                                  # 17 tokens cached -> 5 pages > 4
    with pytest.raises(ValueError, match="empty"):
        sched.add(make_seq(0, 1))
    ok = make_seq(10, 7)                                            # 16 tokens cached -> exactly 4 pages
    sched.add(ok)
    with pytest.raises(ValueError):
        sched.add(ok)
    assert list(sched.waiting) == [ok]


# ---------------------------------------------------------------------------------------------------- random

def random_workload(seed: int) -> tuple[Harness, list[tuple[int, Sequence]]]:
    rng = random.Random(seed)
    page_size, max_model_len = rng.choice([1, 2, 4, 16]), 96
    reqs = []
    for _ in range(rng.randint(1, 25)):
        p = rng.randint(1, 60)
        reqs.append((rng.randint(0, 40), make_seq(p, rng.randint(1, max_model_len - p), rng, rng.random() < 0.5)))
    need = max(-(-(len(s.prompt_ids) + s.params.max_tokens - 1) // page_size) for _, s in reqs)
    slots = rng.randint(1, 6)
    sched = Scheduler(CacheManager(slots, need + rng.randint(0, 2 * need), page_size),
                      rng.randint(1, slots + 2), rng.randint(1, 64), max_model_len)
    return Harness(sched, finish_before_update=seed % 2 == 1), reqs


@pytest.mark.parametrize("seed", range(150))
def test_random_workloads(seed):
    h, reqs = random_workload(seed)
    rng, pending = random.Random(-seed), sorted(reqs, key=lambda r: r[0])
    bound = 20 * sum(len(s.prompt_ids) + s.params.max_tokens for _, s in reqs) + 100
    while pending or h.sched.has_work:
        while pending and pending[0][0] <= h.steps:
            h.add(pending.pop(0)[1])
        if h.sched.has_work and rng.random() < 0.02:
            h.sched.abort(rng.choice([*h.sched.running, *h.sched.waiting]).seq_id)
            h.sched.check_invariants()
        h.step()
        assert h.steps < bound, "no progress (deadlock or livelock)"
    for _, seq in reqs:
        assert seq.is_finished
        if seq.finish_reason != "abort":
            assert (seq.output_ids, seq.finish_reason) == reference(seq.prompt_ids, seq.params)
    assert_drained(h.sched)


def test_cache_budget_below_one_full_length_sequence_is_an_error():
    # Allocating one full-length sequence anyway exceeded the budget the user set: on CPU a --max-model-len of 1e8
    # had the OS kill the process without a word.
    from dsv4.config import tiny_config
    from dsv4.engine.config import EngineConfig, bytes_per_page, cache_pages

    cfg = tiny_config()
    econf = EngineConfig(cpu_cache_gib=0.01, enable_prefix_caching=False)
    per_page = bytes_per_page(cfg, econf.page_size, econf.torch_dtype())
    fits = int(0.01 * 2**30 // per_page) * econf.page_size            # the longest length within the budget
    assert cache_pages(cfg, econf, fits) >= fits // econf.page_size
    with pytest.raises(ValueError, match="more than the cache budget"):
        cache_pages(cfg, econf, fits + econf.page_size)
    with pytest.raises(ValueError, match="cpu_cache_gib must be > 0"):         # not "more than the budget (-1 GiB)"
        EngineConfig(cpu_cache_gib=-1)
