"""Request bodies of the OpenAI API, as strict pydantic models (they also make the OpenAPI schema at /openapi.json).

Strict on purpose: no type coercion (`"1"` is not an int, `true` is not a number), and unknown fields are errors
(`unsupported_parameter`) rather than silently ignored — a client that sends `logit_bias` must learn that it does
nothing here. `None` (JSON null) means "the default" for every optional field.

Extensions beyond OpenAI (vLLM's names): `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `structured_outputs`
(`json`, `regex`, `choice`, `grammar`, `json_object`, `structural_tag`), and for chat `chat_template_kwargs`
(`thinking`, `reasoning_effort`, `drop_thinking`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dsv4.engine.sampling import MAX_LOGPROBS

MAX_N = 64          # completions per request
MAX_STOP = 16       # stop strings per request
INT64 = (-(2**63), 2**64 - 1)   # seeds are taken mod 2^64


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool | None = None


StopStrings = Annotated[str, Field(min_length=1)]


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs` extension: exactly one of these (checked in prepare.py)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: Annotated[str, Field(min_length=1)] | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: Annotated[str, Field(min_length=1)] | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None


class SamplingFields(Strict):
    """What /v1/completions and /v1/chat/completions share."""

    model: str
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=100)] | None = None
    seed: Annotated[int, Field(ge=INT64[0], le=INT64[1])] | None = None
    stop: StopStrings | Annotated[list[StopStrings], Field(max_length=MAX_STOP)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    user: str | None = None     # accepted for compatibility; not used
    structured_outputs: StructuredOutputs | None = None


# ------------------------------------------------------------------------------------------------ completions

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: Annotated[str, Field(min_length=1)] | TokenIds | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                                       Field(min_length=1)] \
        | Annotated[list[TokenIds], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None          # only false: echoing the prompt is not supported
    best_of: Annotated[int, Field(ge=1)] | None = None   # only equal to n
    suffix: None = None               # insertion is not supported


# ------------------------------------------------------------------------------------------------ chat

class TextPart(Strict):
    type: Literal["text"]
    text: str


class MediaPart(BaseModel):
    """An image, audio, video or file part: valid in OpenAI's (and vLLM's) schema, so it is parsed (its payload
    unchecked) and then refused by prepare.py with a message that says why, rather than failing the text-part
    schema with a list of type errors. The model reads text only."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["image_url", "input_image", "input_audio", "audio_url", "video_url", "file"]


Content = str | list[Annotated[TextPart | MediaPart, Field(discriminator="type")]]


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(Strict):
    role: Literal["system"]
    content: Content
    name: str | None = None           # accepted; the V4 format has no place for it


class DeveloperMessage(Strict):
    role: Literal["developer"]
    content: Content
    name: str | None = None


class UserMessage(Strict):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: Content | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None


class ToolMessage(Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
                    Field(discriminator="role")]


class FunctionDef(Strict):
    # Names are pasted into DSML markup (`name="..."`), so quotes and markup characters must not get in.
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaSpec(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextFormat(Strict):
    type: Literal["text"]


class JSONObjectFormat(Strict):
    type: Literal["json_object"]


class JSONSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class ChatTemplateKwargs(Strict):
    thinking: bool | None = None
    reasoning_effort: Literal["high", "max"] | None = None
    drop_thinking: bool | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["high", "max"] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
