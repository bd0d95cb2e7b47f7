"""Request -> prompt and sampling parameters (no server): the chat prompt is exactly `encode_messages` of the same
conversation, tools land on the system message, thinking / effort / tool_choice do what the docs say."""

from __future__ import annotations

import pytest

from dsv4.chat import encode_messages
from dsv4.chat.tokens import REASONING_EFFORT_MAX, THINK_END, THINK_START
from dsv4.serve.errors import APIError
from dsv4.serve.prepare import ModelInfo, chat_inputs, completion_inputs
from dsv4.serve.protocol import ChatCompletionRequest, CompletionRequest
from dsv4.tokenizer import encode_prompt

INFO = ModelInfo("m", 4096, 129280, 0)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]



def chat(**body):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": CONVERSATION} | body)


def text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_prompt_is_the_official_encoding(tokenizer, thinking):
    kwargs = {"chat_template_kwargs": {"thinking": True}} if thinking else {}
    got = chat_inputs(chat(tools=TOOLS, **kwargs), tokenizer, INFO)
    conversation = [{**CONVERSATION[0], "tools": TOOLS}, *CONVERSATION[1:]]
    want = encode_messages(conversation, thinking_mode="thinking" if thinking else "chat")
    assert got.prompt_ids == encode_prompt(tokenizer, want, 0)
    assert text(tokenizer, got.prompt_ids).endswith(THINK_START if thinking else THINK_END)
    assert got.thinking_mode == ("thinking" if thinking else "chat")
    assert got.params.max_tokens == INFO.max_model_len - len(got.prompt_ids)     # chat default: the rest


def test_tools_get_a_system_message_when_there_is_none_and_none_hides_them(tokenizer):
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    with_tools = text(tokenizer, chat_inputs(chat(**body), tokenizer, INFO).prompt_ids)
    assert "## Tools" in with_tools and '"name": "get_weather"' in with_tools
    hidden = text(tokenizer, chat_inputs(chat(**body, tool_choice="none"), tokenizer, INFO).prompt_ids)
    assert "## Tools" not in hidden


def test_reasoning_effort_max_turns_thinking_on_with_its_paragraph(tokenizer):
    got = chat_inputs(chat(reasoning_effort="max"), tokenizer, INFO)
    assert got.thinking_mode == "thinking"
    assert REASONING_EFFORT_MAX in text(tokenizer, got.prompt_ids)


def test_sampling_fields_reach_the_engine(tokenizer):
    got = chat_inputs(chat(temperature=0.5, top_p=0.8, top_k=7, min_p=0.1, presence_penalty=1, frequency_penalty=-1,
                           repetition_penalty=1.2, seed=3, stop="x", max_completion_tokens=9, n=2, logprobs=True,
                           top_logprobs=4, ignore_eos=True), tokenizer, INFO).params
    assert (got.temperature, got.top_p, got.top_k, got.min_p) == (0.5, 0.8, 7, 0.1)
    assert (got.presence_penalty, got.frequency_penalty, got.repetition_penalty) == (1, -1, 1.2)
    assert (got.seed, got.stop, got.max_tokens, got.n, got.logprobs, got.ignore_eos) == (3, ("x",), 9, 2, 4, True)


@pytest.mark.parametrize("extreme", [{"top_k": 2**63 - 1}, {"top_p": 2.0**-149}, {"top_p": 1e-30, "top_k": 3},
                                     {"repetition_penalty": 2.0**-149, "top_p": 0.5}, {"temperature": 2e-5}])
def test_what_the_server_accepts_the_sampler_can_run(tokenizer, extreme):
    """A request that passes validation must not fail the engine's step (that fails every request in the batch
    and stops the engine): pack its extreme-but-valid parameters and sample a token."""
    import torch

    from dsv4.engine.sampling import SamplingTensors, TokenCounts, request_seeds, sample

    params = chat_inputs(chat(**extreme), tokenizer, INFO).params
    st = SamplingTensors.from_params([params], request_seeds(params), [0], "cpu")
    counts = TokenCounts(1, 64)
    counts.start(0, list(range(32)))
    token = sample(torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * 5, st, counts).token_ids
    assert 0 <= int(token) < 64


def test_completion_prompts_and_defaults(tokenizer):
    ids, params = completion_inputs(CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b c"]}),
                                    tokenizer, INFO)
    assert [p[0] for p in ids] == [0, 0] and all(p.max_tokens == 16 and p.temperature == 1.0 for p in params)
    ids, _ = completion_inputs(CompletionRequest.model_validate({"model": "m", "prompt": [[0, 5], [0, 6]]}),
                               tokenizer, INFO)
    assert ids == [[0, 5], [0, 6]]


def test_unknown_model_is_404(tokenizer):
    with pytest.raises(APIError) as e:
        chat_inputs(chat(model="other"), tokenizer, INFO)
    assert (e.value.status, e.value.code) == (404, "model_not_found")
