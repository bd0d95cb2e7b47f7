"""Bad input gets an OpenAI-style error with the right 4xx — never a 500, never a hang — on a live server.

The server runs a scripted engine (real scheduler and pages, no model compute), since errors are the API
layer's business; a context of 160 tokens and ONE 128-token cache page keep every accepted request cheap and
make the engine itself refuse requests that would need two pages (its RequestError must become a 400).
"""

from __future__ import annotations

import functools
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from serve_helpers import live_server, make_app, scripted_engine

from dsv4.serve.protocol import ChatCompletionRequest, CompletionRequest
from dsv4.tokenizer import load_tokenizer

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(builtin_model_fp32):
    tokenizer = load_tokenizer(None)
    engine = scripted_engine(builtin_model_fp32, tokenizer, max_model_len=160, num_pages=1, max_num_seqs=4)
    app, async_engine = make_app(engine, tokenizer)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, async_engine


def assert_error(r: httpx.Response, status: int, param=..., code=...) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


def post(client: httpx.Client, path: str, body) -> httpx.Response:
    # ASCII JSON: bodies may hold lone surrogates ("\\ud800"), which JSON allows and UTF-8 cannot carry raw.
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def chat(**more) -> dict:
    return {"model": "m", "messages": USER, "max_tokens": 2} | more


FUNC = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
BAD_CHAT = [  # (body, status, param, code)
    (chat(model="nope"), 404, "model", "model_not_found"),
    (chat(messages=[]), 400, "messages", "invalid_value"),
    ({"messages": USER}, 400, "model", "missing_required_parameter"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0]", ...),
    (chat(messages=[{"role": "user"}]), 400, "messages[0].content", "missing_required_parameter"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, ...,
     ...),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                 {"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages[0].content[1]", "unsupported_value"),
    (chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "c1"}]), 400, "messages", "invalid_value"),
    (chat(messages=[{"role": "user", "content": " ".join(map(str, range(200)))}]), 400, "messages",
     "context_length_exceeded"),
    (chat(messages=[{"role": "user", "content": "\ud800"}]), 400, "messages", "invalid_value"),
    (chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    (chat(max_tokens=-3), 400, "max_tokens", "invalid_value"),
    (chat(max_tokens=158), 400, "max_tokens", "context_length_exceeded"),
    (chat(max_tokens=None, max_completion_tokens=10**6), 400, "max_completion_tokens", "context_length_exceeded"),
    (chat(max_tokens=2, max_completion_tokens=3), 400, "max_tokens", "invalid_value"),
    (chat(max_tokens="2"), 400, "max_tokens", "invalid_type"),
    (chat(max_tokens=2.5), 400, "max_tokens", "invalid_type"),
    (chat(temperature="hot"), 400, "temperature", "invalid_type"),
    (chat(temperature=True), 400, "temperature", "invalid_type"),
    (chat(temperature=3), 400, "temperature", "invalid_value"),
    (chat(top_p=0), 400, "top_p", "invalid_value"),
    (chat(top_k=-2), 400, "top_k", "invalid_value"),
    # Valid JSON numbers the sampler cannot pack (int64 / float32): they used to fail the engine's step -> 503s.
    (chat(top_k=2**63), 400, "top_k", "invalid_value"),
    (chat(top_p=1e-300), 400, "top_p", "invalid_value"),
    (chat(repetition_penalty=1e-300), 400, "repetition_penalty", "invalid_value"),
    (chat(n=0), 400, "n", "invalid_value"),
    (chat(n=1000), 400, "n", "invalid_value"),
    (chat(stop=""), 400, "stop", ...),
    (chat(stop=["a"] * 17), 400, "stop", ...),
    (chat(seed=2**70), 400, "seed", "invalid_value"),
    (chat(top_logprobs=2), 400, "top_logprobs", "invalid_value"),
    (chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "invalid_value"),
    (chat(logit_bias={"1": 5}), 400, "logit_bias", "unsupported_parameter"),
    (chat(response_format={"type": "xml"}), 400, "response_format", ...),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}), 400,
     "response_format", "invalid_json_schema"),
    (chat(frobnicate=1), 400, "frobnicate", "unsupported_parameter"),
    (chat(stream="yes"), 400, "stream", "invalid_type"),
    (chat(stream_options={"include_usage": 1}), 400, "stream_options.include_usage", "invalid_type"),
    (chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), 400, "tools[0].function.name", ...),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]), 400,
     "tools[0].function.parameters", "invalid_function_parameters"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                "properties": 3}}}]),
     400, "tools[0].function.parameters", "invalid_function_parameters"),
    (chat(tools=[FUNC, FUNC]), 400, "tools[1].function.name", "invalid_value"),
    (chat(tools=[{"type": "retrieval"}]), 400, ..., ...),
    (chat(tool_choice="auto"), 400, "tool_choice", "invalid_value"),
    (chat(tools=[FUNC], tool_choice="required", response_format={"type": "json_object"}), 400, "response_format",
     "invalid_value"),
    (chat(tools=[FUNC], tool_choice={"type": "function", "function": {"name": "g"}}), 400,
     "tool_choice.function.name", "invalid_value"),
    (chat(tools=[FUNC], parallel_tool_calls=False), 400, "parallel_tool_calls", "unsupported_value"),
    (chat(reasoning_effort="low"), 400, "reasoning_effort", "invalid_value"),
    (chat(reasoning_effort="max", chat_template_kwargs={"thinking": False}), 400, "reasoning_effort", ...),
    (chat(chat_template_kwargs={"enable_thinking": True}), 400, "chat_template_kwargs.enable_thinking",
     "unsupported_parameter"),
    (chat(messages=[{"role": "assistant", "content": None,
                     "tool_calls": [{"id": "c", "type": "function",
                                     "function": {"name": "f", "arguments": "{not json"}}]}]),
     400, "messages", "invalid_value"),
]
BAD_COMPLETIONS = [
    ({"model": "m", "prompt": ""}, 400, "prompt", ...),
    ({"model": "m", "prompt": []}, 400, "prompt", ...),
    ({"model": "m", "prompt": [0, 10**6]}, 400, "prompt", "invalid_value"),
    ({"model": "m", "prompt": [0, -1]}, 400, "prompt", ...),
    ({"model": "m", "prompt": [[0, 5], "x"]}, 400, "prompt", ...),
    ({"model": "m", "prompt": "hi", "echo": True}, 400, "echo", "unsupported_value"),
    ({"model": "m", "prompt": "hi", "best_of": 3}, 400, "best_of", "unsupported_value"),
    ({"model": "m", "prompt": "hi", "suffix": "x"}, 400, "suffix", ...),
    ({"model": "m", "prompt": "hi", "logprobs": True}, 400, "logprobs", "invalid_type"),
    ({"model": "m", "prompt": "hi", "max_tokens": 200}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": "m", "prompt": [0] * 160}, 400, "prompt", "context_length_exceeded"),
    ({"model": "m", "prompt": ["a"] * 9, "n": 30}, 400, "n", "invalid_value"),
    ({"model": "m", "prompt": "hi", "structured_outputs": {"choice": ["a"]}, "ignore_eos": True}, 400, "ignore_eos",
     "invalid_value"),
    ({"model": "m", "prompt": "hi", "structured_outputs": {"regex": "[^\\x00-\\U0010FFFF]"}}, 400,
     "structured_outputs", "invalid_value"),                          # compiles, but matches no text at all
    # Fits the context (160) but needs 2 cache pages of 128 and there is one: the ENGINE refuses it.
    ({"model": "m", "prompt": [0] * 100, "max_tokens": 40}, 400, None, "invalid_value"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_CHAT, ids=range(len(BAD_CHAT)))
def test_bad_chat_request(server, body, status, param, code):
    assert_error(post(server[0], CHAT, body), status, param, code)


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_COMPLETIONS, ids=range(len(BAD_COMPLETIONS)))
def test_bad_completion_request(server, body, status, param, code):
    assert_error(post(server[0], COMPLETIONS, body), status, param, code)


def test_engine_refusal_names_the_reason(server):
    err = assert_error(server[0].post(COMPLETIONS, json={"model": "m", "prompt": [0] * 100, "max_tokens": 40}), 400)
    assert "pages" in err["message"]


@pytest.mark.parametrize("raw", [b"{", b"", b"[1, 2]", b"null", b'"text"', b'{"model": "m", "messages": [}',
                                 b"\xff\xfe", b'{"model": NaN}'])
def test_malformed_json(server, raw):
    assert_error(server[0].post(CHAT, content=raw, headers={"content-type": "application/json"}), 400)


def test_wrong_content_type_is_named(server):
    err = assert_error(server[0].post(CHAT, content=json.dumps(chat()), headers={"content-type": "text/plain"}), 400)
    assert "application/json" in err["message"]


def test_unknown_route_method_and_model(server):
    client = server[0]
    assert_error(client.get("/v1/nothing"), 404, None, "not_found")
    assert_error(client.get(CHAT), 405, None, "method_not_allowed")
    assert_error(client.get("/v1/models/other"), 404, "model", "model_not_found")
    assert client.get("/v1/models/m").json()["id"] == "m"


def test_server_stays_healthy_after_errors(server):
    client, async_engine = server
    for body, *_ in BAD_CHAT[:5]:
        client.post(CHAT, json=body)
    assert client.get("/health").json()["status"] == "ok"
    r = client.post(CHAT, json=chat())
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
    assert async_engine.call(lambda e: e.cache.pages.num_used + e.cache.slots.num_used).result(10) == 0


# ------------------------------------------------------------------------------------------------ fuzzing

@functools.cache
def _bodies(model) -> st.SearchStrategy:
    """Bodies valid under the OpenAPI schema: as drawn, addressed to the served model (past the model check),
    and with a plain prompt too (so that the sampling fields reach the engine); plus arbitrary JSON.
    Built once per model: `from_schema` canonicalises the whole schema at every call (7 of the fuzz test's 26 s
    when built per example); the examples drawn are the same (checked: the 120 bodies, in order)."""
    schema = from_schema(model.model_json_schema())
    prompt = {"messages": USER} if model is ChatCompletionRequest else {"prompt": "hi"}
    junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                        max_leaves=8)
    plain = st.tuples(schema, st.booleans()).map(lambda t: {**t[0], "model": "m", **prompt, "stream": t[1]})
    return st.one_of(plain, plain, schema.map(lambda b: {**b, "model": "m"}), schema, junk)


def _check_response(r: httpx.Response, stream: bool) -> None:
    assert r.status_code in (200, 400, 404), r.text[:500]
    if r.status_code != 200:
        assert_error(r, r.status_code)
    elif stream:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
    else:
        body = r.json()
        assert body["choices"] and body["usage"]["total_tokens"] >= body["usage"]["prompt_tokens"]


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(data=st.data())
def test_fuzz_requests_against_the_openapi_schema(server, data):
    path, model = data.draw(st.sampled_from([(CHAT, ChatCompletionRequest), (COMPLETIONS, CompletionRequest)]))
    body = data.draw(_bodies(model))
    r = post(server[0], path, body)
    _check_response(r, isinstance(body, dict) and body.get("stream") is True)


def test_fuzz_left_the_engine_clean(server):
    client, async_engine = server
    assert client.get("/health").json()["status"] == "ok"
    assert async_engine.call(lambda e: e.scheduler.check_invariants() or e.has_unfinished()).result(10) is False
