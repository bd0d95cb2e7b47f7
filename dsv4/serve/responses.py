"""Response pieces shared by both endpoints: ids, usage, logprobs in OpenAI's two formats, server-sent events.

Bodies are plain dicts built here rather than pydantic models: the OpenAI wire format has fields that must be
present as `null` (`finish_reason`, `logprobs`) next to fields that must be absent, which dicts say directly.
"""

from __future__ import annotations

import json
import time
import uuid

from dsv4.engine.detokenizer import token_bytes


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def head(rid: str, obj: str, model: str, created: int | None = None) -> dict:
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _token(tokenizer, token_id: int) -> tuple[str, bytes]:
    # A token may be part of a UTF-8 character: its text then has U+FFFD and `bytes` carries the truth (as OpenAI).
    raw = token_bytes(tokenizer, token_id)
    return raw.decode("utf-8", errors="replace"), raw


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely ids of one engine logprobs entry ({sampled: lp, top ids: lps}), best first."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def chat_logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, float]], k: int) -> list[dict]:
    out = []
    for tid, entry in zip(token_ids, entries, strict=True):
        text, raw = _token(tokenizer, tid)
        top = []
        for t, lp in _top(entry, k):
            t_text, t_raw = _token(tokenizer, t)
            top.append({"token": t_text, "logprob": lp, "bytes": list(t_raw)})
        out.append({"token": text, "logprob": entry[tid], "bytes": list(raw), "top_logprobs": top})
    return out


def completion_logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, float]], k: int,
                        offset: int = 0) -> dict:
    """The legacy format; `text_offset` counts characters of the token texts from `offset`."""
    tokens, lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries, strict=True):
        text, _ = _token(tokenizer, tid)
        tokens.append(text)
        lps.append(entry[tid])
        tops.append({_token(tokenizer, t)[0]: lp for t, lp in _top(entry, k)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def merge_completion_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}
