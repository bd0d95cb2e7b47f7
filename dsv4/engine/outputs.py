"""What a request gives back (names follow vLLM: `RequestOutput.outputs[i]` is one of its `n` completions)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None             # "stop" | "length" | "abort"
    stop_reason: int | str | None = None         # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None   # per token: {sampled id: logprob, top ids: logprobs}
    cumulative_logprob: float = 0.0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    message: dict | None = None                  # `LLM.chat`: reasoning_content / content / tool_calls
    num_cached_tokens: int | None = None         # prompt tokens served from the prefix cache (set once admitted)
    metrics: object | None = None                # speculative.RequestMetrics when speculation is on

    # The first completion's fields, for the common n = 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs
