"""The `dsv4` command on wrong input and interruptions, found by using it as a newcomer would: each case must end
with exit 2 (130 for Ctrl-C) and one `dsv4 <command>: error: ...` line naming the offending thing, before any slow
work where it can, never with a traceback. In-process through `main(argv)`; no case loads more than the tiny
test checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
from types import SimpleNamespace

import pytest
import torch
from test_cli import _one_error_line

import dsv4.cli as cli
from dsv4.checkpoint import CheckpointError
from dsv4.cli import main


def _errors(capsys, argv: list[str], command: str | None = None) -> str:
    assert main([str(a) for a in argv]) == 2
    return _one_error_line(capsys.readouterr().err, command or argv[0])


def _argparse_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------- damaged checkpoints
def test_truncated_shard(tmp_path, tiny_ckpt, capsys):
    """A shard cut short passes the header read but not safetensors' open: it was a SafetensorError traceback."""
    bad = shutil.copytree(tiny_ckpt, tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    line = _errors(capsys, ["check", bad])
    assert f"{shard} is not a readable safetensors file" in line


def test_corrupt_tokenizer(tmp_path, tiny_ckpt, capsys):
    """A damaged tokenizer.json was a bare `Exception` traceback from the tokenizers library."""
    bad = shutil.copytree(tiny_ckpt, tmp_path / "bad")
    (bad / "tokenizer.json").write_text('{"model":')
    from dsv4.checkpoint.reader import checkpoint_tokenizer

    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a readable tokenizer"):
        checkpoint_tokenizer(bad)
    line = _errors(capsys, ["generate", "hi", "--model", bad, "--device", "cpu"])
    assert f"{bad / 'tokenizer.json'} is not a readable tokenizer" in line


def test_hub_error_is_one_line(monkeypatch):
    """huggingface_hub's messages span lines; the CLI's error must stay one line."""
    import huggingface_hub

    from dsv4.checkpoint.hub import resolve_model

    def offline(*args, **kwargs):
        raise OSError("Got: ConnectError\nPlease check your internet connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError) as e:
        resolve_model("owner/name-that-is-not-here")
    assert "\n" not in str(e.value) and "ConnectError Please check" in str(e.value)


# ---------------------------------------------------------------------------------------------- output directories
def _tiny_json(tmp_path, tiny_cfg):
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_cfg.to_hf()))
    return tmp_path / "tiny.json"


def test_synth_refuses_a_non_empty_out(tmp_path, tiny_cfg, capsys):
    """`synth` into a non-empty directory silently mixed the new shards with what was there (or overwrote a
    checkpoint, the built-in model's included); into a file it was a NotADirectoryError traceback."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = _errors(capsys, ["synth", "--config", _tiny_json(tmp_path, tiny_cfg), "--out", out])
    assert f"--out {out} is not empty" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    line = _errors(capsys, ["synth", "--config", tmp_path / "tiny.json", "--out", out / "keep.txt"])
    assert "exists and is not a directory" in line
    assert main(["synth", "--config", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "empty")]) == 0


def test_synth_shard_size_below_one_byte(tmp_path, tiny_cfg, capsys):
    line = _errors(capsys, ["synth", "--config", _tiny_json(tmp_path, tiny_cfg), "--out", tmp_path / "o",
                            "--shard-gb", "1e-12"])
    assert "--shard-gb 1e-12: less than one byte per shard" in line and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- finetune
def test_finetune_data_that_is_a_directory(tmp_path, tiny_ckpt, capsys):
    """An OSError on a path the user gave (here IsADirectoryError) was a traceback."""
    line = _errors(capsys, ["finetune", "--data", tmp_path, "--lora", "2", "--model", tiny_ckpt, "--device", "cpu",
                            "--out", tmp_path / "ft"])
    assert "Is a directory" in line and str(tmp_path) in line


def test_finetune_data_bad_bytes_name_the_line(tmp_path):
    from dsv4.train.data import read_documents

    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"input_ids": [0, 5, 6]}\n{"input_ids": [0, \xff]}\n')
    with pytest.raises(ValueError, match=f"^{re.escape(str(data))}:2: 'utf-8' codec can't decode"):
        read_documents(data)


@pytest.mark.parametrize("flag", ["--clip-grad", "--warmup-steps", "--weight-decay", "--min-lr-ratio",
                                  "--save-every", "--mtp-weight", "--unlikelihood", "--copy-ngram"])
def test_finetune_negative_values_rejected(capsys, flag):
    """A negative --clip-grad made torch scale every gradient by a negative factor (gradient ascent, silently);
    the other weights, counts and rates mean nothing below 0 either."""
    line = _argparse_error(capsys, ["finetune", "--data", "d.jsonl", "--lora", "2", flag, "-1"])
    assert line == f"dsv4 finetune: error: argument {flag}: must be >= 0, got -1"


@pytest.mark.parametrize("flag", ["--probe-prefixes", "--probe-prefix-len", "--probe-tokens"])
def test_finetune_probe_sizes_must_be_positive(capsys, flag):
    line = _argparse_error(capsys, ["finetune", "--data", "d.jsonl", "--lora", "2", flag, "0"])
    assert line == f"dsv4 finetune: error: argument {flag}: must be >= 1, got 0"


# ---------------------------------------------------------------------------------------------- lora-merge
def _adapter(tmp_path, tiny_ckpt, **meta):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    config = {"rank": 2, "alpha": 4.0, "targets": ["attn"], "base_model": str(tiny_ckpt)} | meta
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def test_lora_merge_wrong_adapter_dirs(tmp_path, tiny_ckpt, capsys):
    """Each was a traceback (FileNotFoundError, NotADirectoryError, JSONDecodeError, KeyError, SafetensorError)."""
    adapter = _adapter(tmp_path, tiny_ckpt)
    out = tmp_path / "merged"
    assert "did you mean" in _errors(capsys, ["lora-merge", adapter.parent, "--out", out])
    (tmp_path / "file").write_text("")
    assert "file is not an adapter directory" in _errors(capsys, ["lora-merge", tmp_path / "file", "--out", out])
    (adapter / "adapter.safetensors").write_bytes(b"\x10\x00")          # cut short
    assert "adapter.safetensors is not a readable safetensors file" in _errors(
        capsys, ["lora-merge", adapter, "--out", out])
    (adapter / "adapter_config.json").write_text('{"rank": 2,')
    assert "adapter_config.json is not a readable JSON file" in _errors(capsys, ["lora-merge", adapter, "--out", out])
    (adapter / "adapter_config.json").write_text('{"rank": 2}')
    assert "adapter_config.json lacks alpha, targets, base_model" in _errors(
        capsys, ["lora-merge", adapter, "--out", out])
    assert not out.exists()


def test_lora_merge_refuses_a_non_empty_out(tmp_path, tiny_ckpt, capsys):
    """Merging into the base checkpoint's own directory overwrote it."""
    line = _errors(capsys, ["lora-merge", _adapter(tmp_path, tiny_ckpt), "--out", tiny_ckpt])
    assert f"--out {tiny_ckpt} is not empty" in line


# ---------------------------------------------------------------------------------------------- generate, chat, serve
def test_engine_option_conflict(tiny_ckpt, capsys):
    """EngineConfig's own checks (here speculative decoding under TP) were a ValueError traceback."""
    line = _errors(capsys, ["generate", "hi", "--model", tiny_ckpt, "--speculative-tokens", "2", "--tp", "2",
                            "--device", "cpu"])
    assert "num_speculative_tokens > 0 needs tensor_parallel_size 1" in line


def test_speculative_tokens_not_an_int(capsys):
    line = _argparse_error(capsys, ["generate", "hi", "--speculative-tokens", "abc"])
    assert line == "dsv4 generate: error: argument --speculative-tokens: invalid int value: 'abc'"


def test_chat_without_stdin(monkeypatch, capsys):
    """`dsv4 chat <&-` loaded the model, then died in input() with "RuntimeError: lost sys.stdin"."""
    monkeypatch.setattr(sys, "stdin", None)
    assert "standard input is closed" in _errors(capsys, ["chat"])


def test_ctrl_c_exits_130_without_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_check", interrupted)
    try:
        assert main(["check", "somewhere"]) == 130
    except KeyboardInterrupt:              # escaping, it would stop the whole pytest session
        pytest.fail("Ctrl-C escaped main() as a KeyboardInterrupt traceback")
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "dsv4 check: interrupted"


def test_generate_says_when_max_tokens_cut_the_text():
    """A continuation cut by the budget looked exactly like one the model ended; now stderr says which."""
    import io

    from dsv4.interactive import keep_output, note_if_cut, print_stream

    class Output:
        finish_reason, token_ids = "length", [5, 6, 7]

    def stream(reason):
        yield "def f():"
        out = Output()
        out.finish_reason = reason
        return out

    text, err = io.StringIO(), io.StringIO()
    done: dict = {}
    print_stream(keep_output(stream("length"), done), text)
    note_if_cut(done, err)
    assert text.getvalue() == "def f():\n" and err.getvalue() == "[cut: reached --max-tokens (3 tokens); raise it " \
                                                                   "for more]\n"
    done, err = {}, io.StringIO()
    print_stream(keep_output(stream("stop"), done), text)
    note_if_cut(done, err)
    assert err.getvalue() == ""


def test_serve_port_out_of_range(capsys):
    """Port 70000 passed argparse, loaded the model, then died in uvicorn with an OverflowError traceback."""
    line = _argparse_error(capsys, ["serve", "--port", "70000"])
    assert line == "dsv4 serve: error: argument --port: must be at most 65535, got 70000"


def test_serve_port_in_use_fails_before_loading(monkeypatch, capsys):
    """A port in use was found only after the model had loaded (minutes for a large one)."""
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(cli, "_llm", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _errors(capsys, ["serve", "--port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_without_cuda(capsys):
    """It exited 1 with "dsv4 bench: needs a CUDA GPU", unlike every other usage error."""
    assert "needs a CUDA GPU" in _errors(capsys, ["bench"])


def test_finetune_shows_the_model_load(tmp_path, tiny_ckpt, monkeypatch):
    """`dsv4 finetune` loaded the model with its bar off: minutes of silence on a large checkpoint."""
    import dsv4.train.run as run

    seen = {}

    class Loaded(Exception):
        pass

    def load_model(*args, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(run, "load_model", load_model)
    (tmp_path / "d.jsonl").write_text('{"input_ids": [0, 5, 6]}\n')
    with pytest.raises(Loaded):
        run.finetune(tmp_path / "d.jsonl", tmp_path / "out", str(tiny_ckpt), lora_rank=2, progress=True)
    assert seen["progress"] is True


def test_help_explains_every_option(capsys):
    """The penalties' help was only "(default 0)"; `parity dump --dtype` and `parity precision --seed` had none."""
    for argv, words in [(["generate"], ["less likely", "subtracted once", "subtracted per earlier occurrence"]),
                        (["parity", "dump"], ["compute dtype (default float32)"]),
                        (["parity", "precision"], ["seed of the random inputs"])]:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(w in text for w in words), (argv, text)


def test_piped_chat_prints_the_replies_alone():
    """`printf 'q\\n' | dsv4 chat > out.txt` wrote the help line and a "> " per turn into out.txt."""
    import io

    from dsv4 import interactive

    class Replies:                                   # LLM.stream's shape: text pieces, then the finished output
        def stream(self, prompt, params):
            yield "def f(): pass"
            return SimpleNamespace(finish_reason="stop", token_ids=[1, 2])

        def ended_at_eos(self, out):
            return True

    lines = iter(["write f"])

    def read(prompt):
        assert prompt == ""                          # no "> " on stdout either (input() writes it there)
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    out = io.StringIO()
    interactive.chat_loop(Replies(), None, read=read, out=out, prompts=False)
    assert out.getvalue() == "def f(): pass\n"


def test_warnings_are_one_line_while_a_command_runs(monkeypatch):
    """Python's format adds the source file and line (`cli.py:389: UserWarning: ...` and the code line)."""
    import warnings

    seen = []
    monkeypatch.setattr(cli, "cmd_check", lambda args: seen.append(warnings.formatwarning(
        "the tokenizer has more ids", UserWarning, "dsv4/llm.py", 47)) or 0)
    default = warnings.formatwarning
    assert main(["check", "somewhere"]) == 0
    assert seen == ["dsv4 check: warning: the tokenizer has more ids\n"] and warnings.formatwarning is default
