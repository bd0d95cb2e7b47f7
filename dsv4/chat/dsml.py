"""DSML, the markup DeepSeek-V4 uses for tools: the tool list in the system prompt, and tool calls in replies.

A call renders as
    <｜DSML｜invoke name="f">\\n<｜DSML｜parameter name="k" string="true">v</｜DSML｜parameter>\\n...</｜DSML｜invoke>
String values are written raw (`string="true"`), everything else as JSON (`string="false"`). Parsing rebuilds the
arguments as the JSON text `{"k": v, ...}` exactly like the official decoder: string values are JSON-quoted,
the others are pasted in verbatim (so a malformed non-string value gives malformed JSON, as upstream).
"""

from __future__ import annotations

import json
import re
from typing import Any

from dsv4.chat.tokens import DSML, THINK_END, THINK_START

TOOL_CALLS_START = f"\n\n<{DSML}tool_calls"  # what ends the content when a reply calls tools
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE = f"<{DSML}invoke"
INVOKE_END = f"</{DSML}invoke"
PARAM = f"<{DSML}parameter"
PARAM_END = f"/{DSML}parameter"  # the official reader stops here; the value must end with "<" (or "<\n")

# Equivalent to the official `^...$` patterns (Python's `$` also matches before one trailing newline).
INVOKE_HEAD = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)
PARAM_HEAD = re.compile(r' name="(.*?)" string="(true|false)">', re.DOTALL)
PARAM_BODY = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<\n?', re.DOTALL)

_TOOLS_PROMPT = "\n".join([
    "## Tools",
    "",
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a"
    f' "<{DSML}tool_calls>" block like the following:',
    "",
    f"<{DSML}tool_calls>",
    f'<{DSML}invoke name="$TOOL_NAME">',
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>',
    "...",
    f"</{DSML}invoke>",
    f'<{DSML}invoke name="$TOOL_NAME2">',
    "...",
    f"</{DSML}invoke>",
    f"</{DSML}tool_calls>",
    "",
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans,'
    ' arrays, objects), pass the value in JSON format and set `string="false"`.',
    "",
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside"
    f" {THINK_START}...{THINK_END} BEFORE any tool calls or final response.",
    "",
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.",
    "",
    "### Available Tool Schemas",
    "",
    "{schemas}",
    "",
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.",
    "",
])


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_tools(tools: list[dict]) -> str:
    """The tools section of a system (or developer) prompt; `tools` in OpenAI format."""
    schemas = []
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise ValueError(f"tools must be OpenAI-style {{'type': 'function', 'function': {{...}}}}, got {tool!r}")
        schemas.append(to_json(tool["function"]))
    return _TOOLS_PROMPT.replace("{schemas}", "\n".join(schemas))


def call_arguments(call: dict) -> tuple[str, dict]:
    """(name, arguments as a dict) of an OpenAI-style tool call; arguments may be a JSON string or a dict."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"tool call needs {{'function': {{'name': str, 'arguments': ...}}}}, got {call!r}")
    args = fn.get("arguments")
    if args is None or args == "":
        return fn["name"], {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ValueError(f"arguments of tool call {fn['name']!r} are not valid JSON: {args!r}") from e
    if not isinstance(args, dict):
        raise ValueError(f"arguments of tool call {fn['name']!r} must be a JSON object, got {args!r}")
    return fn["name"], args


def render_tool_calls(tool_calls: list[dict]) -> str:
    """The DSML block that follows an assistant's content (leading blank line included)."""
    invokes = [_render_invoke(*call_arguments(call)) for call in tool_calls]
    return f"{TOOL_CALLS_START}>\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


def _render_invoke(name: str, args: dict) -> str:
    params = "\n".join(_render_param(key, value) for key, value in args.items())
    return f'{INVOKE} name="{name}">\n{params}\n{INVOKE_END}>'


def _render_param(key: str, value: Any) -> str:
    is_str = isinstance(value, str)
    text = value if is_str else to_json(value)
    return f'{PARAM} name="{key}" string="{"true" if is_str else "false"}">{text}<{PARAM_END}>'


def argument_prefix(key: str, first: bool, is_str: bool) -> str:
    """The JSON text that opens one parameter inside the arguments object (shared with the streaming parser)."""
    return ("" if first else ", ") + to_json(key) + ": " + ('"' if is_str else "")


def arguments_json(params: list[tuple[str, str, bool]]) -> str:
    """Official `decode_dsml_to_arguments`: (key, raw value, is_str) → `{"k": v, ...}`."""
    parts = [argument_prefix(k, i == 0, False) + (to_json(v) if s else v) for i, (k, v, s) in enumerate(params)]
    return "{" + "".join(parts) + "}"


def read_until(text: str, index: int, stops: tuple[str, ...]) -> tuple[int, str, str | None]:
    """(index after the earliest stop, text before it, the stop) — or (len, rest, None) when none occurs."""
    at, hit = len(text), None
    for stop in stops:
        pos = text.find(stop, index)
        if pos != -1 and pos < at:
            at, hit = pos, stop
    if hit is None:
        return len(text), text[index:], None
    return at + len(hit), text[index:at], hit


def parse_tool_calls(text: str, index: int) -> tuple[int, list[dict]]:
    """Parse the block after `TOOL_CALLS_START`; returns (index after `TOOL_CALLS_END`, [{name, arguments}])."""
    calls = []
    while True:
        index, hit = _expect_glue(text, index, (INVOKE, TOOL_CALLS_END))
        if hit == TOOL_CALLS_END:
            return index, calls
        index, call = _parse_invoke(text, index)
        calls.append(call)


def _expect_glue(text: str, index: int, stops: tuple[str, ...]) -> tuple[int, str]:
    index, glue, hit = read_until(text, index, stops)
    if hit is None and ">\n".startswith(glue):
        raise ValueError("DSML tool-call block is cut off")
    if glue != ">\n" or hit is None:
        raise ValueError(f"malformed DSML tool-call block: expected '>\\n' then one of {stops}, got {glue!r}")
    return index, hit


def _parse_invoke(text: str, index: int) -> tuple[int, dict]:
    index, head, hit = read_until(text, index, (PARAM, INVOKE_END))
    match = INVOKE_HEAD.fullmatch(head)
    if hit is None or match is None:
        raise ValueError(f"malformed DSML invoke: {head!r}")
    params: list[tuple[str, str, bool]] = []
    while hit == PARAM:
        index, body, end = read_until(text, index, (PARAM_END,))
        param = PARAM_BODY.fullmatch(body)
        if end is None or param is None:
            raise ValueError(f"malformed DSML parameter: {body!r}")
        key, flag, value = param.groups()
        if any(key == k for k, _, _ in params):
            raise ValueError(f"duplicate parameter {key!r} in tool call {match.group(1)!r}")
        params.append((key, value, flag == "true"))
        index, hit = _expect_glue(text, index, (PARAM, INVOKE_END))
    return index, {"name": match.group(1), "arguments": arguments_json(params)}
