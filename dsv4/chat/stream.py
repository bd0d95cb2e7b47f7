"""Incremental reply parser for streaming: feed text deltas, get reasoning/content/tool-call events.

It accepts the same grammar as `parse_completion`, and the events add up to its result: reasoning deltas
concatenate to `reasoning_content`, content deltas to `content`, and each call's argument deltas to its
`arguments` JSON text (`{` at the start, one `"key": value` piece per parameter, streamed as it arrives, `}`).
Markup never leaks: text that could be the start of a marker (`</think>`, `\\n\\n<｜DSML｜tool_calls`, EOS, ...)
is held back until the next delta decides it, so a marker split across deltas is handled like a whole one.
Malformed text raises ValueError as soon as it is certain to be malformed; the parser is spent after that.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.chat.dsml import (
    INVOKE,
    INVOKE_END,
    INVOKE_HEAD,
    PARAM,
    PARAM_END,
    PARAM_HEAD,
    TOOL_CALLS_END,
    TOOL_CALLS_START,
    argument_prefix,
    to_json,
)
from dsv4.chat.encoding import check_thinking_mode
from dsv4.chat.tokens import BOS, DSML, EOS, THINK_END, THINK_START

_REASONING_MARKERS = (THINK_END, TOOL_CALLS_START, BOS, EOS, THINK_START, DSML)
_CONTENT_MARKERS = (EOS, TOOL_CALLS_START, BOS, THINK_START, THINK_END, DSML)
_VALUE_ENDS = ("<\n" + PARAM_END, "<" + PARAM_END, PARAM_END)  # the bare one (no "<") is an error
_BLOCK_STOPS = (INVOKE, TOOL_CALLS_END)
_PARAM_STOPS = (PARAM, INVOKE_END)


@dataclass(frozen=True)
class Event:
    """kind: "reasoning" | "content" (text = delta), "tool_call" (text = function name), "arguments" (text = JSON
    delta of call `index`), "tool_call_end" (call `index` is complete)."""

    kind: str
    text: str = ""
    index: int = -1


def _partial_start(buf: str, markers: tuple[str, ...]) -> int:
    """Earliest i such that buf[i:] is a proper prefix of a marker (len(buf) if none)."""
    longest = max(map(len, markers))
    for i in range(max(0, len(buf) - longest + 1), len(buf)):
        tail = buf[i:]
        if any(len(m) > len(tail) and m.startswith(tail) for m in markers):
            return i
    return len(buf)


class StreamParser:
    def __init__(self, thinking_mode: str = "chat"):
        check_thinking_mode(thinking_mode)
        self._buf = ""
        self._final = False
        self._events: list[Event] = []
        self._state = self._reasoning if thinking_mode == "thinking" else self._content
        self._acc = ""  # invoke/parameter head read so far
        self._glue_stops: tuple[str, ...] = ()
        self._calls = 0  # tool calls started
        self._keys: set[str] = set()
        self._is_str = False

    def feed(self, delta: str) -> list[Event]:
        if self._final:
            raise ValueError("feed() after finish()")
        self._buf += delta
        return self._run()

    def finish(self, strict: bool = False) -> list[Event]:
        """Flush held-back text. strict: also demand what `parse_completion` demands (</think> in thinking mode,
        EOS after plain content). A cut-off tool-call block is an error either way."""
        self._final = True
        events = self._run()
        state = self._state
        if state in (self._reasoning, self._content):
            if strict:
                raise ValueError("completion ended without " + ("</think>" if state == self._reasoning else "EOS"))
        elif state not in (self._done, self._tail):
            raise ValueError("completion ended inside a DSML tool-call block")
        return events

    def _run(self) -> list[Event]:
        while True:
            before = (self._state, len(self._buf))
            self._state()
            if (self._state, len(self._buf)) == before:
                break
        events, self._events = self._events, []
        return events

    def _emit(self, kind: str, text: str, index: int = -1) -> None:
        if text:
            self._events.append(Event(kind, text, index))

    def _scan(self, markers: tuple[str, ...]) -> tuple[str, str | None]:
        """Take the text before the earliest marker (and the marker), holding back a possible partial marker."""
        buf = self._buf
        at, hit = len(buf), None
        for m in markers:
            pos = buf.find(m)
            if pos != -1 and pos < at:
                at, hit = pos, m
        cut = at if self._final else min(at, _partial_start(buf, markers))
        if hit is not None and cut == at:
            self._buf = buf[at + len(hit):]
            return buf[:at], hit
        self._buf = buf[cut:]
        return buf[:cut], None

    # --- states: each consumes what it can from self._buf ---

    def _reasoning(self) -> None:
        text, hit = self._scan(_REASONING_MARKERS)
        self._emit("reasoning", text)
        if hit == THINK_END:
            self._state = self._content
        elif hit == TOOL_CALLS_START:
            raise ValueError("tool calls before </think>: thinking-mode replies must close their reasoning first")
        elif hit is not None:
            raise ValueError(f"unexpected special token {hit!r} in the reasoning")

    def _content(self) -> None:
        text, hit = self._scan(_CONTENT_MARKERS)
        self._emit("content", text)
        if hit == EOS:
            self._state = self._done
        elif hit == TOOL_CALLS_START:
            self._expect_glue(_BLOCK_STOPS)
        elif hit is not None:
            raise ValueError(f"unexpected special token {hit!r} in the content")

    def _expect_glue(self, stops: tuple[str, ...]) -> None:
        self._glue_stops, self._state = stops, self._glue

    def _glue(self) -> None:
        """Between DSML tags: exactly ">\\n" and then one of the expected tags."""
        for stop in self._glue_stops:
            if self._buf.startswith(">\n" + stop):
                self._buf = self._buf[len(stop) + 2:]
                return self._after_tag(stop)
        if not any((">\n" + s).startswith(self._buf) for s in self._glue_stops):
            raise ValueError(f"malformed DSML tool-call block: expected '>\\n' then one of {self._glue_stops}, "
                             f"got {self._buf[:40]!r}")
        if self._final:
            raise ValueError("completion ended inside a DSML tool-call block")

    def _after_tag(self, tag: str) -> None:
        self._acc = ""
        if tag == INVOKE:
            self._state = self._invoke_head
        elif tag == PARAM:
            self._state = self._param_head
        elif tag == INVOKE_END:
            self._end_call()
        else:  # TOOL_CALLS_END
            self._state = self._tail

    def _invoke_head(self) -> None:
        text, hit = self._scan(_PARAM_STOPS)
        self._acc += text
        if hit is None:
            # Fail as soon as the head cannot become ' name="...': else junk would be read until max_tokens.
            head = self._acc.lstrip()
            if not (head.startswith('name="') or 'name="'.startswith(head)):
                raise ValueError(f"malformed DSML invoke: {self._acc!r}")
            return
        match = INVOKE_HEAD.fullmatch(self._acc)
        if match is None:
            raise ValueError(f"malformed DSML invoke: {self._acc!r}")
        self._keys = set()
        self._events.append(Event("tool_call", match.group(1), self._calls))  # even with an empty name
        self._emit("arguments", "{", self._calls)
        self._after_tag(hit)

    def _end_call(self) -> None:
        self._emit("arguments", "}", self._calls)
        self._events.append(Event("tool_call_end", "", self._calls))
        self._calls += 1
        self._expect_glue(_BLOCK_STOPS)

    def _param_head(self) -> None:
        text, hit = self._scan(_VALUE_ENDS)
        self._acc += text
        match = PARAM_HEAD.match(self._acc)
        if match is None:
            if hit is not None or not (self._acc.startswith(' name="') or ' name="'.startswith(self._acc)):
                raise ValueError(f"malformed DSML parameter: {self._acc + (hit or '')!r}")
            return
        key, flag = match.groups()
        if key in self._keys:
            raise ValueError(f"duplicate parameter {key!r} in a tool call")
        self._is_str = flag == "true"
        self._emit("arguments", argument_prefix(key, not self._keys, self._is_str), self._calls)
        self._keys.add(key)
        self._buf = self._acc[match.end():] + (hit or "") + self._buf  # the value's start goes back to the scanner
        self._state = self._param_value

    def _param_value(self) -> None:
        text, hit = self._scan(_VALUE_ENDS)
        self._emit("arguments", to_json(text)[1:-1] if self._is_str else text, self._calls)
        if hit == PARAM_END:
            raise ValueError("a DSML parameter value must be followed by '</｜DSML｜parameter>'")
        if hit is not None:
            self._emit("arguments", '"' if self._is_str else "", self._calls)
            self._expect_glue(_PARAM_STOPS)

    def _tail(self) -> None:
        """After the tool-call block only EOS (or nothing) may follow."""
        if self._buf.startswith(EOS):
            self._buf = self._buf[len(EOS):]
            self._state = self._done
        elif self._buf and (self._final or not EOS.startswith(self._buf)):
            raise ValueError(f"unexpected text after the tool-call block: {self._buf[:40]!r}")

    def _done(self) -> None:
        if self._buf:
            raise ValueError(f"unexpected text after <｜end▁of▁sentence｜>: {self._buf[:40]!r}")
