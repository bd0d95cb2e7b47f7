"""`encode_messages`: OpenAI-style messages → the DeepSeek-V4 prompt string (official `encoding_dsv4.py`).

Turns are concatenated with no separators. A user/developer turn followed by an assistant turn (or ending the
conversation) is closed by `<｜Assistant｜>` plus `<think>` (thinking mode, the current turn) or `</think>`
(chat mode, or a past turn whose reasoning was dropped). The returned text starts with exactly one BOS text;
tokenize it with `add_special_tokens=False` (see `dsv4.tokenizer.encode_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.chat.dsml import render_tool_calls, render_tools, to_json
from dsv4.chat.messages import (
    check_messages,
    drop_old_reasoning,
    last_user_index,
    merge_tool_messages,
    sort_tool_results,
    text_of,
)
from dsv4.chat.tokens import (
    ASSISTANT,
    BOS,
    EOS,
    LATEST_REMINDER,
    REASONING_EFFORT_MAX,
    REASONING_EFFORTS,
    RESPONSE_FORMAT,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    USER,
)

THINKING_MODES = ("chat", "thinking")


@dataclass(frozen=True)
class _Conversation:
    messages: list[dict]  # merged, sorted and (maybe) reasoning-dropped
    thinking: bool
    drop_thinking: bool
    reasoning_effort: str | None
    last_user: int


def check_thinking_mode(thinking_mode: str) -> None:
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")


def encode_messages(messages: list[dict], thinking_mode: str = "chat", drop_thinking: bool = True,
                    reasoning_effort: str | None = None) -> str:
    """The prompt text for `messages`; with a trailing user turn it ends ready for the assistant's reply.

    `drop_thinking` removes the reasoning of assistant turns before the last user message (thinking mode only);
    it is switched off whenever a message carries `tools`. Tools and `response_format` belong on the system (or a
    developer) message, as in the official format.
    """
    return BOS + "".join(text for text, _ in encode_segments(messages, thinking_mode, drop_thinking,
                                                            reasoning_effort))


def encode_segments(messages: list[dict], thinking_mode: str = "chat", drop_thinking: bool = True,
                    reasoning_effort: str | None = None) -> list[tuple[str, bool]]:
    """The prompt text after the BOS as (text, is_assistant_output) pieces: what `encode_messages` joins.
    Assistant output = an assistant turn's reasoning + `</think>`, content, tool calls and EOS (the SFT targets);
    the `<｜Assistant｜><think>` opener and everything else is prompt."""
    check_thinking_mode(thinking_mode)
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    check_messages(messages)
    msgs = sort_tool_results(merge_tool_messages(messages))
    drop_thinking = drop_thinking and not any(m.get("tools") for m in msgs)
    thinking = thinking_mode == "thinking"
    if thinking and drop_thinking:
        msgs = drop_old_reasoning(msgs)
    conv = _Conversation(msgs, thinking, drop_thinking, reasoning_effort, last_user_index(msgs))
    return [piece for i in range(len(msgs)) for piece in _render(i, conv) if piece[0]]


def _render(i: int, conv: _Conversation) -> list[tuple[str, bool]]:
    prefix = REASONING_EFFORT_MAX if i == 0 and conv.thinking and conv.reasoning_effort == "max" else ""
    role = conv.messages[i]["role"]
    return [(prefix, False), (_RENDERERS[role](i, conv), role == "assistant"), (_transition(i, conv), False)]


def _system(i: int, conv: _Conversation) -> str:
    msg = conv.messages[i]
    return text_of(msg.get("content")) + _tools_and_format(msg)


def _developer(i: int, conv: _Conversation) -> str:
    msg = conv.messages[i]
    if not msg.get("content"):
        raise ValueError(f"developer message {i} has no content")
    return USER + text_of(msg["content"]) + _tools_and_format(msg)


def _tools_and_format(msg: dict) -> str:
    out = "\n\n" + render_tools(msg["tools"]) if msg.get("tools") else ""
    if msg.get("response_format"):
        out += "\n\n" + RESPONSE_FORMAT.format(schema=to_json(msg["response_format"]))
    return out


def _user(i: int, conv: _Conversation) -> str:
    return USER + "\n\n".join(_block_text(b) for b in conv.messages[i]["content_blocks"])


def _block_text(block: dict) -> str:
    if block["type"] == "text":
        return block["text"]
    content = block["content"]
    if isinstance(content, list):  # official: text parts joined by a blank line, anything else marked
        parts = [p.get("text", "") if p.get("type") == "text" else f"[Unsupported {p.get('type')}]" for p in content]
        content = "\n\n".join(parts)
    return f"<tool_result>{content or ''}</tool_result>"


def _latest_reminder(i: int, conv: _Conversation) -> str:
    return LATEST_REMINDER + text_of(conv.messages[i].get("content"))


def _assistant(i: int, conv: _Conversation) -> str:
    msg = conv.messages[i]
    calls = render_tool_calls(msg["tool_calls"]) if msg.get("tool_calls") else ""
    after_task = i > 0 and conv.messages[i - 1].get("task") is not None  # a task's output carries no reasoning
    reasoning = ""
    if conv.thinking and not after_task and (not conv.drop_thinking or i > conv.last_user):
        reasoning = (msg.get("reasoning_content") or "") + THINK_END
    eos = "" if msg.get("wo_eos") else EOS
    return reasoning + text_of(msg.get("content")) + calls + eos


def _transition(i: int, conv: _Conversation) -> str:
    """What opens the next assistant turn; nothing when a non-assistant message follows."""
    msgs = conv.messages
    if i + 1 < len(msgs) and msgs[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return ""
    task, role = msgs[i].get("task"), msgs[i]["role"]
    if task is not None and task != "action":
        return TASK_TOKENS[task]
    if task == "action":
        return ASSISTANT + (THINK_START if conv.thinking else THINK_END) + TASK_TOKENS[task]
    if role in ("user", "developer"):
        opens = conv.thinking and (not conv.drop_thinking or i >= conv.last_user)
        return ASSISTANT + (THINK_START if opens else THINK_END)
    return ""


_RENDERERS = {
    "system": _system,
    "developer": _developer,
    "user": _user,
    "latest_reminder": _latest_reminder,
    "assistant": _assistant,
}
