"""Structured outputs, forced tool calls and API keys on a live server, through the official openai client.

Two models: the random-weight built-in architecture with the real V4 vocabulary (its text is noise, so any valid
output is the constraint's doing) and the trained built-in model (its own 4096-token vocabulary). Schemas are
small and bounded (enums, bounded integers, short strings) so that noise finishes within a few tokens.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from serve_helpers import live_server, make_app

pytest.importorskip("xgrammar")

from dsv4.engine.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.tokenizer import load_tokenizer

USER = [{"role": "user", "content": "Describe the weather"}]
KEY = "sk-test-123"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                     "metric": {"type": "boolean"}},
    "required": ["city", "days"], "additionalProperties": False}}}
OTHER = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


class Weather(BaseModel):
    sky: Literal["sunny", "rainy", "cloudy"]
    celsius: int = Field(ge=-20, le=40)
    windy: bool


def engine_for(model, tokenizer, seqs: int = 16):
    return Engine(model, tokenizer, EngineConfig(max_num_seqs=seqs, page_size=128, num_pages=8 * seqs,
                                                 max_model_len=1024))


@pytest.fixture(scope="module")
def server(builtin_model_fp32):
    tokenizer = load_tokenizer(None)
    app, _ = make_app(engine_for(builtin_model_fp32, tokenizer, 24), tokenizer, api_key=KEY)   # `answers`: 22 rows
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def builtin_client():
    import dsv4
    from dsv4.builtin import builtin_model_path

    model = dsv4.load_model(builtin_model_path(), progress=False)
    tokenizer = load_tokenizer(builtin_model_path())
    app, _ = make_app(engine_for(model, tokenizer, 8), tokenizer)
    with live_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def parse(client, max_tokens=40, **kw):
    return client.chat.completions.parse(model="m", messages=USER, response_format=Weather, max_tokens=max_tokens,
                                         **kw)


STRICT = {"type": "json_schema", "json_schema": {"name": "w", "schema": Weather.model_json_schema(), "strict": True}}


@pytest.fixture(scope="module")
def answers(client):
    """The long requests of the tests below, sent at once: the server batches them (22 rows) and a step's cost is
    mostly the 129k-vocabulary head, which the rows share (measured: 46 s at once, 77 s one after another). Seeded
    sampling and the fp32 model's batch invariance make each answer the one it gets alone (measured: identical).
    A test takes its own with `.result()`, so a failed request fails its test only; streams are read whole."""
    def create(stream=False, **kw):
        out = client.chat.completions.create(model="m", messages=USER, stream=stream, **kw)
        return list(out) if stream else out

    tools = {"tools": [TOOL, OTHER], "max_tokens": 300}
    requests = {
        "parsed": lambda: parse(client, n=16, seed=7),
        "strict": lambda: create(response_format=STRICT, max_tokens=40, seed=4),
        "strict_stream": lambda: create(response_format=STRICT, max_tokens=40, seed=4, stream=True),
        "json_object": lambda: create(response_format={"type": "json_object"}, max_tokens=24, seed=1),
        "required": lambda: create(**tools, tool_choice="required", parallel_tool_calls=False, n=2, seed=11),
        "named": lambda: create(**tools, seed=5, stream=True,
                                tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    }
    with ThreadPoolExecutor(len(requests)) as pool:
        yield {name: pool.submit(request) for name, request in requests.items()}


def test_parse_with_a_pydantic_model_on_the_random_v4_vocab_model(answers):
    """16 seeded samples of noise (one batch), all valid: the grammar, not the model, makes them so."""
    out = answers["parsed"].result()
    assert len(out.choices) == 16
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Weather)
    assert len({c.message.content for c in out.choices}) > 5        # noise, constrained: not one answer


def test_parse_on_the_builtin_model(builtin_client):
    out = parse(builtin_client, max_tokens=64, n=4, seed=3)      # its small vocabulary spells JSON finely
    for choice in out.choices:
        assert isinstance(choice.message.parsed, Weather), choice.message.content


def test_json_object_and_streaming_without_markup(answers):
    full, stream = answers["strict"].result(), answers["strict_stream"].result()
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == full.choices[0].message.content
    Weather.model_validate_json(text)
    content = answers["json_object"].result().choices[0].message.content
    assert content.startswith("{") and "<｜" not in content


def test_thinking_mode_keeps_the_reasoning_free(client):
    out = client.chat.completions.create(model="m", messages=USER, max_tokens=12, seed=2,
                                         response_format={"type": "json_object"},
                                         extra_body={"chat_template_kwargs": {"thinking": True}})
    msg = out.choices[0].message
    assert getattr(msg, "reasoning_content", None)          # noise: the model never closed its reasoning
    assert not msg.content


SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (TOOL, OTHER)}


def check_calls(choice, names) -> None:
    assert choice.finish_reason == "tool_calls", choice
    assert not choice.message.content
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0].function
    assert call.name in names
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_required_tool_call_parses_and_validates(answers):
    """parallel_tool_calls=false: one call, so that noise cannot chain calls past max_tokens (noise spells the
    markup out of small tokens, hence the generous max_tokens)."""
    out = answers["required"].result()
    for choice in out.choices:
        check_calls(choice, ("get_weather", "now"))


def test_named_tool_call_streams_valid_arguments(answers):
    """Streamed: no content, one call of the named tool, argument deltas that add up to valid arguments (the
    non-streamed path shares the parser: tests/test_serve_api.py compares the two)."""
    names, args, content, finish = [], "", "", None
    for chunk in answers["named"].result():
        for choice in chunk.choices[:1]:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                names += [call.function.name] if call.function.name else []
                args += call.function.arguments or ""
    assert (names, content, finish) == (["get_weather"], "", "tool_calls")
    jsonschema.validate(json.loads(args), SCHEMAS["get_weather"])


def test_vllm_structured_outputs_extension_on_completions(client):
    out = client.completions.create(model="m", prompt="The answer is", max_tokens=8, seed=1, n=3,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.text for c in out.choices} <= {"yes", "no"}
    out = client.completions.create(model="m", prompt="Code:", max_tokens=8, seed=1,
                                    extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{2}"}})
    assert len(out.choices[0].text) == 4


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format",
     "minimum greater than maximum"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
     "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"not": {"type": "null"}}}}}}},
     "response_format", "'not'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}}}}],
      "tool_choice": "required"}, "tools[0].function.parameters", "'oneOf'"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "invalid regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
])
def test_bad_constraints_are_400s(server, body, param, words):
    r = httpx.post(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "m", "messages": USER, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_api_key_is_required_on_v1_and_not_on_health(server, client):
    assert httpx.get(server + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    r = httpx.post(server + "/v1/chat/completions", json={"model": "m", "messages": USER})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()
    assert client.models.list().data[0].id == "m"
    out = client.chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_exposed_host_without_a_key_warns(capsys):
    import io

    from dsv4.serve.auth import warn_if_exposed

    for host, key, warned in [("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False),
                              ("::1", None, False), ("localhost", None, False), ("10.1.2.3", None, True)]:
        out = io.StringIO()
        assert warn_if_exposed(host, key, out) is warned
        assert ("without an API key" in out.getvalue()) is warned


def test_dsv4_serve_takes_the_key_from_the_environment():
    """The CLI path: DSV4_API_KEY (the built-in model, its own vocabulary: quick to load)."""
    import os

    from serve_helpers import serve_command

    args = ["--max-model-len", "256", "--num-pages", "2", "--page-size", "128", "--max-num-seqs", "1",
            "--log-level", "warning"]
    with serve_command(*args, env={**os.environ, "DSV4_API_KEY": KEY}) as (_, url):
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert models.status_code == 200 and models.json()["data"]
