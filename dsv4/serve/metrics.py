"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own so that several apps can live in one
process (tests). Updated from the engine thread; prometheus_client's metrics are thread-safe.

Throughput is both a counter (`dsv4_generation_tokens_total`, use `rate()`) and a gauge over the last
`window_s` seconds for people reading the endpoint by eye.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_STATE = {"running": "requests running (holding a slot)", "waiting": "requests queued for a slot or pages",
          "pages_in_use": "cache pages in use", "pages_total": "cache pages in all",
          "slots_in_use": "sequence slots in use", "slots_total": "sequence slots in all",
          "preemptions": "sequences preempted so far (recomputed later)",
          "prefix_cache_queries": "prompt tokens looked up in the prefix cache (first admissions)",
          "prefix_cache_hits": "prompt tokens found in the prefix cache",
          "prefix_cache_hit_rate": "prefix_cache_hits / prefix_cache_queries since start (0 when off)",
          "prefix_cache_pages": "cache pages holding cached prefix blocks (idle ones count as free)"}

_SPEC = {"num_draft_tokens": "draft tokens proposed by the MTP block and verified",
         "num_accepted_tokens": "draft tokens accepted", "num_steps": "verification steps"}


class Metrics:
    def __init__(self, window_s: float = 10.0):
        self.registry = r = CollectorRegistry()
        self.state = {k: Gauge(f"dsv4_{k}", doc, registry=r) for k, doc in _STATE.items()}
        self.cache_usage = Gauge("dsv4_cache_usage_ratio", "fraction of the cache pages in use", registry=r)
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("dsv4_generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("dsv4_requests", "finished requests", ["finish_reason"], registry=r)
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("dsv4_time_per_output_token_seconds", "mean time between output tokens, per request",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("dsv4_e2e_request_latency_seconds", "arrival to last token", buckets=LATENCY_BUCKETS,
                             registry=r)
        # Speculative decoding (engine/speculative.py), added when a request finishes; acceptance = accepted / draft.
        self.spec = {k: Counter(f"dsv4_spec_decode_{k}", doc, registry=r) for k, doc in _SPEC.items()}
        throughput = Gauge("dsv4_generation_tokens_per_second", f"tokens generated per second over the last "
                           f"{window_s:g} s", registry=r)
        throughput.set_function(self.tokens_per_second)
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- called from the engine thread --------------------------------------------------------------------
    def engine_state(self, stats: dict) -> None:
        for k, gauge in self.state.items():
            gauge.set(stats[k])
        self.cache_usage.set(stats["pages_in_use"] / max(stats["pages_total"], 1))

    def request_added(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def generated(self, n: int, _out=None) -> None:
        if n:
            self.generation_tokens.inc(n)
            with self._lock:
                self._recent.append((time.monotonic(), n))

    def request_finished(self, reason: str, track, now: float, out=None) -> None:
        self.requests.labels(finish_reason=reason).inc()
        spec = getattr(out, "metrics", None)
        if spec is not None:
            self.spec["num_draft_tokens"].inc(spec.num_draft_tokens)
            self.spec["num_accepted_tokens"].inc(spec.num_accepted_tokens)
            self.spec["num_steps"].inc(spec.num_spec_steps)
        if out is None or track.first_token is None:
            return
        self.e2e.observe(now - track.arrival)
        n = max(len(c.token_ids) for c in out.outputs)
        if n > 1:
            self.tpot.observe((now - track.first_token) / (n - 1))

    # -- read at scrape time ------------------------------------------------------------------------------
    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s
