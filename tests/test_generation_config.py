"""A checkpoint's generation_config.json as the server's defaults for omitted sampling fields
(dsv4/checkpoint/generation.py, dsv4/serve/prepare.py, `dsv4 serve`)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from serve_helpers import serve_command

from dsv4.builtin import BUILTIN_GENERATION_CONFIG, builtin_model_path
from dsv4.checkpoint.generation import generation_defaults
from dsv4.serve.prepare import ModelInfo, chat_inputs
from dsv4.serve.protocol import ChatCompletionRequest

REFERENCE = Path(__file__).parent / "reference"
USER = [{"role": "user", "content": "Hello there"}]


def write(tmp_path, config) -> Path:
    (tmp_path / "generation_config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    return tmp_path


def test_official_configs_give_openais_defaults_and_no_file_gives_none(tmp_path):
    for model in ("flash", "pro"):      # do_sample true, temperature 1.0, top_p 1.0 (bos/eos ids are not sampling)
        assert generation_defaults(REFERENCE / model) == {"temperature": 1.0, "top_p": 1.0}
    assert generation_defaults(tmp_path) == {}


def test_do_sample_false_is_greedy_and_top_k_zero_is_none(tmp_path):
    assert generation_defaults(write(tmp_path, {"do_sample": False, "temperature": 0.7})) == {"temperature": 0.0}
    got = generation_defaults(write(tmp_path, {"temperature": 0.6, "top_k": 0, "top_p": 0.95, "min_p": 0.05,
                                               "repetition_penalty": 1.1, "max_new_tokens": 9}))
    assert got == {"temperature": 0.6, "top_k": -1, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.1}
    assert generation_defaults(write(tmp_path, {"top_k": 40}))["top_k"] == 40


@pytest.mark.parametrize("config, words", [
    ({"temperature": -1}, "temperature = -1 is outside"), ({"top_p": 0}, "top_p = 0 is outside"),
    ({"top_p": 1.5}, "top_p = 1.5"), ({"top_k": 2.5}, "top_k must be a whole number"),
    ({"temperature": "hot"}, "temperature must be a finite number"), ({"temperature": True}, "finite number"),
    ({"do_sample": "no"}, "do_sample must be true or false"), ("[1]", "expected a JSON object"),
    ("{not json", "not readable JSON")])
def test_bad_values_are_errors_naming_the_file_and_key(tmp_path, config, words):
    with pytest.raises(ValueError, match=r"generation_config\.json") as e:
        generation_defaults(write(tmp_path, config))
    assert words in str(e.value)


def test_the_built_in_model_is_served_greedily_by_default():
    path = builtin_model_path() / "generation_config.json"
    assert json.loads(path.read_text()) == BUILTIN_GENERATION_CONFIG
    assert generation_defaults(builtin_model_path()) == {"temperature": 0.0}


def test_omitted_fields_take_the_defaults_and_the_request_wins(tokenizer):
    info = ModelInfo("m", 4096, 129280, 0, {"temperature": 0.0, "top_p": 0.9, "top_k": 5})

    def params(**body):
        req = ChatCompletionRequest.model_validate({"model": "m", "messages": USER} | body)
        return chat_inputs(req, tokenizer, info).params

    got = params()
    assert (got.temperature, got.top_p, got.top_k, got.min_p) == (0.0, 0.9, 5, 0.0)
    got = params(temperature=0.8, top_p=0.5, top_k=7)
    assert (got.temperature, got.top_p, got.top_k) == (0.8, 0.5, 7)
    plain = chat_inputs(ChatCompletionRequest.model_validate({"model": "m", "messages": USER}), tokenizer,
                        ModelInfo("m", 4096, 129280, 0)).params
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, -1)        # no file: OpenAI's defaults


def _with_generation_config(ckpt: Path, tmp_path: Path, config) -> Path:
    """The checkpoint's files linked into a new folder with `config` as its generation_config.json."""
    for f in ckpt.iterdir():
        (tmp_path / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())
    return write(tmp_path, config)


def test_dsv4_serve_takes_the_checkpoints_defaults(builtin_ckpt, tmp_path):
    """A checkpoint saying do_sample false: a request without a temperature is greedy (the same tokens as
    temperature 0); at temperature 1 the untrained model's 8 tokens would differ from the greedy ones."""
    import signal

    model = _with_generation_config(builtin_ckpt, tmp_path, {"do_sample": False})
    args = ["--model", str(model), "--served-model-name", "tiny", "--max-model-len", "256", "--num-pages", "4",
            "--page-size", "128", "--max-num-seqs", "2", "--log-level", "warning"]
    with serve_command(*args) as (proc, url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        omitted = c.completions.create(model="tiny", prompt="def f(x):", max_tokens=8)
        greedy = c.completions.create(model="tiny", prompt="def f(x):", max_tokens=8, temperature=0)
        sampled = c.completions.create(model="tiny", prompt="def f(x):", max_tokens=8, temperature=1, seed=3)
        assert omitted.choices[0].text == greedy.choices[0].text != sampled.choices[0].text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_dsv4_serve_refuses_a_bad_generation_config(builtin_ckpt, tmp_path):
    model = _with_generation_config(builtin_ckpt, tmp_path, {"temperature": -2})
    with socket.socket() as s:                  # a free port: the command checks it can listen before loading
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "dsv4", "serve", "--model", str(model), "--max-model-len", "256",
                          "--num-pages", "4", "--page-size", "128", "--port", str(port)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "generation_config.json: temperature = -2 is outside" in out.stderr
    assert "Traceback" not in out.stderr
