"""Streaming correctness of /v1/chat/completions with a scripted engine (real scheduler, pages, detokenizer and
server; the "model" emits a chosen token sequence), through a live server and the official openai client.

What must hold whatever the tokenisation, including every marker cut at every character (the `chars` split):
DSML tool-call markup never in `content`; reasoning never in content and content never in reasoning; tool-call
argument deltas concatenate to valid JSON equal to the non-streamed parse.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_helpers import live_server, make_app, scripted_engine, token_ids

from dsv4.chat import parse_completion
from dsv4.chat.dsml import render_tool_calls
from dsv4.chat.tokens import DSML, EOS, FORBIDDEN_IN_TEXT, THINK_END
from dsv4.serve.async_engine import Update
from dsv4.serve.chat import ChoiceState

CALLS = [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}},
    {"type": "function", "function": {"name": "search", "arguments": {
        "query": 'say "hi"\n<b> {"x": 1} \\', "filters": {"a": [1, 2.5], "b": None}}}},
]
REASONING = "The user asks about </thin k> weather; <think-ish> I should call tools. 天气 🌦 \n\n<"
CONTENT = "Let me check. a < b \n\n<not a block> ｜DS"
REPLIES = {"thinking": REASONING + THINK_END + CONTENT + render_tool_calls(CALLS),
           "chat": CONTENT + render_tool_calls(CALLS)}
MARKUP = (*FORBIDDEN_IN_TEXT, DSML, "tool_calls>", "invoke name=")


def splits(text: str) -> dict[str, list[str]]:
    rng = random.Random(0)
    pieces, i = [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        pieces.append(text[i:i + k])
        i += k
    return {"whole": [text], "chars": list(text), "random": pieces}



@pytest.fixture(scope="module")
def server(builtin_model_fp32, tokenizer):
    engine = scripted_engine(builtin_model_fp32, tokenizer)
    app, async_engine = make_app(engine, tokenizer)
    with live_server(app) as url:
        yield url, engine.runner, async_engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_body(mode: str, **more) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": "weather in Paris?"}], "temperature": 0,
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
                      {"type": "function", "function": {"name": "search"}}]}
    if mode == "thinking":
        body["extra_body"] = {"chat_template_kwargs": {"thinking": True}}
    return body | more


def collect(stream, n: int = 1) -> dict | list[dict]:
    """Reassemble a streamed reply (each of `n` choices), checking every delta on the way."""
    chunks = list(stream)
    got = [_collect(chunks, i) for i in range(n)]
    return got[0] if n == 1 else got


def _collect(chunks, index: int) -> dict:
    reasoning, content, calls, finish = [], [], {}, []
    for chunk in chunks:
        for ch in (c for c in chunk.choices if c.index == index):
            d = ch.delta
            r = getattr(d, "reasoning_content", None)
            for piece in (r, d.content):
                assert piece is None or not any(m in piece for m in MARKUP), f"markup leaked: {piece!r}"
            reasoning += [r] if r else []
            content += [d.content] if d.content else []
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"ids": [], "names": [], "args": []})
                call["ids"] += [tc.id] if tc.id else []
                call["names"] += [tc.function.name] if tc.function and tc.function.name else []
                call["args"].append(tc.function.arguments or "")
            if ch.finish_reason:
                finish.append(ch.finish_reason)
    return {"reasoning": "".join(reasoning), "content": "".join(content), "calls": calls, "finish": finish}


@pytest.mark.parametrize("split", ["whole", "chars", "random"])
@pytest.mark.parametrize("mode", ["thinking", "chat"])
def test_streamed_reply_is_split_exactly_whatever_the_tokenisation(server, client, tokenizer, mode, split):
    reply = REPLIES[mode]
    server[1].script = token_ids(tokenizer, splits(reply)[split])
    check_streamed(collect(client.chat.completions.create(**chat_body(mode), stream=True)), mode)


def test_each_of_n_streamed_choices_is_reassembled(server, client, tokenizer):
    server[1].script = token_ids(tokenizer, splits(REPLIES["thinking"])["random"])
    for got in collect(client.chat.completions.create(**chat_body("thinking", n=3), stream=True), n=3):
        check_streamed(got, "thinking")


def check_streamed(got: dict, mode: str) -> None:
    reply = REPLIES[mode]
    want = parse_completion(reply + EOS, mode)
    assert got["reasoning"] == (want["reasoning_content"] if mode == "thinking" else "")
    assert got["content"] == want["content"]
    assert got["finish"] == ["tool_calls"]
    assert sorted(got["calls"]) == [0, 1]
    for i, call in got["calls"].items():
        assert len(call["ids"]) == 1 and call["ids"][0].startswith("call-")
        assert call["names"] == [want["tool_calls"][i]["function"]["name"]]
        args = "".join(call["args"])
        assert args == want["tool_calls"][i]["function"]["arguments"]
        assert json.loads(args) == CALLS[i]["function"]["arguments"]      # valid JSON, the values sent


@pytest.mark.parametrize("mode", ["thinking", "chat"])
def test_non_streamed_reply_matches_the_official_parse(server, client, tokenizer, mode):
    reply = REPLIES[mode]
    server[1].script = token_ids(tokenizer, splits(reply)["chars"])
    out = client.chat.completions.create(**chat_body(mode))
    msg, want = out.choices[0].message, parse_completion(reply + EOS, mode)
    assert msg.content == want["content"] and out.choices[0].finish_reason == "tool_calls"
    assert getattr(msg, "reasoning_content", None) == (want["reasoning_content"] if mode == "thinking" else None)
    assert [(c.function.name, c.function.arguments) for c in msg.tool_calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in want["tool_calls"]]
    assert len({c.id for c in msg.tool_calls}) == 2
    assert out.usage.completion_tokens == len(server[1].script) + 1          # + the EOS


def test_reasoning_cut_by_max_tokens_stays_reasoning(server, client, tokenizer):
    server[1].script = token_ids(tokenizer, list(REPLIES["thinking"]))
    cut = REASONING.index("</thin k>") + 3
    got = collect(client.chat.completions.create(**chat_body("thinking"), stream=True, max_tokens=cut))
    assert got["content"] == "" and got["calls"] == {} and got["finish"] == ["length"]
    assert got["reasoning"] == REASONING[:cut]


def test_malformed_markup_ends_the_choice_without_leaking(server, client, tokenizer):
    bad = "fine so far\n\n<" + DSML + "tool_calls>\n<" + DSML + 'invoke nam="x">\n' + "junk " * 200
    url, runner, async_engine = server
    runner.script = token_ids(tokenizer, list(bad))
    with httpx.stream("POST", url + "/v1/chat/completions", json=chat_body("chat", stream=True), timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert content == "fine so far"
    last = [e for e in events if e["choices"]][-1]["choices"][0]
    assert last["finish_reason"] == "stop" and "malformed DSML invoke" in last["parse_error"]
    # The request was aborted as soon as it could produce nothing more, not run to the end of the script.
    steps = async_engine.stats["steps"]
    assert async_engine.call(lambda e: (e.cache.pages.num_used, e.has_unfinished())).result(10) == (0, False)
    assert async_engine.stats["steps"] - steps < len(runner.script) // 2


def test_tool_call_cut_by_max_tokens_is_reported_not_leaked(server, client, tokenizer):
    reply = REPLIES["chat"]
    server[1].script = token_ids(tokenizer, list(reply))
    cut = reply.index("Paris")
    out = client.chat.completions.create(**chat_body("chat"), max_tokens=cut)
    choice = out.choices[0]
    assert choice.message.content == CONTENT and choice.finish_reason == "length"
    assert "cut off" in choice.model_extra["parse_error"] or "ended inside" in choice.model_extra["parse_error"]


def test_disconnected_stream_is_aborted_and_its_pages_freed(server, tokenizer):
    url, runner, async_engine = server
    runner.script = token_ids(tokenizer, ["a"] * 600)
    runner.step_seconds = 0.01
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json=chat_body("chat", stream=True, max_tokens=600)) as r:
            lines = r.iter_lines()
            while '"content": "a' not in next(lines):    # a generated token, not the opening chunk
                pass
            assert async_engine.stats["pages_in_use"] > 0
        closed, steps = time.monotonic(), async_engine.stats["steps"]
        while async_engine.stats["running"] or async_engine.stats["pages_in_use"]:
            assert time.monotonic() - closed < 5, "the request kept running after the client left"
            time.sleep(0.005)
        # 600 steps were left; noticing the disconnect takes a few ms, the abort then lands before the next step.
        assert async_engine.stats["steps"] - steps < 100
        assert async_engine.call(lambda e: e.has_unfinished()).result(10) is False
    finally:
        runner.step_seconds = 0.0


def test_disconnected_non_streamed_request_is_aborted(server, tokenizer):
    url, runner, async_engine = server
    runner.script = token_ids(tokenizer, ["a"] * 600)
    runner.step_seconds = 0.01
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=chat_body("chat", max_tokens=600), timeout=0.5)
        gone = time.monotonic()
        while async_engine.stats["running"] or async_engine.stats["pages_in_use"]:
            assert time.monotonic() - gone < 5, "the request kept running after the client left"
            time.sleep(0.005)
    finally:
        runner.step_seconds = 0.0


def test_abort_frees_pages_before_the_next_step(server, tokenizer):
    """Commands are served in order between steps: a `call` queued right after an abort already sees the pages
    free (it runs in the same drain, before any further step)."""
    _, runner, async_engine = server
    runner.script = token_ids(tokenizer, ["a"] * 300)
    runner.step_seconds = 0.005

    async def scenario():
        from dsv4.engine.sampling import SamplingParams

        sub = await async_engine.submit([([0, 5, 6], SamplingParams(max_tokens=300))])
        async for _ in sub.updates():
            break
        sub.abort()
        probe = async_engine.call(lambda e: (e.cache.pages.num_used, e.scheduler.has_work))
        return await asyncio.wrap_future(probe)

    try:
        assert asyncio.run(scenario()) == (0, False)
    finally:
        runner.step_seconds = 0.0


def test_engine_failure_is_reported_not_hung(builtin_model_fp32, tokenizer):
    engine = scripted_engine(builtin_model_fp32, tokenizer)
    app, _ = make_app(engine, tokenizer)
    engine.runner.script = token_ids(tokenizer, ["b"] * 300)
    engine.runner.step_seconds = 0.005
    with live_server(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=chat_body("chat", stream=True), timeout=30) as r:
            lines = r.iter_lines()
            while '"content": "b' not in next(lines):
                pass
            engine.runner.fail = RuntimeError("logits are NaN")
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])["error"]
        assert err["code"] == "engine_dead" and "logits are NaN" in err["message"]
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "logits are NaN" in health.json()["error"]
        r = httpx.post(url + "/v1/chat/completions", json=chat_body("chat"), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


# ------------------------------------------------------------------------------------------------ no HTTP

def _replay(mode: str, pieces: list[str]) -> ChoiceState:
    st = ChoiceState(0, mode, None, None)
    deltas = []
    for i, p in enumerate(pieces):
        deltas += st.add(Update("r", 0, p, [], None, "stop" if i == len(pieces) - 1 else None))
    st.deltas = deltas
    return st


@settings(max_examples=150, deadline=None, derandomize=True)
@given(mode=st.sampled_from(["thinking", "chat"]), cuts=st.lists(st.integers(0, 2000), max_size=40))
def test_any_text_split_gives_the_same_message(mode, cuts):
    reply = REPLIES[mode]
    points = sorted({c % (len(reply) + 1) for c in cuts} | {0, len(reply)})
    pieces = [reply[a:b] for a, b in itertools.pairwise(points)] or [""]
    st_ = _replay(mode, pieces)
    want = parse_completion(reply + EOS, mode)
    assert st_.parse_error is None and st_.final_reason() == "tool_calls"
    msg = st_.message()
    assert msg["content"] == want["content"]
    assert [c["function"]["arguments"] for c in msg["tool_calls"]] == \
        [c["function"]["arguments"] for c in want["tool_calls"]]
    for d in st_.deltas:
        for key in ("content", "reasoning_content"):
            assert not any(m in d.get(key, "") for m in MARKUP)
