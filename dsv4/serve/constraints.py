"""Request fields -> `StructuredOutputsParams`: `response_format`, a forced `tool_choice`, vLLM's `structured_outputs`.

The grammar is compiled here, in prepare's worker thread: a schema that cannot be compiled, or that uses a
keyword the grammar library would ignore, is a 400 naming it, and the engine thread later finds the grammar in the
cache. In thinking mode the constraint starts after `</think>` (the reasoning stays free).
"""

from __future__ import annotations

from dsv4.chat.dsml_grammar import tool_call_tag
from dsv4.engine.structured import StructuredOutputError, StructuredOutputsParams, check_schema
from dsv4.serve.errors import APIError
from dsv4.serve.protocol import ChatCompletionRequest, SamplingFields

_EXTENSION_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def chat_constraint(req: ChatCompletionRequest, thinking: bool, grammars) -> StructuredOutputsParams | None:
    forced = req.tool_choice == "required" or not isinstance(req.tool_choice, str | None)
    fmt = req.response_format if req.response_format is not None and req.response_format.type != "text" else None
    given = [name for name, on in (("tool_choice", forced), ("response_format", fmt is not None),
                                   ("structured_outputs", req.structured_outputs is not None)) if on]
    if len(given) > 1:
        raise APIError(f"{' and '.join(given)} each constrain the whole reply; send only one", 400, given[1],
                       "invalid_value")
    if forced:
        return _compile(_forced_tool(req, thinking), grammars, "tool_choice")
    if fmt is not None:
        if fmt.type == "json_object":
            so = StructuredOutputsParams(json_object=True, reasoning=thinking)
        else:
            schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
            so = StructuredOutputsParams(json=schema, reasoning=thinking)
        return _compile(so, grammars, "response_format")
    return extension_constraint(req, grammars, thinking)


def extension_constraint(req: SamplingFields, grammars, thinking: bool = False) -> StructuredOutputsParams | None:
    ext = req.structured_outputs
    if ext is None:
        return None
    values = {name: getattr(ext, "json_" if name == "json" else name) for name in _EXTENSION_FIELDS}
    values["json_object"] = bool(values["json_object"])
    try:
        so = StructuredOutputsParams(**{k: v for k, v in values.items() if v is not None and v is not False},
                                     reasoning=thinking)
    except ValueError as e:
        raise APIError(str(e), 400, "structured_outputs", "invalid_value") from None
    return _compile(so, grammars, "structured_outputs")


def _forced_tool(req: ChatCompletionRequest, thinking: bool) -> StructuredOutputsParams:
    name = None if req.tool_choice == "required" else req.tool_choice.function.name
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if name is not None and name not in [t["function"]["name"] for t in tools]:
        raise APIError(f"tool_choice names {name!r}, which is not among the tools", 400, "tool_choice.function.name",
                       "invalid_value")
    for i, tool in enumerate(tools):
        if name in (None, tool["function"]["name"]):
            try:
                check_schema(tool["function"].get("parameters"))
            except StructuredOutputError as e:
                raise APIError(str(e), 400, f"tools[{i}].function.parameters", "invalid_function_parameters") from e
    tag = tool_call_tag(tools, name, parallel=req.parallel_tool_calls is not False)
    return StructuredOutputsParams(structural_tag=tag, reasoning=thinking)


def _compile(so: StructuredOutputsParams, grammars, param: str) -> StructuredOutputsParams:
    if grammars is not None:
        try:
            grammars.compile(so)
        except StructuredOutputError as e:
            code = "invalid_json_schema" if so.json is not None else "invalid_value"
            raise APIError(str(e), 400, param, code) from e
    return so
