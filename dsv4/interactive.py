"""Terminal front ends of `dsv4 generate` and `dsv4 chat`: stream a completion, render reasoning apart from the
answer, keep a multi-turn conversation. Library code; the CLI only parses arguments."""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator, Iterator
from typing import TextIO

from dsv4.chat import encode_messages
from dsv4.chat.stream import StreamParser
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling import SamplingParams
from dsv4.llm import LLM, parse_chat_reply

HELP = "commands: /clear starts a new conversation, /exit (or Ctrl-D) quits"


def keep_output(stream: Generator[str, None, RequestOutput], done: dict) -> Iterator[str]:
    """`LLM.stream`'s pieces passed through; its finished `RequestOutput` (the generator's return value, which a
    for loop drops) lands in done["output"] once the stream is exhausted."""
    done["output"] = yield from stream


def note_if_cut(done: dict, out: TextIO) -> None:
    """Say so when the token budget, not the model, ended the text: a reply cut mid-line looks finished."""
    output = done.get("output")
    if output is not None and output.finish_reason == "length":
        out.write(f"[cut: reached --max-tokens ({len(output.token_ids)} tokens); raise it for more]\n")
        out.flush()


def print_stream(pieces: Iterator[str], out: TextIO) -> str:
    """Print text deltas as they come; returns the whole text."""
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    out.write("\n")
    return "".join(text)


def print_reply(pieces: Iterator[str], thinking_mode: str, out: TextIO) -> str:
    """Print a chat reply: reasoning under a "[thinking]" header, then the answer, tool calls as JSON lines.
    Falls back to the raw text when the reply does not follow the format (an untrained model's)."""
    parser, raw, shown = StreamParser(thinking_mode), [], None
    try:
        for piece in pieces:
            raw.append(piece)
            for ev in parser.feed(piece):
                shown = _show(ev, shown, out)
        for ev in parser.finish(strict=False):
            shown = _show(ev, shown, out)
    except ValueError:
        out.write(("\n" if shown else "") + "[unparsed] " + "".join(raw) + "".join(pieces))
    out.write("\n")
    out.flush()
    return "".join(raw)


def _show(ev, shown: str | None, out: TextIO) -> str | None:
    if ev.kind in ("reasoning", "content") and ev.kind != shown:
        out.write(("\n" if shown else "") + ("[thinking] " if ev.kind == "reasoning" else ""))
    if ev.kind in ("reasoning", "content"):
        out.write(ev.text)
        shown = ev.kind
    elif ev.kind == "tool_call":
        out.write(f"\n[tool call] {ev.text}(")
        shown = "tool"
    elif ev.kind == "arguments":
        out.write(ev.text)
    elif ev.kind == "tool_call_end":
        out.write(")")
    out.flush()
    return shown


def chat_loop(llm: LLM, params: SamplingParams, thinking_mode: str = "chat", system: str | None = None,
              read: Callable[[str], str] = input, out: TextIO = sys.stdout, prompts: bool = True) -> None:
    """Multi-turn chat: every turn re-encodes the whole conversation (as DeepSeek's generate.py does).
    `prompts` False (input piped from a file or a program): no help line and no "> " before each turn, so the
    output is the replies alone."""
    messages = [{"role": "system", "content": system}] if system else []
    if prompts:
        out.write(HELP + "\n")
    while True:
        try:
            line = read("> " if prompts else "").strip()
        except (EOFError, KeyboardInterrupt):
            if prompts:                      # end the terminal's "> " line
                out.write("\n")
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/clear":
            messages = messages[:1] if system else []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        prompt = encode_messages(messages, thinking_mode=thinking_mode)
        done: dict = {}
        text = print_reply(keep_output(llm.stream(prompt, params), done), thinking_mode, out)
        note_if_cut(done, out)
        reply = parse_chat_reply(text, thinking_mode, "output" in done and llm.ended_at_eos(done["output"]))
        messages.append({"role": "assistant", "content": reply["content"] or "",
                         "reasoning_content": reply.get("reasoning_content")})
