"""The Python API's argument errors: a bad argument to `dsv4.LLM` / `generate` / `stream` / `chat` /
`dsv4.load_model` is a TypeError or ValueError that names it, raised before any work, never a deep internal error
(and a refused request leaves nothing behind in the engine)."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.builtin import builtin_model_path
from dsv4.engine.engine import RequestError


@pytest.fixture(scope="module")
def llm():
    return dsv4.LLM(max_num_seqs=4, num_pages=16, page_size=128)


@pytest.mark.parametrize("prompts", [None, 5, b"abc", [None], [0.5, 1.0], [[0, 1], 7], torch.tensor([0, 5])])
def test_generate_rejects_prompts_of_the_wrong_type(llm, prompts):
    with pytest.raises(TypeError, match=r"prompts(\[\d\])? must be"):
        llm.generate(prompts)


def test_generate_takes_integer_ids_of_any_integer_type(llm):
    params = dsv4.SamplingParams(temperature=0, max_tokens=2)
    ids = llm.generate([0, 5, 6], params)[0].token_ids
    assert llm.generate([torch.tensor(0).numpy()[()], 5, 6], params)[0].token_ids == ids


@pytest.mark.parametrize("params", [{"max_tokens": 3}, "greedy", [dsv4.SamplingParams(), None]])
def test_generate_rejects_sampling_params_of_the_wrong_type(llm, params):
    with pytest.raises(TypeError, match="sampling_params must be"):
        llm.generate("a", params)


def test_a_refused_prompt_leaves_no_request_behind(llm):
    with pytest.raises(RequestError, match="prompt token ids"):
        llm.generate(["fine", [10**9]], dsv4.SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished() and llm.engine.cache.pages.num_used == 0


def test_stream_takes_one_prompt_and_one_completion(llm):
    with pytest.raises(TypeError, match="prompt must be a str or a list of int token ids"):
        list(llm.stream(["a", "b"]))
    with pytest.raises(ValueError, match="n must be 1"):
        list(llm.stream("a", dsv4.SamplingParams(n=2, max_tokens=2)))
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("messages", [{"role": "user", "content": "hi"}, "hi", None])
def test_chat_rejects_messages_that_are_not_a_list(llm, messages):
    with pytest.raises(TypeError, match="messages must be a list"):
        llm.chat(messages)


@pytest.mark.parametrize("options, name", [({"quant_emulation": "no"}, "quant_emulation"),
                                           ({"max_num_seqs": "4"}, "max_num_seqs"),
                                           ({"max_model_len": 1.5}, "max_model_len"),
                                           ({"page_size": None}, "page_size")])
def test_engine_options_of_the_wrong_type_are_refused(options, name):
    with pytest.raises(TypeError, match=f"engine option {name} must be"):
        dsv4.LLM(**options)


def test_model_argument_and_keyword_only_options():
    with pytest.raises(TypeError, match="model must be None, a checkpoint directory or a Hub id"):
        dsv4.LLM(123)
    with pytest.raises(TypeError):          # was taken as the Hub revision and ignored
        dsv4.LLM(None, "cpu")


def test_bad_devices_are_value_errors_naming_the_device():
    with pytest.raises(ValueError, match="device must be a torch device"):
        dsv4.LLM(device="bogus")
    with pytest.raises(ValueError, match="device must be a torch device"):
        dsv4.load_model(builtin_model_path(), device="bogus", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            dsv4.LLM(device="cuda")


def test_load_model_takes_dtype_names_and_checks_its_path():
    model = dsv4.load_model(builtin_model_path(), dtype="bfloat16", progress=False)
    assert model.embed.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype or its name"):
        dsv4.load_model(builtin_model_path(), dtype="int8", progress=False)
    with pytest.raises(TypeError, match="path must be a checkpoint directory"):
        dsv4.load_model(None)
