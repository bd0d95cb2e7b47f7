"""/v1/chat/completions: engine updates -> reasoning / content / tool-call deltas (streamed) or one message.

Every choice's text goes through `dsv4.chat.StreamParser`, streamed or not, so both paths split the reply the same
way: markup (`</think>`, DSML tool-call blocks, EOS) never reaches `content` or `reasoning_content`, and a
marker cut across tokens is held back until it is decided. Tool-call arguments stream as JSON text deltas that
concatenate to the call's `arguments`.

A reply the V4 grammar cannot parse (an untrained model's noise, a tool-call block cut off by `max_tokens`) is
not passed through as content, which would leak markup: the choice ends there, with what was parsed so far and
a non-standard `parse_error` field on the choice saying why. When no choice is left generating, the request is
aborted rather than run to `max_tokens`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from dsv4.chat import StreamParser
from dsv4.serve.async_engine import EngineDeadError, Subscription, Update
from dsv4.serve.errors import error_body
from dsv4.serve.prepare import ChatInputs
from dsv4.serve.responses import SSE_DONE, chat_logprobs, head, new_id, sse, usage

log = logging.getLogger("dsv4.serve")


class ChoiceState:
    """One choice: its parser, the deltas it produced, and how it ended."""

    def __init__(self, index: int, thinking_mode: str, tokenizer, top_logprobs: int | None):
        self.index, self.tokenizer, self.top_logprobs = index, tokenizer, top_logprobs
        self.parser = StreamParser(thinking_mode)
        self.thinking = thinking_mode == "thinking"
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict] = []
        self.num_tokens = 0
        self.logprobs: list[dict] = []        # every token's entry (non-streamed)
        self.pending_logprobs: list[dict] = []    # not yet sent (streamed)
        self.parse_error: str | None = None
        self.finish_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self.finish_reason is not None or self.parse_error is not None

    def add(self, u: Update) -> list[dict]:
        """Feed one engine update of an open choice; returns the chunk deltas it produced (consecutive same-kind
        events merged)."""
        if u.logprobs is not None and self.top_logprobs is not None:
            entries = chat_logprobs(self.tokenizer, u.token_ids, u.logprobs, self.top_logprobs)
            self.logprobs += entries
            self.pending_logprobs += entries
        try:
            events = self.parser.feed(u.text)
            if u.finish_reason is not None:
                events += self.parser.finish()
        except ValueError as e:
            self.parse_error = str(e)
            log.warning("choice %d: unparseable reply: %s", self.index, e)
            return []
        finally:
            if u.finish_reason is not None:
                self.finish_reason = u.finish_reason
        return self._deltas(events)

    def _deltas(self, events) -> list[dict]:
        out: list[dict] = []
        for ev in events:
            if ev.kind in ("reasoning", "content"):
                (self.reasoning if ev.kind == "reasoning" else self.content).append(ev.text)
                key = "reasoning_content" if ev.kind == "reasoning" else "content"
                if out and list(out[-1]) == [key]:
                    out[-1][key] += ev.text
                else:
                    out.append({key: ev.text})
            elif ev.kind == "tool_call":
                call = {"id": new_id("call"), "type": "function", "function": {"name": ev.text, "arguments": ""}}
                self.calls.append(call)
                out.append({"tool_calls": [{"index": ev.index, **call, "function": dict(call["function"])}]})
            elif ev.kind == "arguments":
                self.calls[ev.index]["function"]["arguments"] += ev.text
                last = out[-1].get("tool_calls") if out else None
                if last and last[-1]["index"] == ev.index:
                    last[-1]["function"]["arguments"] += ev.text
                else:
                    out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]})
        return out

    def final_reason(self) -> str:
        if self.finish_reason in (None, "stop") and self.calls:
            return "tool_calls"
        return self.finish_reason or "stop"

    def message(self) -> dict:
        content = "".join(self.content)
        msg = {"role": "assistant", "content": None if not content and self.calls else content,
               "reasoning_content": "".join(self.reasoning) if self.thinking else None}
        if self.calls:
            msg["tool_calls"] = self.calls
        return msg

    def extra(self) -> dict:
        return {} if self.parse_error is None else {"parse_error": self.parse_error}


def _states(inputs: ChatInputs, tokenizer, top_logprobs: int | None) -> list[ChoiceState]:
    return [ChoiceState(i, inputs.thinking_mode, tokenizer, top_logprobs) for i in range(inputs.params.n)]


async def _feed(sub: Subscription, states: list[ChoiceState]) -> AsyncIterator[tuple[ChoiceState, list[dict]]]:
    """(choice, its new deltas) per update of an open choice; aborts the request once every choice is closed."""
    async for batch in sub.updates():
        for u in batch:
            st = states[u.index]
            st.num_tokens += len(u.token_ids)   # usage counts what was generated, parsed or not
            if not st.closed:
                yield st, st.add(u)
        if all(st.closed for st in states) and not sub.finished:
            sub.abort()
            return


async def complete_chat(sub: Subscription, inputs: ChatInputs, tokenizer, model: str,
                        top_logprobs: int | None) -> dict:
    states = _states(inputs, tokenizer, top_logprobs)
    async for _ in _feed(sub, states):
        pass
    choices = []
    for st in states:
        lp = {"content": st.logprobs} if top_logprobs is not None else None
        choices.append({"index": st.index, "message": st.message(), "logprobs": lp,
                        "finish_reason": st.final_reason(), **st.extra()})
    n_tokens = sum(st.num_tokens for st in states)
    return {**head(new_id("chatcmpl"), "chat.completion", model), "choices": choices,
            "usage": usage(len(inputs.prompt_ids), n_tokens, sum(sub.cached_tokens.values()))}


async def stream_chat(sub: Subscription, inputs: ChatInputs, tokenizer, model: str, top_logprobs: int | None,
                      include_usage: bool) -> AsyncIterator[str]:
    states = _states(inputs, tokenizer, top_logprobs)
    base = head(new_id("chatcmpl"), "chat.completion.chunk", model)
    extra = {"usage": None} if include_usage else {}

    def chunk(st: ChoiceState, delta: dict, finish: str | None = None, **more) -> str:
        lp = None
        if st.pending_logprobs:
            lp, st.pending_logprobs = {"content": st.pending_logprobs}, []
        return sse({**base, "choices": [{"index": st.index, "delta": delta, "logprobs": lp,
                                         "finish_reason": finish, **more}], **extra})

    try:
        for st in states:
            yield chunk(st, {"role": "assistant", "content": ""})
        async for st, deltas in _feed(sub, states):
            for delta in deltas:
                yield chunk(st, delta)
            if st.closed:
                yield chunk(st, {}, st.final_reason(), **st.extra())
        if sub.aborted and not all(st.closed for st in states):
            return                      # the client went away: nobody to tell
        if include_usage:
            n_tokens = sum(st.num_tokens for st in states)
            yield sse({**base, "choices": [], "usage": usage(len(inputs.prompt_ids), n_tokens,
                                                             sum(sub.cached_tokens.values()))})
        yield SSE_DONE
    except EngineDeadError as e:
        yield sse(error_body(str(e), "server_error", None, "engine_dead"))
        yield SSE_DONE
    finally:
        sub.abort()
