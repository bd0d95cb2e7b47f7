"""A request's sequence as the engine tracks it: tokens, progress through the cache, and where its state lives.

`num_computed` counts the leading tokens whose decode state is in the cache. A step feeds the next chunk
`all_ids[num_computed : num_computed + n]`; when that chunk reaches the last token the step also samples one new
token for the sequence. Preemption frees the slot and pages and sets `num_computed` back to 0 (recompute).
With async decode (engine/engine.py) a sampled token may still be on the device (`num_inflight`): it counts as
pending, so the scheduler gives the sequence its next step before the host knows the token.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from dsv4.engine.sampling import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    seed: int = 0
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    finish_reason: str | None = None          # "stop" | "length" | "abort"
    num_preemptions: int = 0
    num_inflight: int = 0                     # sampled tokens not yet appended (async decode: read a step late)
    num_cached_tokens: int | None = None      # prompt tokens found in the prefix cache at the first admission
    # Speculative decoding (engine/speculative.py): proposed next tokens, and counts for RequestOutput.metrics.
    draft: object | None = None               # speculative.Draft, verified in the sequence's next decode step
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def num_draft(self) -> int:
        return len(self.draft.tokens) if self.draft is not None else 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache (the whole prompt at first, 1 while decoding), in-flight ones included."""
        return self.num_tokens + self.num_inflight - self.num_computed

    @property
    def num_sampled(self) -> int:
        """Tokens sampled so far, in-flight ones included: the output index of the next (the seeded noise's step)."""
        return len(self.output_ids) + self.num_inflight

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason
