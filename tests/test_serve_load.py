"""Load: 72 streaming clients at once on 127.0.0.1 against the tiny model (16 slots and a cache smaller than 16
full-length sequences, so most of them queue), mixed prompt and output lengths, 16 of them hanging up after their
first token.

Every request must end cleanly (finished with [DONE], or cancelled by its client), the finished ones must carry
exactly the tokens the same request gets when run alone (greedy; the fp32 engine is batch-invariant), no cache
page or slot may be left in use, and the server must still be healthy. The figures (requests, concurrency,
p50/p99 latency, pages in use at the end) are printed with the test result.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import openai
import pytest
from serve_helpers import live_server, make_app

from dsv4.engine.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.tokenizer import load_tokenizer

N_CLIENTS, N_DISCONNECT = 72, 16


@pytest.fixture(scope="module")
def server(tiny_model_fp32):
    tokenizer = load_tokenizer(None)
    engine = Engine(tiny_model_fp32, tokenizer, EngineConfig(max_num_seqs=16, page_size=128, num_pages=12,
                                                              max_num_batched_tokens=256, max_model_len=256))
    app, async_engine = make_app(engine, tokenizer)
    with live_server(app) as url:
        yield url, async_engine


def make_requests() -> list[dict]:
    rng = random.Random(6)
    reqs = []
    for i in range(N_CLIENTS):
        hang_up = i % (N_CLIENTS // N_DISCONNECT) == 0 and len(reqs) - sum(not r["hang_up"] for r in reqs) < 16
        prompt = [0] + [rng.randrange(2, 512) for _ in range(rng.choice([2, 9, 30, 70, 120]) - 1)]
        reqs.append({"prompt": prompt, "max_tokens": 40 if hang_up else rng.randint(2, 12), "hang_up": hang_up,
                     "via": "httpx" if hang_up or i % 3 == 0 else "openai"})
    assert sum(r["hang_up"] for r in reqs) == N_DISCONNECT
    return reqs


def body(req: dict) -> dict:
    return {"model": "m", "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "ignore_eos": True}


class InFlight:
    def __init__(self):
        self.now = self.max = 0

    def __enter__(self):
        self.now += 1
        self.max = max(self.max, self.now)

    def __exit__(self, *exc):
        self.now -= 1


async def run_openai(client: openai.AsyncOpenAI, req: dict, flight: InFlight) -> dict:
    with flight:
        t0 = time.monotonic()
        kw = {k: v for k, v in body(req).items() if k != "ignore_eos"} | {"extra_body": {"ignore_eos": True}}
        stream = await client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        text, usage, finish = [], None, None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return {"text": "".join(text), "finish": finish, "tokens": usage.completion_tokens,
                "latency": time.monotonic() - t0, "done": True}


async def run_httpx(client: httpx.AsyncClient, req: dict, flight: InFlight) -> dict:
    with flight:
        t0 = time.monotonic()
        text, finish, done = [], None, False
        async with client.stream("POST", "/v1/completions", json=body(req) | {"stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    text.append(choice["text"])
                    finish = choice["finish_reason"] or finish
                    if req["hang_up"] and choice["text"]:
                        break               # leaving the block closes the connection mid-stream
        return {"text": "".join(text), "finish": finish, "tokens": None, "latency": time.monotonic() - t0,
                "done": done}


async def load(url: str, reqs: list[dict]) -> tuple[list[dict], int]:
    flight = InFlight()
    limits = httpx.Limits(max_connections=N_CLIENTS + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as hc, \
            openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120,
                               http_client=httpx.AsyncClient(limits=limits, timeout=120)) as oc:
        tasks = [run_httpx(hc, r, flight) if r["via"] == "httpx" else run_openai(oc, r, flight) for r in reqs]
        return await asyncio.gather(*tasks), flight.max


def wait_idle(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health").json()
        if health["running"] == health["waiting"] == health["pages_in_use"] == health["slots_in_use"] == 0:
            return health
        assert time.monotonic() < deadline, f"the server did not drain: {health}"
        time.sleep(0.05)


def test_many_concurrent_streaming_clients(server, record_property, capsys):
    url, async_engine = server
    reqs = make_requests()
    t0 = time.monotonic()
    results, max_in_flight = asyncio.run(load(url, reqs))
    wall = time.monotonic() - t0
    health = wait_idle(url)
    assert async_engine.call(lambda e: e.scheduler.check_invariants() or e.has_unfinished()).result(10) is False

    finished = [(q, r) for q, r in zip(reqs, results, strict=True) if not q["hang_up"]]
    for q, r in finished:
        assert r["done"] and r["finish"] == "length", r
        assert r["tokens"] in (None, q["max_tokens"])
    for q, r in zip(reqs, results, strict=True):
        if q["hang_up"]:
            assert not r["done"] and r["text"], r           # it left mid-stream, after a token
    metrics = httpx.get(url + "/metrics").text
    aborted = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith('dsv4_requests_total{finish_reason="abort"}'))
    assert aborted >= 1, "no hung-up request was cancelled"

    # Greedy outputs equal the same requests run alone (one at a time through the same server).
    with httpx.Client(base_url=url, timeout=60) as c:
        for q, r in finished:
            alone = c.post("/v1/completions", json=body(q)).json()["choices"][0]["text"]
            assert r["text"] == alone, (q["prompt"][:5], r["text"], alone)

    lat = sorted(r["latency"] for _, r in finished)
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    assert max_in_flight >= 64
    assert httpx.get(url + "/health").json()["status"] == "ok"
    figures = {"requests": N_CLIENTS, "max_in_flight": max_in_flight, "disconnected_early": N_DISCONNECT,
               "aborted_by_server": int(aborted), "p50_latency_s": round(p50, 3), "p99_latency_s": round(p99, 3),
               "wall_s": round(wall, 2), "pages_in_use_at_end": health["pages_in_use"],
               "slots_in_use_at_end": health["slots_in_use"], "preemptions": health["preemptions"]}
    for k, v in figures.items():
        record_property(k, v)
    with capsys.disabled():
        print(f"\nserve load figures: {json.dumps(figures)}")
