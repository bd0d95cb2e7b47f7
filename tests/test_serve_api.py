"""The OpenAI API end to end on a live server running the built-in tiny model (real V4 vocabulary, untrained):
the official openai client and plain httpx, every parameter the issue lists, /health and /metrics.

The model's text is noise, so tests compare the server with itself (streamed vs not, seeded twice) and with the
offline engine, never with expected words. Requests are a few tokens each: a step costs ~0.1 s on CPU here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest
from serve_helpers import live_server, make_app, serve_command

from dsv4.engine.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams

USER = [{"role": "user", "content": "Hello there"}]



def engine_for(model, tokenizer):
    return Engine(model, tokenizer, EngineConfig(max_num_seqs=8, page_size=128, num_pages=16, max_model_len=512))


@pytest.fixture(scope="module")
def server(builtin_model_fp32, tokenizer):
    app, async_engine = make_app(engine_for(builtin_model_fp32, tokenizer), tokenizer)
    with live_server(app) as url:
        yield url, async_engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_health_and_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list()] == ["m"]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["pages_in_use"] == 0 and health["pages_total"] == 16
    text = httpx.get(url + "/metrics").text
    for name in ("dsv4_running", "dsv4_waiting", "dsv4_pages_in_use", "dsv4_cache_usage_ratio",
                 "dsv4_generation_tokens_total", "dsv4_generation_tokens_per_second",
                 "dsv4_time_to_first_token_seconds_bucket", "dsv4_time_per_output_token_seconds_bucket"):
        assert f"\n{name}" in text, name


def test_chat_streamed_equals_non_streamed_and_reports_usage(server, client):
    kw = dict(model="m", messages=USER, temperature=0, max_tokens=4, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert whole.usage.completion_tokens == 4 and whole.usage.total_tokens == whole.usage.prompt_tokens + 4


def test_completions_match_the_offline_engine(server, client, builtin_model_fp32, tokenizer):
    """A list of prompts, n, logprobs: the server's greedy tokens are the engine's own."""
    prompts = ["Hello", "The capital of France is"]
    out = client.completions.create(model="m", prompt=prompts, n=2, max_tokens=3, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    engine = engine_for(builtin_model_fp32, tokenizer)
    ids = [[0, *tokenizer.encode(p, add_special_tokens=False).ids] for p in prompts]
    for i, p in enumerate(ids):
        ref = engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=0))
        while not ref.finished:
            engine.step()
        for c in out.choices[2 * i:2 * i + 2]:
            assert c.text == ref.text and c.finish_reason == "length"
            lp = c.logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
            assert all(len(top) <= 3 and max(top.values()) >= v - 1e-6
                       for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
            # fp32 logsumexp over the 129k vocabulary: its reduction order may follow the batch shape (4 rows
            # here, 1 in the reference), so equal up to a few fp32 ulps (relative 1e-6), not bit-exact.
            assert lp.token_logprobs == pytest.approx(
                [ref.outputs[0].logprobs[k][t] for k, t in enumerate(ref.token_ids)], rel=1e-6, abs=0)
    assert out.usage.prompt_tokens == sum(map(len, ids)) and out.usage.completion_tokens == 12


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="m", prompt="Once upon a time", max_tokens=4, temperature=1.0, top_p=0.9, presence_penalty=0.5,
              frequency_penalty=0.5,
              extra_body={"ignore_eos": True, "repetition_penalty": 1.1, "top_k": 50, "min_p": 0.01})
    a = client.completions.create(**kw, seed=7, n=2)
    b = client.completions.create(**kw, seed=7, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text       # copies of one request get their own seeds


def test_stop_string_ends_the_text(client):
    kw = dict(model="m", prompt=[0, 11, 12, 13], temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw, max_tokens=6).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = client.completions.create(**kw, max_tokens=6, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="m", messages=USER, max_tokens=2, temperature=0, logprobs=True,
                                         top_logprobs=2)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token


@pytest.mark.parametrize("thinking", [{"chat_template_kwargs": {"thinking": True}}, {"reasoning_effort": "max"}])
def test_thinking_mode_puts_the_reply_in_reasoning(client, thinking):
    """Without `</think>` (an untrained model never writes it) the whole reply is reasoning."""
    kw = dict(model="m", messages=USER, max_tokens=3, temperature=0, extra_body={"ignore_eos": True, **thinking})
    msg = client.chat.completions.create(**kw).choices[0].message
    assert msg.reasoning_content and msg.content == ""
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    assert streamed == msg.reasoning_content
    assert all(not c.choices[0].delta.content for c in chunks)


def test_raw_sse_over_httpx(server):
    body = {"model": "m", "prompt": "hi", "max_tokens": 2, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["usage"]["completion_tokens"] == 2 and events[-1]["choices"] == []
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) != ""


def test_metrics_and_pages_after_the_module(server):
    url, async_engine = server
    assert async_engine.call(lambda e: (e.scheduler.check_invariants(), e.cache.pages.num_used)).result(10)[1] == 0
    values = {line.split()[0]: float(line.split()[1]) for line in httpx.get(url + "/metrics").text.splitlines()
              if line and not line.startswith("#")}
    assert values["dsv4_generation_tokens_total"] >= 20 and values["dsv4_prompt_tokens_total"] > 0
    finished = sum(v for k, v in values.items() if k.startswith("dsv4_requests_total{"))
    assert values["dsv4_time_to_first_token_seconds_count"] == finished > 10
    assert values["dsv4_time_per_output_token_seconds_count"] > 0 and values["dsv4_pages_in_use"] == 0


# ------------------------------------------------------------------------------------------------ the command

def test_serve_help_explains_the_api_and_binds_loopback():
    from dsv4.cli import SERVE_ENGINE_DEFAULTS, build_parser

    out = subprocess.run([sys.executable, "-m", "dsv4", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for word in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "tool_calls",
                 "reasoning_content", "thinking", "stream_options", "--served-model-name", "127.0.0.1"):
        assert word in out, word
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    d = EngineConfig()
    assert SERVE_ENGINE_DEFAULTS == {k: getattr(d, k) for k in SERVE_ENGINE_DEFAULTS}
    assert build_parser().parse_args(["serve"]).prefill_graphs is d.prefill_graphs is None    # CUDA's default
    assert build_parser().parse_args(["serve", "--no-prefill-graphs"]).prefill_graphs is False
    assert build_parser().parse_args(["serve"]).async_decode is d.async_decode is None         # on where captured
    assert build_parser().parse_args(["serve", "--no-async-decode"]).async_decode is False


def test_dsv4_serve_command_serves_and_stops(builtin_ckpt, tmp_path):
    import signal

    args = ["--model", str(builtin_ckpt), "--served-model-name", "tiny", "--max-model-len", "256", "--num-pages", "4",
            "--page-size", "128", "--max-num-seqs", "2", "--log-level", "warning"]
    with serve_command(*args) as (proc, url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = c.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        assert out.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
