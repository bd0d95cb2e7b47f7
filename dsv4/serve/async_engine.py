"""The engine behind the server: ONE background thread drives `Engine.step()`; HTTP handlers talk to it only
through a command queue, and get their outputs on their own asyncio queues.

Why a thread and not an asyncio task: a step is seconds of blocking tensor work on a big model, which would
freeze the event loop (no new connections, no disconnect detection) for its whole length. torch releases the GIL
inside its kernels, so the loop stays responsive while the thread computes.

Between two steps the thread drains the command queue: new requests join the running batch at the next step,
and an abort (a client that went away) frees the request's slot and pages before the next step runs. The engine
object is touched by this thread only; everything the handlers read (`stats`) is a snapshot it publishes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from dsv4.engine.sampling import SamplingParams

log = logging.getLogger("dsv4.serve")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down, or a step raised); nothing more can run."""


@dataclass(frozen=True)
class Update:
    """What one completion (`index`) of one engine request produced since its last update."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None        # set on the completion's last update: "stop" | "length"
    num_cached_tokens: int | None = None   # the request's prompt tokens found in the prefix cache


@dataclass(frozen=True)
class _StepOutput:
    updates: list[Update]
    finished: list[str]              # request ids that will get no more updates


_ABORTED = object()


class Subscription:
    """The engine requests of one HTTP request, and the queue their updates arrive on (in the event loop)."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], loop: asyncio.AbstractEventLoop):
        self.engine, self.request_ids, self.loop = engine, request_ids, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = set(request_ids)
        self.aborted = False
        self.cached_tokens: dict[str, int] = {}      # request id -> prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return not self.pending

    def post(self, item) -> bool:
        """From the engine thread; False when the event loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:
            return False

    async def updates(self) -> AsyncIterator[list[Update]]:
        """Batches of updates until every request finished (or the subscription was aborted). Items that are
        already queued are merged into one batch, so a slow client gets fewer, bigger chunks."""
        while self.pending and not self.aborted:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            batch = []
            for item in items:
                if item is _ABORTED:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch += item.updates
                self.cached_tokens.update((u.request_id, u.num_cached_tokens) for u in item.updates
                                          if u.num_cached_tokens is not None)
                self.pending.difference_update(item.finished)
            if batch:
                yield batch

    def abort(self) -> None:
        """Cancel whatever is unfinished (idempotent); the pages are free before the engine's next step."""
        if self.aborted or not self.pending:
            return
        self.aborted = True
        self.engine.abort(sorted(self.pending))
        self.queue.put_nowait(_ABORTED)


@dataclass
class _Track:
    """Engine-thread bookkeeping of one request: how much of each completion was already sent."""

    sub: Subscription
    n: int
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    sent_tokens: list[int] = field(default_factory=list)
    sent_text: list[int] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)

    def __post_init__(self):
        self.sent_tokens, self.sent_text, self.done = [0] * self.n, [0] * self.n, [False] * self.n

    def updates(self, out) -> list[Update]:
        ups = []
        for i, c in enumerate(out.outputs):
            if self.done[i]:
                continue
            k, t = self.sent_tokens[i], self.sent_text[i]
            finish = c.finish_reason
            if len(c.token_ids) > k or len(c.text) > t or finish is not None:
                logprobs = c.logprobs[k:] if c.logprobs is not None else None
                ups.append(Update(out.request_id, i, c.text[t:], c.token_ids[k:], logprobs, finish,
                                  out.num_cached_tokens))
                self.sent_tokens[i], self.sent_text[i], self.done[i] = len(c.token_ids), len(c.text), finish is not None
        return ups


class AsyncEngine:
    def __init__(self, engine, metrics=None, idle_wait_s: float = 0.5):
        self.engine, self.metrics, self.idle_wait_s = engine, metrics, idle_wait_s
        self.error: BaseException | None = None
        self.num_steps = 0
        self.stats: dict = {}
        self._commands: deque = deque()
        self._wake = threading.Event()
        self._tracks: dict[str, _Track] = {}
        self._stopping = False
        self._closed = False
        self._lock = threading.Lock()      # orders `_send` against `_close`: no command is ever left unanswered
        self._thread: threading.Thread | None = None
        self._publish_stats()

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything in flight and end the thread (after the step it is in, if any)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ------------------------------------------------------------------------------------------ handler side
    async def submit(self, requests: list[tuple[list[int], SamplingParams]], prefix: str = "req") -> Subscription:
        """Add engine requests (one per prompt) atomically; raises the engine's RequestError if any is refused."""
        base = f"{prefix}-{uuid.uuid4().hex}"
        ids = [base if len(requests) == 1 else f"{base}-{i}" for i in range(len(requests))]
        sub = Subscription(self, ids, asyncio.get_running_loop())
        done = self._send("add", sub, requests)
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            sub.abort()                 # queued after the add, so it finds the requests
            raise
        return sub

    def abort(self, request_ids: list[str]) -> None:
        self._send("abort", request_ids)

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run `fn(engine)` in the engine thread between two steps (tests use it to check invariants)."""
        return self._send("call", fn)

    def _send(self, kind: str, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self.alive or self._closed:
                fut.set_exception(EngineDeadError(self.dead_reason()))
                return fut
            self._commands.append((kind, args, fut))
        self._wake.set()
        return fut

    def dead_reason(self) -> str:
        if self.error is not None:
            return f"the engine stopped after an error: {type(self.error).__name__}: {self.error}"
        return "the engine is not running"

    # ------------------------------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()      # before draining: a command sent after the drain sets it again
                self._drain()
                if self._stopping:
                    break
                if not self.engine.has_unfinished():
                    self._wake.wait(self.idle_wait_s)
                    continue
                outputs = self.engine.step()
                self.num_steps += 1
                self._publish_stats()   # first: a client that sees this step's tokens sees its stats too
                self._publish(outputs)
        except BaseException as e:      # whatever it was, the handlers must hear about it
            self.error = e
            log.exception("the engine loop stopped")
        finally:
            self._stopping = True
            self._close()

    def _drain(self) -> None:
        while self._commands:
            kind, args, fut = self._commands.popleft()
            try:
                fut.set_result(getattr(self, f"_do_{kind}")(*args))
            except Exception as e:      # goes back to the caller
                fut.set_exception(e)
        self._publish_stats()

    def _do_add(self, sub: Subscription, requests: list[tuple[list[int], SamplingParams]]) -> None:
        added = []
        try:
            for rid, (ids, params) in zip(sub.request_ids, requests, strict=True):
                self.engine.add_request(rid, ids, params)
                added.append(rid)
                self._tracks[rid] = _Track(sub, params.n)
                if self.metrics is not None:
                    self.metrics.request_added(len(ids))
        except BaseException:
            self._do_abort(added, record=False)
            raise

    def _do_abort(self, request_ids: list[str], record: bool = True) -> None:
        for rid in request_ids:
            track = self._tracks.pop(rid, None)
            if track is not None:
                self.engine.abort(rid)
                if record and self.metrics is not None:
                    self.metrics.request_finished("abort", track, time.monotonic())

    def _do_call(self, fn: Callable):
        return fn(self.engine)

    def _publish(self, outputs) -> None:
        now = time.monotonic()
        for out in outputs:
            track = self._tracks.get(out.request_id)
            if track is None:
                continue
            ups = track.updates(out)
            if track.first_token is None and any(u.token_ids for u in ups):
                track.first_token = now
                if self.metrics is not None:
                    self.metrics.first_token(now - track.arrival)
            if self.metrics is not None:
                self.metrics.generated(sum(len(u.token_ids) for u in ups), out)
            finished = [out.request_id] if out.finished else []
            if finished:
                del self._tracks[out.request_id]
                if self.metrics is not None:
                    self.metrics.request_finished(out.outputs[0].finish_reason or "stop", track, now, out)
            if (ups or finished) and not track.sub.post(_StepOutput(ups, finished)) and not finished:
                self._do_abort([out.request_id])   # nobody is listening any more

    def _publish_stats(self) -> None:
        sched, cache = self.engine.scheduler, self.engine.cache
        self.stats = {"running": len(sched.running), "waiting": len(sched.waiting),
                      "pages_in_use": cache.pages.num_used, "pages_total": cache.pages.capacity,
                      "slots_in_use": cache.slots.num_used, "slots_total": cache.slots.capacity,
                      "steps": self.num_steps, "preemptions": self.engine.num_preemptions}
        prefix = cache.prefix
        self.stats |= {"prefix_cache_queries": prefix.query_tokens if prefix else 0,
                       "prefix_cache_hits": prefix.hit_tokens if prefix else 0,
                       "prefix_cache_hit_rate": prefix.hit_rate if prefix else 0.0,
                       "prefix_cache_pages": len(prefix.blocks) if prefix else 0}
        if self.metrics is not None:
            self.metrics.engine_state(self.stats)

    def _close(self) -> None:
        """The thread is ending: refuse queued commands, abort what runs, wake every waiting handler."""
        dead = EngineDeadError(self.dead_reason())
        with self._lock:
            self._closed = True
            while self._commands:
                self._commands.popleft()[2].set_exception(dead)
        subs = {id(t.sub): t.sub for t in self._tracks.values()}
        try:
            self._do_abort(list(self._tracks), record=False)
            self._publish_stats()
        except Exception:               # the engine may be what broke
            log.exception("could not abort the requests in flight")
        for sub in subs.values():
            sub.post(dead)
