"""The DSML tool-call block as an xgrammar structural tag (plain JSON data; `dsv4/engine/structured.py` compiles
it): what `tool_choice="required"` or a named tool forces the reply to be.

Built here from the same markup constants `dsml.py` renders and parses, because xgrammar's own `deepseek_v4`
tag allows whitespace the official decoder (and so `parse_tool_calls`) does not: optional blanks between
parameters where the format has exactly one newline. The pieces are xgrammar formats — constant strings, JSON
Schema values, free text with excludes — assembled as `render_tool_calls` lays them out:

    \\n\\n<｜DSML｜tool_calls>\\n  (invoke \\n)+  </｜DSML｜tool_calls>
    invoke = <｜DSML｜invoke name="f">\\n (param \\n)*  </｜DSML｜invoke>
    param  = <｜DSML｜parameter name="k" string="true|false">value</｜DSML｜parameter>

Parameters follow the schema's `properties` order; required ones always appear, optional ones may be left out.
A plain string (`{"type": "string"}` and nothing that constrains it) or a string `enum` / `const` is written raw
(`string="true"`) as the model was trained to; any other value, strings with a pattern, format or length bound
included, is JSON (`string="false"`), checked against its schema by xgrammar — the parser pastes it into the
arguments verbatim, so the arguments validate.
"""

from __future__ import annotations

from dsv4.chat.dsml import INVOKE, INVOKE_END, PARAM, PARAM_END, TOOL_CALLS_END, TOOL_CALLS_START
from dsv4.chat.tokens import BOS, EOS, THINK_END, THINK_START

JSON_MAX_WHITESPACE = 4       # inside a JSON value: room for a space after ':' and ',', never a runaway
_STRING_NOTES = {"type", "description", "title", "examples", "default", "$comment", "deprecated"}
_RAW_EXCLUDES = [PARAM_END, BOS, EOS, THINK_START, THINK_END]


def _const(text: str) -> dict:
    return {"type": "const_string", "value": text}


def _is_plain_string(schema) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "string" and set(schema) <= _STRING_NOTES


def _string_choices(schema) -> list[str] | None:
    """The values of a string `enum` / `const` (nothing else constraining them), else None."""
    if not isinstance(schema, dict) or not set(schema) <= _STRING_NOTES | {"enum", "const"}:
        return None
    values = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
    ok = values and all(isinstance(v, str) for v in values) and schema.get("type", "string") == "string"
    return list(values) if ok and not ("enum" in schema and "const" in schema) else None


def _param(key: str, schema) -> dict:
    raw, choices = _is_plain_string(schema), _string_choices(schema)
    head = f'{PARAM} name="{key}" string="{"true" if raw or choices else "false"}">'
    end = f"<{PARAM_END}>\n"
    if raw:   # the official reader stops at "/｜DSML｜parameter": raw text must not contain it
        return {"type": "tag", "begin": head, "content": {"type": "any_text", "excludes": _RAW_EXCLUDES},
                "end": end}
    if choices:
        value = {"type": "or", "elements": [_const(c) for c in choices]}
        return {"type": "sequence", "elements": [_const(head), value, _const(end)]}
    value = {"type": "json_schema", "json_schema": schema if schema is not None else True, "style": "json",
             "max_whitespace_cnt": JSON_MAX_WHITESPACE}
    return {"type": "sequence", "elements": [_const(head), value, _const(end)]}


def _invoke(function: dict) -> dict:
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    required = set(schema.get("required", []))
    params = []
    for key, sub in (schema.get("properties") or {}).items():
        p = _param(key, sub)
        params.append(p if key in required else {"type": "optional", "content": p})
    head = f'{INVOKE} name="{function["name"]}">\n' + ("" if params else "\n")   # as rendered: no params, blank line
    elements = [_const(head), *params, _const(f"{INVOKE_END}>\n")]
    return {"type": "sequence", "elements": elements}


def tool_call_tag(tools: list[dict], name: str | None = None, parallel: bool = True) -> dict:
    """The structural tag of a reply that is one DSML tool-call block: one or more calls (exactly one unless
    `parallel`) of any of `tools` (OpenAI format), or exactly one call of the tool `name`."""
    functions = [t["function"] for t in tools]
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise ValueError(f"no tool is named {name!r}")
    invokes = [_invoke(f) for f in functions]
    one = invokes[0] if len(invokes) == 1 else {"type": "or", "elements": invokes}
    calls = one if name is not None or not parallel else {"type": "plus", "content": one}
    block = [_const(f"{TOOL_CALLS_START}>\n"), calls, _const(TOOL_CALLS_END)]
    return {"type": "structural_tag", "format": {"type": "sequence", "elements": block}}
