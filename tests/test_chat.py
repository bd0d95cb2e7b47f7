"""DeepSeek-V4 chat format: official vectors byte-exact, parsing, round trips, streaming at every split, errors."""

from __future__ import annotations

import json
import random

import paths
import pytest

import dsv4
from dsv4.chat import StreamParser, encode_messages, parse_completion
from dsv4.chat.tokens import ASSISTANT, BOS, EOS, REASONING_EFFORT_MAX, THINK_END, THINK_START, USER

DSML_BLOCK = "\n\n<｜DSML｜tool_calls>\n"


def load_vector(n: int) -> tuple[list[dict], str]:
    data = json.loads((paths.CHAT_VECTORS / f"test_input_{n}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):  # case 1: the tools belong on the first (system) message
        messages = [dict(m) for m in data["messages"]]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    return messages, (paths.CHAT_VECTORS / f"test_output_{n}.txt").read_text(encoding="utf-8")


def completions(prompt: str) -> list[tuple[str, str]]:
    """(reply text, thinking_mode) of every assistant turn in an encoded conversation."""
    out = []
    for turn in prompt.split(ASSISTANT)[1:]:
        turn = turn.split(USER)[0]
        if turn.startswith(THINK_START):
            out.append((turn[len(THINK_START):], "thinking"))
        elif turn.startswith(THINK_END):
            out.append((turn[len(THINK_END):], "chat"))
    return out


def reply_of(assistant: dict, thinking_mode: str = "thinking") -> str:
    """The reply text of one assistant message, cut from its encoded conversation."""
    prompt = encode_messages([{"role": "user", "content": "q"}, assistant], thinking_mode)
    return completions(prompt)[-1][0]


def collect(events) -> dict:
    """Rebuild parse_completion's result from streaming events."""
    msg = {"role": "assistant", "reasoning_content": "", "content": "", "tool_calls": []}
    for e in events:
        if e.kind == "reasoning":
            msg["reasoning_content"] += e.text
        elif e.kind == "content":
            msg["content"] += e.text
        elif e.kind == "tool_call":
            assert e.index == len(msg["tool_calls"])
            msg["tool_calls"].append({"type": "function", "function": {"name": e.text, "arguments": ""}})
        elif e.kind == "arguments":
            msg["tool_calls"][e.index]["function"]["arguments"] += e.text
    return msg


def stream(pieces: list[str], thinking_mode: str, strict: bool = True) -> dict:
    parser = StreamParser(thinking_mode)
    events = [e for piece in pieces for e in parser.feed(piece)]
    return collect(events + parser.finish(strict=strict))


def split_everywhere(text: str):
    yield [text]
    yield list(text)
    for k in range(len(text) + 1):
        yield [text[:k], text[k:]]


# --- official vectors ---

@pytest.mark.parametrize("n", [1, 2])
def test_official_vector_byte_exact(n):
    messages, expected = load_vector(n)
    assert encode_messages(messages, thinking_mode="thinking") == expected


def test_vector_1_parses_as_readme_says():
    _, prompt = load_vector(1)
    (first, mode1), (last, mode2) = completions(prompt)
    assert mode1 == mode2 == "thinking"
    call = parse_completion(first, "thinking")
    assert call["reasoning_content"] == ("The user wants to know the weather in Beijing. "
                                         "I should use the get_weather tool.")
    assert call["content"] == ""
    assert [c["function"]["name"] for c in call["tool_calls"]] == ["get_weather"]
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"location": "Beijing", "unit": "celsius"}
    answer = parse_completion(last, "thinking")
    assert answer["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in answer["content"] and answer["tool_calls"] == []


def test_vector_2_drops_old_reasoning_and_parses():
    messages, prompt = load_vector(2)
    assert "The user said hello" not in prompt
    last, mode = completions(prompt)[-1]
    assert parse_completion(last, mode) == {
        "role": "assistant", "reasoning_content": "The user asks about the capital of France. It is Paris.",
        "content": "The capital of France is Paris.", "tool_calls": []}
    assert "The user said hello" in encode_messages(messages, "thinking", drop_thinking=False)


def test_exports_from_dsv4():
    assert dsv4.encode_messages is encode_messages and dsv4.parse_completion is parse_completion
    assert {"encode_messages", "parse_completion"} <= set(dsv4.__all__)


# --- prompt format ---

def test_chat_mode_shape_and_single_bos():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "hidden"}, {"role": "user", "content": "q2"}]
    prompt = encode_messages(msgs)
    assert prompt == f"{BOS}S{USER}q1{ASSISTANT}{THINK_END}a1{EOS}{USER}q2{ASSISTANT}{THINK_END}"
    assert prompt.count(BOS) == 1
    assert encode_messages(msgs, "thinking").endswith(f"{USER}q2{ASSISTANT}{THINK_START}")


def test_reasoning_effort():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert encode_messages(msgs, "thinking", reasoning_effort="max") == (
        f"{BOS}{REASONING_EFFORT_MAX}S{USER}q{ASSISTANT}{THINK_START}")
    assert REASONING_EFFORT_MAX.startswith("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    plain = encode_messages(msgs, "thinking")
    assert encode_messages(msgs, "thinking", reasoning_effort="high") == plain
    assert encode_messages(msgs, "chat", reasoning_effort="max") == encode_messages(msgs, "chat")


def test_response_format_and_developer():
    schema = {"type": "json_object"}
    prompt = encode_messages([{"role": "system", "content": "S", "response_format": schema},
                              {"role": "developer", "content": "D"}])
    assert prompt == (f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                      f'{{"type": "json_object"}}{USER}D{ASSISTANT}{THINK_END}')


def test_latest_reminder_and_tasks():
    reminder = encode_messages([{"role": "user", "content": "q"}, {"role": "latest_reminder", "content": "R"}])
    assert reminder == f"{BOS}{USER}q{ASSISTANT}{THINK_END}<｜latest_reminder｜>R"
    assert encode_messages([{"role": "user", "content": "q", "task": "query"}]) == f"{BOS}{USER}q<｜query｜>"
    action = [{"role": "user", "content": "q", "task": "action"}, {"role": "assistant", "content": "A"}]
    assert encode_messages(action, "thinking") == f"{BOS}{USER}q{ASSISTANT}{THINK_START}<｜action｜>A{EOS}"
    assert encode_messages(action[:1], "chat").endswith(f"{ASSISTANT}{THINK_END}<｜action｜>")


def tool_turn(ids=("call_a", "call_b")) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": ids[0], "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": ids[1], "type": "function", "function": {"name": "g", "arguments": {"s": "two"}}}]}


def test_tool_results_merged_in_call_order():
    msgs = [{"role": "user", "content": "q"}, tool_turn(),
            {"role": "tool", "tool_call_id": "call_b", "content": "B"},
            {"role": "tool", "tool_call_id": "call_a", "content": "A"}]
    prompt = encode_messages(msgs)
    assert prompt.endswith(f"{EOS}{USER}<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>"
                           f"{ASSISTANT}{THINK_END}")
    assert ('<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="x" string="false">1</｜DSML｜parameter>\n'
            '</｜DSML｜invoke>\n<｜DSML｜invoke name="g">\n<｜DSML｜parameter name="s" string="true">two'
            "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>") in prompt


def test_tools_disable_drop_thinking():
    messages, with_tools = load_vector(1)
    assert "I should use the get_weather tool." in with_tools
    no_tools = encode_messages([{k: v for k, v in m.items() if k != "tools"} for m in messages], "thinking")
    assert "I should use the get_weather tool." not in no_tools
    assert f"{ASSISTANT}{THINK_END}{DSML_BLOCK}" in no_tools


def test_tokenized_prompt_has_one_bos():
    from dsv4.tokenizer import encode_prompt, load_tokenizer

    tok = load_tokenizer(None)
    _, prompt = load_vector(1)
    for add_special in (False, True):
        ids = tok.encode(prompt, add_special_tokens=add_special).ids
        assert ids[0] == 0 and ids.count(0) == 1
    assert encode_prompt(tok, prompt) == tok.encode(prompt, add_special_tokens=False).ids
    ids = tok.encode(prompt, add_special_tokens=False).ids
    for token, token_id in [(USER, 128803), (ASSISTANT, 128804), (THINK_START, 128821), (THINK_END, 128822),
                            ("｜DSML｜", 128825), (EOS, 1)]:
        assert tok.token_to_id(token) == token_id and token_id in ids


# --- round trips ---

TRICKY_ARGS = {"code": 'if a < b:\n    print("</x>")\n', "n": 3, "ok": True, "none": None, "empty": "",
               "nested": {"a": [1, "two", None], "b": {"c": 1.5}}, "uni": "北京 22°C", "lt": "ends with <",
               "ltnl": "ends with <\n", "nl": "\n\n", "think": "</think> <think>"}
REPLIES = [
    {"reasoning_content": "", "content": "plain"},
    {"reasoning_content": "r\n\n<", "content": "a\n\nb <not a tag> \n", "tool_calls": []},
    {"reasoning_content": "calls", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": json.dumps(TRICKY_ARGS)}}]},
    {"reasoning_content": "two", "content": "Let me check.\n", "tool_calls": [
        {"type": "function", "function": {"name": "no_args", "arguments": "{}"}},
        {"type": "function", "function": {"name": "g", "arguments": {"q": "x", "k": [1, 2]}}}]},
]


def as_dict(arguments) -> dict:
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def normalized(reply: dict) -> dict:
    calls = [{"type": "function", "function": {"name": c["function"]["name"],
                                                "arguments": as_dict(c["function"]["arguments"])}}
             for c in reply.get("tool_calls", [])]
    return {"reasoning_content": reply["reasoning_content"], "content": reply["content"], "tool_calls": calls}


@pytest.mark.parametrize("reply", REPLIES, ids=["plain", "markup-like", "tricky-args", "two-calls"])
@pytest.mark.parametrize("mode", ["thinking", "chat"])
def test_round_trip(reply, mode):
    parsed = parse_completion(reply_of({"role": "assistant", **reply}, mode), mode)
    for call in parsed["tool_calls"]:
        call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    expected = normalized(reply)
    if mode == "chat":
        expected["reasoning_content"] = ""
    assert {k: parsed[k] for k in expected} == expected
    again = encode_messages([{"role": "user", "content": "q"}, parsed], mode)
    assert again == encode_messages([{"role": "user", "content": "q"}, {"role": "assistant", **reply}], mode)


def test_dict_and_string_arguments_render_alike():
    as_str = tool_turn()
    with_dicts = json.loads(json.dumps(as_str))
    for call in with_dicts["tool_calls"]:
        call["function"]["arguments"] = as_dict(call["function"]["arguments"])
    user = {"role": "user", "content": "q"}
    assert encode_messages([user, as_str]) == encode_messages([user, with_dicts])


# --- streaming ---

def all_replies() -> list[tuple[str, str]]:
    out = [c for n in (1, 2) for c in completions(load_vector(n)[1])]
    out += [(reply_of({"role": "assistant", **r}, mode), mode) for r in REPLIES for mode in ("thinking", "chat")]
    return out


@pytest.mark.parametrize(("text", "mode"), all_replies(), ids=lambda v: v if v in ("chat", "thinking") else "")
def test_stream_matches_parse_at_every_split(text, mode):
    expected = parse_completion(text, mode)
    for pieces in split_everywhere(text):
        assert stream(pieces, mode) == expected, pieces


def test_stream_random_multi_splits():
    rng = random.Random(0)
    for text, mode in all_replies():
        expected = parse_completion(text, mode)
        for _ in range(50):
            cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text), rng.randint(1, 8))))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            assert stream(pieces, mode) == expected


FRAGMENTS = ["a", "\n", "<", ">", "\n\n", "</think>", "<think>", EOS, BOS, "｜DSML｜", DSML_BLOCK[:-2], ">\n",
             "<｜DSML｜invoke", ' name="f"', "</｜DSML｜invoke", "<｜DSML｜parameter", ' name="k" string="true">',
             ' string="false"', "</｜DSML｜parameter", "/｜DSML｜parameter", "</｜DSML｜tool_calls>", '"', "<\n"]


def outcome(parse) -> dict | str:
    try:
        return parse()
    except ValueError:
        return "error"


def test_stream_agrees_with_parse_on_mutated_replies():
    """Valid replies with random fragments inserted/deleted: both parsers fail together or agree exactly."""
    rng = random.Random(1)
    replies = all_replies()
    for _ in range(400):
        text, mode = rng.choice(replies)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text) + 1)
            text = text[:i] + rng.choice(["", *FRAGMENTS]) + text[i + rng.randint(0, 4) * (rng.random() < 0.5):]
        expected = outcome(lambda: parse_completion(text, mode))  # noqa: B023
        for k in [0, len(text), *rng.sample(range(len(text) + 1), min(5, len(text) + 1))]:
            assert outcome(lambda: stream([text[:k], text[k:]], mode)) == expected, (text, k)  # noqa: B023
        assert outcome(lambda: stream(list(text), mode)) == expected, text  # noqa: B023


def test_stream_holds_back_markers_and_flushes_on_finish():
    parser = StreamParser("thinking")
    assert [(e.kind, e.text) for e in parser.feed("think</th")] == [("reasoning", "think")]
    events = parser.feed("ink>answer\n\n<｜DS")
    assert [e.text for e in events if e.kind == "content"] == ["answer"]
    assert collect(parser.finish())["content"] == "\n\n<｜DS"  # lenient finish: not a marker after all
    with pytest.raises(ValueError, match="without EOS"):
        stream(["r</think>unfinished"], "thinking", strict=True)
    assert stream(["unfinished\n"], "chat", strict=False)["content"] == "unfinished\n"


def test_stream_argument_deltas_are_json_pieces():
    text = reply_of({"role": "assistant", **REPLIES[2]})
    parser = StreamParser("thinking")
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    kinds = [e.kind for e in events if e.kind.startswith("tool") or e.kind == "arguments"]
    assert kinds[0] == "tool_call" and kinds[-1] == "tool_call_end"
    args = "".join(e.text for e in events if e.kind == "arguments")
    assert json.loads(args) == TRICKY_ARGS


# --- errors ---

def param(flag: str = "true", close: str = "</｜DSML｜parameter>") -> str:
    return f'<｜DSML｜parameter name="a" string="{flag}">v{close}'


def block(*params: str, end: str = "\n</｜DSML｜tool_calls>") -> str:
    body = "\n".join(params)
    return f'{DSML_BLOCK}<｜DSML｜invoke name="f">\n{body}\n</｜DSML｜invoke>{end}'


MALFORMED = [
    ("no closing think" + EOS, "thinking"),
    ("r</think>no eos", "thinking"),
    ("r</think>c" + EOS + "junk", "thinking"),
    ("r</think>c<think>x" + EOS, "thinking"),
    ("hello</think>bye" + EOS, "chat"),
    ("stray ｜DSML｜ marker" + EOS, "chat"),
    ("r" + block(param()) + EOS, "thinking"),  # tool calls inside the reasoning
    (block(param(flag="maybe")) + EOS, "chat"),
    (block(param(), param()) + EOS, "chat"),  # duplicate parameter
    (block(param(close="/｜DSML｜parameter>")) + EOS, "chat"),  # value not closed by "</"
    (block(param(), end=""), "chat"),  # cut off
    (block(param()).replace("tool_calls>\n", "tool_calls>", 1) + EOS, "chat"),  # no newline after the tag
    (block(param(), end="\n</｜DSML｜tool_calls>extra" + EOS), "chat"),
]


@pytest.mark.parametrize(("text", "mode"), MALFORMED, ids=lambda v: v if v in ("chat", "thinking") else "")
def test_malformed_replies_raise_in_both_parsers(text, mode):
    with pytest.raises(ValueError):
        parse_completion(text, mode)
    for pieces in split_everywhere(text):
        with pytest.raises(ValueError):
            stream(pieces, mode, strict=True)


def test_tool_block_may_omit_eos_like_upstream():
    text = block(param())
    assert parse_completion(text, "chat")["tool_calls"][0]["function"]["arguments"] == '{"a": "v"}'
    assert stream(list(text), "chat") == parse_completion(text, "chat")


@pytest.mark.parametrize(("messages", "match"), [
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"content": "x"}], "unknown role None"),
    ("hi", "must be a list of message objects"),               # was read as one message per character
    (["hi"], "message 0 must be an object"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], "without a preceding"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "r"}],
     "without a preceding"),
    ([{"role": "user", "content": "q"}, tool_turn(), {"role": "tool", "tool_call_id": "nope", "content": "r"}],
     "matches none"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}], "not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "JSON object"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], "tool call needs"),
    ([{"role": "user", "content": "q", "task": "dance"}], "unknown task"),
    ([{"role": "developer", "content": ""}], "no content"),
    ([{"role": "system", "content": "s", "tools": [{"name": "f"}]}], "OpenAI-style"),
])
def test_bad_messages_raise(messages, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(messages)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages([], thinking_mode="think")
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages([], reasoning_effort="low")
    with pytest.raises(ValueError, match="thinking_mode"):
        parse_completion(EOS, "fast")
    with pytest.raises(ValueError, match="thinking_mode"):
        StreamParser("fast")
