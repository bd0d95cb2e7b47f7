"""`parse_completion`: a finished assistant reply (the text after the prompt) → an OpenAI-style message.

Same grammar as the official `parse_message_from_completion_text`:
    thinking mode: reasoning `</think>` content, then `<｜end▁of▁sentence｜>` or a DSML tool-call block;
    chat mode:     the same without the reasoning part.
A reply with tool calls may omit the final EOS (as upstream); a plain reply must end with it.
Deliberate differences: errors are ValueErrors (upstream: asserts), and a truncated tool-call block is an error
(upstream returns whatever calls it had read). Tool calls carry no `id`: the official parser emits none, and ids
are the server's business (it must make them unique per conversation, e.g. `call_<uuid>`).
"""

from __future__ import annotations

from dsv4.chat.dsml import TOOL_CALLS_START, parse_tool_calls, read_until
from dsv4.chat.encoding import check_thinking_mode
from dsv4.chat.tokens import EOS, FORBIDDEN_IN_TEXT, THINK_END


def parse_completion(text: str, thinking_mode: str = "chat") -> dict:
    """{"role": "assistant", "reasoning_content": str, "content": str, "tool_calls": [OpenAI-style calls]}."""
    check_thinking_mode(thinking_mode)
    index, reasoning = 0, ""
    if thinking_mode == "thinking":
        index, reasoning, hit = read_until(text, 0, (THINK_END, TOOL_CALLS_START))
        if hit != THINK_END:
            raise ValueError("thinking-mode completion must close its reasoning with </think> before anything else")
    index, content, hit = read_until(text, index, (EOS, TOOL_CALLS_START))
    calls: list[dict] = []
    if hit == TOOL_CALLS_START:
        index, calls = parse_tool_calls(text, index)
        index, tail, hit = read_until(text, index, (EOS,))
        if tail:
            raise ValueError(f"unexpected text after the tool-call block: {tail!r}")
    elif hit is None:
        raise ValueError("completion does not end with <｜end▁of▁sentence｜>")
    if index != len(text):
        raise ValueError(f"unexpected text after <｜end▁of▁sentence｜>: {text[index:]!r}")
    _check_clean("reasoning", reasoning)
    _check_clean("content", content)
    return {"role": "assistant", "reasoning_content": reasoning, "content": content,
            "tool_calls": [openai_tool_call(c["name"], c["arguments"]) for c in calls]}


def openai_tool_call(name: str, arguments: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _check_clean(what: str, text: str) -> None:
    for token in FORBIDDEN_IN_TEXT:
        if token in text:
            raise ValueError(f"unexpected special token {token!r} in the {what}")
