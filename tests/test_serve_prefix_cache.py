"""Prefix caching seen through the OpenAI API: usage.prompt_tokens_details.cached_tokens (chat and completions,
streamed usage too) and the hit rate on /metrics. Built-in architecture, real V4 vocabulary, untrained."""

from __future__ import annotations

import httpx
import openai
import pytest
from serve_helpers import live_server, make_app

from dsv4.engine.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.tokenizer import load_tokenizer

# A long shared system prompt: more than one 128-token block.
SYSTEM = " ".join(f"rule {i}: answer briefly." for i in range(60))


@pytest.fixture(scope="module")
def server(builtin_model_fp32):
    tokenizer = load_tokenizer(None)
    engine = Engine(builtin_model_fp32, tokenizer,
                    EngineConfig(max_num_seqs=4, page_size=128, num_pages=16, max_model_len=1024))
    app, _ = make_app(engine, tokenizer)
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_and_completions_report_cached_tokens_and_metrics_the_hit_rate(server, client):
    kw = dict(model="m", temperature=0, max_tokens=2, extra_body={"ignore_eos": True})

    def chat(user, **more):
        return client.chat.completions.create(messages=[{"role": "system", "content": SYSTEM},
                                                        {"role": "user", "content": user}], **kw, **more)

    first = chat("Hi")
    assert first.usage.prompt_tokens > 256 and first.usage.prompt_tokens_details.cached_tokens == 0
    # The first request left a snapshot at its last block boundary, inside the system prompt.
    again, third = chat("Hello"), chat("Hey")
    assert again.usage.prompt_tokens_details.cached_tokens >= 128
    assert third.usage.prompt_tokens_details.cached_tokens >= 128
    chunks = list(chat("Hey", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 128
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == third.choices[0].message.content

    prompt = "Notes. " + SYSTEM
    cold = client.completions.create(prompt=[prompt, prompt + " more"], **kw)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    warm = client.completions.create(prompt=[prompt, prompt + " more"], **kw)
    assert warm.usage.prompt_tokens_details.cached_tokens >= 2 * 128
    assert [c.text for c in warm.choices] == [c.text for c in cold.choices]

    metrics = httpx.get(server + "/metrics").text
    rate = next(float(line.split()[1]) for line in metrics.splitlines()
                if line.startswith("dsv4_prefix_cache_hit_rate "))
    assert 0 < rate < 1
    health = httpx.get(server + "/health").json()
    assert health["prefix_cache_hits"] > 0 and health["prefix_cache_pages"] > 0
