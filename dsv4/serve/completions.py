"""/v1/completions: raw text continuation (no chat format, no parsing). A list of prompts gives one engine request
per prompt; choice `i * n + j` is completion j of prompt i, as in OpenAI's API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dsv4.serve.async_engine import EngineDeadError, Subscription, Update
from dsv4.serve.errors import error_body
from dsv4.serve.responses import (
    SSE_DONE,
    completion_logprobs,
    head,
    merge_completion_logprobs,
    new_id,
    sse,
    usage,
)


@dataclass
class _Choice:
    index: int
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    num_chars: int = 0
    logprobs: dict | None = None
    finish_reason: str | None = None


class _Choices:
    def __init__(self, sub: Subscription, n: int, tokenizer, logprobs: int | None):
        self.tokenizer, self.k, self.sub = tokenizer, logprobs, sub
        self.base = {rid: i * n for i, rid in enumerate(sub.request_ids)}
        self.choices = [_Choice(i) for i in range(len(sub.request_ids) * n)]

    def add(self, u: Update) -> tuple[_Choice, dict | None]:
        c = self.choices[self.base[u.request_id] + u.index]
        lp = None
        if self.k is not None and u.logprobs is not None:
            lp = completion_logprobs(self.tokenizer, u.token_ids, u.logprobs, self.k, c.num_chars)
            c.logprobs = merge_completion_logprobs(c.logprobs, lp)
        c.text.append(u.text)
        c.num_tokens += len(u.token_ids)
        c.num_chars += sum(len(t) for t in (lp or {}).get("tokens", ()))
        c.finish_reason = u.finish_reason or c.finish_reason
        return c, lp

    def usage(self, prompt_lens: list[int]) -> dict:
        return usage(sum(prompt_lens), sum(c.num_tokens for c in self.choices), sum(self.sub.cached_tokens.values()))


async def complete(sub: Subscription, prompt_lens: list[int], n: int, tokenizer, model: str,
                   logprobs: int | None) -> dict:
    acc = _Choices(sub, n, tokenizer, logprobs)
    async for batch in sub.updates():
        for u in batch:
            acc.add(u)
    choices = [{"index": c.index, "text": "".join(c.text), "logprobs": c.logprobs if logprobs is not None else None,
                "finish_reason": c.finish_reason} for c in acc.choices]
    return {**head(new_id("cmpl"), "text_completion", model), "choices": choices, "usage": acc.usage(prompt_lens)}


async def stream(sub: Subscription, prompt_lens: list[int], n: int, tokenizer, model: str, logprobs: int | None,
                 include_usage: bool) -> AsyncIterator[str]:
    acc = _Choices(sub, n, tokenizer, logprobs)
    base = head(new_id("cmpl"), "text_completion", model)
    extra = {"usage": None} if include_usage else {}
    try:
        async for batch in sub.updates():
            for u in batch:
                c, lp = acc.add(u)
                yield sse({**base, "choices": [{"index": c.index, "text": u.text, "logprobs": lp,
                                                "finish_reason": u.finish_reason}], **extra})
        if sub.aborted:
            return                      # the client went away
        if include_usage:
            yield sse({**base, "choices": [], "usage": acc.usage(prompt_lens)})
        yield SSE_DONE
    except EngineDeadError as e:
        yield sse(error_body(str(e), "server_error", None, "engine_dead"))
        yield SSE_DONE
    finally:
        sub.abort()
