"""Request bodies -> engine inputs: prompt token ids and `SamplingParams`, with every check that pydantic's types
cannot express (the model name, the context length, tool schemas, parameter combinations).

Defaults follow OpenAI: `max_tokens` is 16 for /v1/completions and "the rest of the context" for chat; sampling
fields a request leaves out take the checkpoint's generation_config.json (`ModelInfo.sampling_defaults`), else
OpenAI's (temperature 1, top_p 1).
Thinking mode is on when `chat_template_kwargs.thinking` is true or a `reasoning_effort` is given.
Constraints (response_format, forced tool calls, structured_outputs) are built and compiled in constraints.py;
`grammars` is the engine's `Grammars` (None: not compiled here, the engine compiles on admission).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jsonschema import exceptions as jsonschema_errors
from jsonschema import validators

from dsv4.chat import encode_messages
from dsv4.engine.sampling import SamplingParams, SamplingParamsError
from dsv4.engine.structured import StructuredOutputsParams
from dsv4.serve import constraints
from dsv4.serve.errors import APIError
from dsv4.serve.protocol import ChatCompletionRequest, CompletionRequest, MediaPart, SamplingFields
from dsv4.tokenizer import encode_prompt

MAX_SEQUENCES = 256   # prompts x n of one request
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    bos_id: int
    sampling_defaults: dict = field(default_factory=dict)   # dsv4.checkpoint.generation.generation_defaults


@dataclass(frozen=True)
class ChatInputs:
    prompt_ids: list[int]
    params: SamplingParams
    thinking_mode: str          # "chat" | "thinking"
    tools: bool                 # tool calls are parsed into `tool_calls`


def check_model(req: SamplingFields, info: ModelInfo) -> None:
    if req.model != info.name:
        raise APIError(f"the model {req.model!r} does not exist; this server serves {info.name!r}", 404, "model",
                       "model_not_found")


def _check_text(text: str, param: str) -> None:
    """JSON may carry lone surrogates (`"\\ud800"`); they are not text and cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(f"{param} is not valid Unicode text: {e.reason} at position {e.start}", 400, param,
                       "invalid_value") from None


def _fit(prompt_len: int, max_tokens: int | None, info: ModelInfo, param: str, prompt_param: str) -> int:
    """max_tokens for this prompt (None = the rest of the context); 400 when prompt + max_tokens do not fit."""
    room = info.max_model_len - prompt_len
    if room < 1:
        raise APIError(f"the prompt has {prompt_len} tokens but the context length is {info.max_model_len} "
                       "(at least one token must be left to generate)", 400, prompt_param, "context_length_exceeded")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(f"{param} ({max_tokens}) + the prompt ({prompt_len} tokens) exceeds the context length "
                       f"{info.max_model_len}", 400, param, "context_length_exceeded")
    return max_tokens


OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None,
                    structured: StructuredOutputsParams | None = None,
                    defaults: dict | None = None) -> SamplingParams:
    """`defaults`: the model's generation config (ModelInfo.sampling_defaults) for the fields the request omits."""
    base = {**OPENAI_DEFAULTS, **(defaults or {})}

    def pick(value, default):
        return default if value is None else value

    try:
        return SamplingParams(temperature=pick(req.temperature, base["temperature"]),
                              top_p=pick(req.top_p, base["top_p"]), top_k=pick(req.top_k, base["top_k"]),
                              min_p=pick(req.min_p, base["min_p"]),
                              repetition_penalty=pick(req.repetition_penalty, base["repetition_penalty"]),
                              presence_penalty=pick(req.presence_penalty, 0.0),
                              frequency_penalty=pick(req.frequency_penalty, 0.0), seed=req.seed,
                              max_tokens=max_tokens, stop=req.stop, ignore_eos=bool(req.ignore_eos),
                              logprobs=logprobs, n=pick(req.n, 1), structured_outputs=structured)
    except ValueError as e:     # what the request's types and ranges let through (float32 and int64 limits)
        param = e.field if isinstance(e, SamplingParamsError) else None
        raise APIError(str(e), 400, param, "invalid_value") from e


# ------------------------------------------------------------------------------------------------ completions

def completion_inputs(req: CompletionRequest, tokenizer, info: ModelInfo,
                      grammars=None) -> tuple[list[list[int]], list[SamplingParams]]:
    """One (prompt ids, params) per prompt of the request."""
    check_model(req, info)
    if req.echo:
        raise APIError("echo is not supported", 400, "echo", "unsupported_value")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError("best_of must equal n (ranking several samples is not supported)", 400, "best_of",
                       "unsupported_value")
    prompts = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
    if len(prompts) * (req.n or 1) > MAX_SEQUENCES:
        raise APIError(f"{len(prompts)} prompts x n = {req.n} is more than {MAX_SEQUENCES} sequences", 400, "n",
                       "invalid_value")
    for p in prompts:
        if isinstance(p, str):
            _check_text(p, "prompt")
    ids = [encode_prompt(tokenizer, p, info.bos_id) if isinstance(p, str) else list(p) for p in prompts]
    for p in ids:
        bad = [t for t in p if t >= info.vocab_size]
        if bad:
            raise APIError(f"prompt token ids must be < the vocabulary size {info.vocab_size}, got {bad[0]}", 400,
                           "prompt", "invalid_value")
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    structured = constraints.extension_constraint(req, grammars)
    return ids, [sampling_params(req, _fit(len(p), max_tokens, info, "max_tokens", "prompt"), req.logprobs, structured,
                                 info.sampling_defaults)
                 for p in ids]


# ------------------------------------------------------------------------------------------------ chat

def chat_inputs(req: ChatCompletionRequest, tokenizer, info: ModelInfo, grammars=None) -> ChatInputs:
    check_model(req, info)
    _check_text_only(req)
    _check_chat_options(req)
    kwargs = req.chat_template_kwargs
    effort = req.reasoning_effort or (kwargs.reasoning_effort if kwargs else None)
    thinking = kwargs.thinking if kwargs and kwargs.thinking is not None else effort is not None
    if effort is not None and not thinking:
        raise APIError("reasoning_effort needs thinking mode; drop chat_template_kwargs.thinking=false", 400,
                       "reasoning_effort", "invalid_value")
    use_tools = bool(req.tools) and req.tool_choice != "none"
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    if use_tools:
        messages = _on_system(messages, "tools", [t.model_dump(exclude_none=True) for t in req.tools])
    if req.response_format is not None and req.response_format.type != "text":   # the official place for it
        messages = _on_system(messages, "response_format", req.response_format.model_dump(by_alias=True,
                                                                                           exclude_none=True))
    structured = constraints.chat_constraint(req, thinking, grammars)
    mode = "thinking" if thinking else "chat"
    drop = kwargs.drop_thinking if kwargs and kwargs.drop_thinking is not None else True
    try:
        text = encode_messages(messages, thinking_mode=mode, drop_thinking=drop,
                               reasoning_effort=effort if thinking else None)
    except ValueError as e:
        raise APIError(str(e), 400, "messages", "invalid_value") from e
    _check_text(text, "messages")
    ids = encode_prompt(tokenizer, text, info.bos_id)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _fit(len(ids), req.max_completion_tokens or req.max_tokens, info, param, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return ChatInputs(ids, sampling_params(req, max_tokens, logprobs, structured, info.sampling_defaults), mode,
                      use_tools)


def _check_text_only(req: ChatCompletionRequest) -> None:
    for i, msg in enumerate(req.messages):
        parts = msg.content if isinstance(msg.content, list) else []
        for j, part in enumerate(parts):
            if isinstance(part, MediaPart):
                raise APIError(f"{part.type} content parts are not supported: this model reads text only (send "
                               "content as a string or as parts of type 'text')", 400, f"messages[{i}].content[{j}]",
                               "unsupported_value")


def _check_chat_options(req: ChatCompletionRequest) -> None:
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise APIError("max_tokens and max_completion_tokens disagree; send one of them", 400, "max_tokens",
                       "invalid_value")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs=true", 400, "top_logprobs", "invalid_value")
    if req.tool_choice is not None and not req.tools:
        raise APIError("tool_choice needs tools", 400, "tool_choice", "invalid_value")
    if req.parallel_tool_calls is False and req.tool_choice in (None, "auto", "none"):
        raise APIError("parallel_tool_calls=false needs a forced tool_choice ('required' or a named function): "
                       "only a constrained reply can be held to one call", 400, "parallel_tool_calls",
                       "unsupported_value")
    if req.tools:
        _check_tools(req)


def _check_tools(req: ChatCompletionRequest) -> None:
    names = [t.function.name for t in req.tools]
    for i, tool in enumerate(req.tools):
        if names.index(tool.function.name) != i:
            raise APIError(f"two tools are named {tool.function.name!r}", 400, f"tools[{i}].function.name",
                           "invalid_value")
        schema = tool.function.parameters
        if schema is None:
            continue
        param = f"tools[{i}].function.parameters"
        if schema.get("type") != "object":
            raise APIError(f"invalid schema for function {tool.function.name!r}: the parameters must be a JSON "
                           f"Schema of type 'object', got type {schema.get('type')!r}", 400, param,
                           "invalid_function_parameters")
        try:
            validators.validator_for(schema).check_schema(schema)
        except jsonschema_errors.SchemaError as e:
            raise APIError(f"invalid schema for function {tool.function.name!r}: {e.message}", 400, param,
                           "invalid_function_parameters") from e


def _on_system(messages: list[dict], key: str, value) -> list[dict]:
    """Tools and the response format go on the first system message (the V4 format's place for them); one is
    added when there is none."""
    for i, m in enumerate(messages):
        if m["role"] == "system":
            return [*messages[:i], {**m, key: value}, *messages[i + 1:]]
    return [{"role": "system", "content": "", key: value}, *messages]
