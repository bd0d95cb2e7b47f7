"""Message checks and the official preprocessing: tool messages merged into user turns, tool results put in
call order, old reasoning dropped.

NOTE: the merge follows `encoding_dsv4.merge_tool_messages` to the letter, quirks included: consecutive user
messages become one user turn (texts joined by a blank line), a user message after tool results joins their turn,
and a merged user message keeps only `content`, `task`, `wo_eos` and `mask`.
"""

from __future__ import annotations

import copy

from dsv4.chat.tokens import TASK_TOKENS

ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")


def text_of(content) -> str:
    """Message content as text: a string, None, or a list of OpenAI text parts (joined without separator)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text") or "" for p in content)
    raise ValueError(f"message content must be a string or a list of text parts, got {content!r}")


def check_messages(messages: list[dict]) -> None:
    """Raise ValueError on what the official encoder would reject or silently mangle."""
    if not isinstance(messages, list | tuple):       # a string would be read as one message per character
        raise ValueError(f"messages must be a list of message objects, got {type(messages).__name__}")
    call_ids: set[str] | None = None  # ids of the latest assistant's tool calls; None: it made no calls
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} must be an object with a role and content, got {msg!r}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        if msg.get("task") is not None and msg["task"] not in TASK_TOKENS:
            raise ValueError(f"message {i}: unknown task {msg['task']!r}; expected one of {tuple(TASK_TOKENS)}")
        if role == "assistant":
            calls = msg.get("tool_calls") or []
            call_ids = {c.get("id") for c in calls if isinstance(c, dict) and c.get("id")} if calls else None
        elif role == "tool":
            _check_tool_message(i, msg, call_ids)


def _check_tool_message(i: int, msg: dict, call_ids: set[str] | None) -> None:
    if call_ids is None:
        raise ValueError(f"message {i}: tool message without a preceding assistant message with tool_calls")
    tool_call_id = msg.get("tool_call_id")
    if tool_call_id and call_ids and tool_call_id not in call_ids:
        raise ValueError(f"message {i}: tool_call_id {tool_call_id!r} matches none of the calls {sorted(call_ids)}")


def merge_tool_messages(messages: list[dict]) -> list[dict]:
    """Turn `tool` messages into `tool_result` blocks of user turns; every user message gets `content_blocks`."""
    merged: list[dict] = []
    for msg in map(copy.deepcopy, messages):
        last = merged[-1] if merged and merged[-1]["role"] == "user" else None
        if msg["role"] == "tool":
            block = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id", ""), "content": msg.get("content")}
            if last is not None:
                last["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif msg["role"] == "user":
            block = {"type": "text", "text": text_of(msg.get("content"))}
            if last is not None and last.get("task") is None:
                last["content_blocks"].append(block)
            else:
                keep = {k: msg[k] for k in ("task", "wo_eos", "mask") if k in msg}
                merged.append({"role": "user", "content": msg.get("content"), "content_blocks": [block], **keep})
        else:
            merged.append(msg)
    return merged


def sort_tool_results(messages: list[dict]) -> list[dict]:
    """Order each user turn's tool results like the latest assistant's tool_calls (stable; unknown ids first)."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            ids = [c.get("id") or c.get("function", {}).get("id", "") for c in msg["tool_calls"]]
            order = {tc_id: n for n, tc_id in enumerate(ids) if tc_id}
        elif msg["role"] == "user" and order:
            blocks = msg["content_blocks"]
            slots = [n for n, b in enumerate(blocks) if b["type"] == "tool_result"]
            if len(slots) > 1:
                ordered = sorted((blocks[n] for n in slots), key=lambda b: order.get(b["tool_use_id"], 0))
                for n, block in zip(slots, ordered, strict=True):
                    blocks[n] = block
    return messages


def last_user_index(messages: list[dict]) -> int:
    """Index of the last user or developer message, -1 if none."""
    return max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)


def drop_old_reasoning(messages: list[dict]) -> list[dict]:
    """Official `_drop_thinking_messages`: strip reasoning from assistant turns before the last user message.

    NOTE: like upstream, developer messages before the last user/developer message are dropped entirely.
    """
    last_user = last_user_index(messages)
    kept = []
    for i, msg in enumerate(messages):
        if msg["role"] in ("user", "system", "latest_reminder") or i >= last_user:
            kept.append(msg)
        elif msg["role"] == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return kept
