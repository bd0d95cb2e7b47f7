"""The `dsv4` command, run as a user runs it: `python -m dsv4 ...` subprocesses (and the installed entry point once).

Bad input must exit 2 with a `dsv4 <command>: error: ...` line and no traceback. Cases that need no process
of their own go through `main(argv)` in-process, which is the same code minus the interpreter start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.checkpoint import CheckpointReader, synthesize
from dsv4.cli import main
from dsv4.config import tiny_config


def dsv4_cli(*args: str, cwd: Path, cache: Path | None = None, entry_point: bool = False):
    # One thread: the models here are tiny, and two OpenMP threads on a busy 2-core runner spin-wait each other
    # at every op (measured 4-5x slower).
    env = dict(os.environ, DSV4_CACHE=str(cache or cwd / "cache"), OMP_NUM_THREADS="1")
    cmd = [shutil.which("dsv4")] if entry_point else [sys.executable, "-m", "dsv4"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


ENTRY_POINT = shutil.which("dsv4") is not None


def _synth_then_check(cwd: Path):
    cfg = tiny_config()
    (cwd / "tiny.json").write_text(json.dumps(cfg.to_hf()))
    out = cwd / "ckpt"
    done = dsv4_cli("synth", "--config", "tiny.json", "--out", str(out), "--layers", "2", "--seed", "3", cwd=cwd)
    return cfg, out, done, dsv4_cli("check", str(out), cwd=cwd) if done.returncode == 0 else None


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """This file's processes, two at a time (each test takes its own with `.result()`): a process spends most of
    its ~2-5 s importing on one core, so two overlap on CI's two cores (measured 14.8 -> 8.9 s)."""
    def cwd(name):
        return tmp_path_factory.mktemp(name)

    with ThreadPoolExecutor(2) as pool:
        runs = {}
        if ENTRY_POINT:                     # first: test_entry_point is the first test to wait
            entry = cwd("entry")
            runs["entry_help"] = pool.submit(dsv4_cli, "--help", cwd=entry, entry_point=True)
            runs["entry_synth"] = pool.submit(dsv4_cli, "synth", "--config", "flash", "--out", "out", "--layers",
                                              "0", cwd=entry, entry_point=True)
        runs["synth"] = pool.submit(_synth_then_check, cwd("synth"))
        runs["generate"] = pool.submit(dsv4_cli, "generate", "def fibonacci(n):", "--max-tokens", "24",
                                       cwd=cwd("generate"))
        runs["missing"] = pool.submit(dsv4_cli, "generate", "hello", "--model", "no-such-dir", cwd=cwd("missing"))
        yield runs


def _one_error_line(stderr: str, command: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dsv4 {command}: error: "), stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- help
HELP = {
    (): ["generate", "synth", "check"],
    ("generate",): ["prompt", "--model", "--max-tokens", "--max-new-tokens", "--temperature", "--seed", "--device",
                    "--dtype", "--no-quant-emulation", "trained on Python source and chat requests"],
    ("synth",): ["--config", "--out", "--seed", "--layers", "--shard-gb", "'flash', 'pro'"],
    ("check",): ["model", "without loading any weights"],
    ("serve",): ["--max-num-seqs", "--compile-decode", "--port"],
    ("bench",): ["--decode-batches", "--no-compile", "--no-transformers", "--timing-only"],
}


@pytest.mark.parametrize("command", list(HELP), ids=lambda c: " ".join(c) or "dsv4")
def test_help(capsys, command):
    # In process (argparse's exit 0 is a SystemExit): the interpreter start is test_entry_point's, ~1.5 s a case.
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    out, err = capsys.readouterr()
    assert done.value.code == 0 and err == ""
    assert out.startswith(f"usage: {' '.join(('dsv4', *command))} ")
    text = " ".join(out.split())  # argparse wraps lines
    assert all(word in text for word in HELP[command]), text


@pytest.mark.skipif(not ENTRY_POINT, reason="the dsv4 entry point is not installed")
def test_entry_point(launched):
    """The installed script as a user starts it: help on stdout and nothing on stderr (no warning at import),
    and an argparse rejection exits 2."""
    done = launched["entry_help"].result()
    assert done.returncode == 0 and done.stdout.startswith("usage: dsv4 ") and done.stderr == ""
    done = launched["entry_synth"].result()
    assert done.returncode == 2 and "dsv4 synth: error: argument --layers: must be > 0" in done.stderr


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        main([])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "required: command" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- synth + check
def test_synth_writes_a_loadable_checkpoint(launched, tmp_path):
    cfg, out, done, checked = launched["synth"].result()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out}"
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("ok: ") and "(2 layers, 1 MTP)" in checked.stdout
    model = dsv4.load_model(out, progress=False)
    assert model.cfg == cfg.replace(max_seq_len=4096).truncated(2) and len(model.layers) == 2
    # --seed and --layers are honoured: same bits as the library call.
    want = CheckpointReader(synthesize(model.cfg, tmp_path / "lib", seed=3, progress=False))
    got = CheckpointReader(out)
    assert got.keys() == want.keys()
    assert all(torch.equal(got.get(k).view(torch.uint8), want.get(k).view(torch.uint8)) for k in got)


@pytest.mark.parametrize("layers, message", [("0", "argument --layers: must be > 0, got 0"),
                                             ("-2", "argument --layers: must be > 0, got -2"),
                                             ("two", "argument --layers: invalid int value: 'two'")])
def test_synth_flash_layers_rejected_by_argparse(tmp_path, capsys, layers, message):
    # Flash is far too big to synthesise in CI: only the validation runs, before anything is written. In process
    # (argparse's exit 2 is a SystemExit; the console entry point itself: test_entry_point): ~2 s less a case.
    with pytest.raises(SystemExit) as done:
        main(["synth", "--config", "flash", "--out", str(tmp_path / "out"), "--layers", layers])
    err = capsys.readouterr().err
    assert done.value.code == 2 and f"dsv4 synth: error: {message}" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_synth_flash_too_many_layers(tmp_path, capsys):
    assert main(["synth", "--config", "flash", "--out", str(tmp_path / "out"), "--layers", "44"]) == 2
    _one_error_line(capsys.readouterr().err, "synth")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- generate
def test_generate_with_the_builtin_model(launched):
    """No --model: the trained built-in model continues a Python prompt with Python (the exact continuation is
    pinned in tests/test_builtin_model.py; here: the command, its note, and that the text is code-like)."""
    done = launched["generate"].result()
    assert done.returncode == 0, done.stderr
    assert "built-in" in done.stderr and "Traceback" not in done.stderr
    assert "\n    " in done.stdout  # an indented body follows the def line


def test_generate_default_token_budget():
    """The built-in model continuing code stops after a function's worth of tokens (the README's first command
    must finish in seconds on a CPU); chat, other models and an explicit --max-tokens keep theirs."""
    from dsv4.cli import BUILTIN_GENERATE_TOKENS, DEFAULT_MAX_TOKENS, build_parser, generate_max_tokens

    def budget(*argv):
        return generate_max_tokens(build_parser().parse_args(["generate", *argv]))

    assert BUILTIN_GENERATE_TOKENS < DEFAULT_MAX_TOKENS
    assert budget("def f():") == BUILTIN_GENERATE_TOKENS
    assert budget("hi", "--chat") == budget("hi", "--model", "m") == DEFAULT_MAX_TOKENS
    assert budget("def f():", "--max-tokens", "7") == 7


def test_chat_default_temperature():
    """`dsv4 chat` samples at CHAT_TEMPERATURE, but the built-in model answers greedily unless told otherwise (its
    card's figures are greedy); `generate` keeps its greedy default; an explicit --temperature always wins."""
    from dsv4.cli import CHAT_TEMPERATURE, _sampling, build_parser

    def temperature(*argv):
        return _sampling(build_parser().parse_args(list(argv))).temperature

    assert CHAT_TEMPERATURE == 1.0
    assert temperature("chat") == 0.0
    assert temperature("chat", "--model", "m") == CHAT_TEMPERATURE
    assert temperature("chat", "--temperature", "0.7") == temperature("chat", "--model", "m", "--temperature", "0.7")
    assert temperature("chat", "--temperature", "0.7") == 0.7
    assert temperature("generate", "hi", "--model", "m") == 0.0



def test_compile_prefill_follows_compile_decode():
    """Prefill segments are compiled where decode steps are (`dsv4 serve --compile-decode`, the bench unless
    --no-compile); --compile-prefill / --no-compile-prefill decide alone."""
    from dsv4.cli import build_parser
    from dsv4.engine.config import EngineConfig

    def serve(*argv):
        args = build_parser().parse_args(["serve", *argv])
        return EngineConfig(compile_decode=args.compile_decode, compile_prefill=args.compile_prefill).prefill_compiled()

    assert not serve() and serve("--compile-decode") and serve("--compile-prefill")
    assert not serve("--compile-decode", "--no-compile-prefill")
    bench = build_parser().parse_args(["bench"])
    assert bench.compile_prefill is None and not bench.no_compile     # BenchOptions: None = as `compile`

# ---------------------------------------------------------------------------------------------- bad arguments
def test_missing_model_dir(launched):
    """A process of its own: main's 2 must become the exit status (the other usage errors run in process)."""
    done = launched["missing"].result()
    assert done.returncode == 2 and done.stdout == ""
    assert "no checkpoint at no-such-dir" in _one_error_line(done.stderr, "generate")


def test_nonexistent_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--config", "no-such.json", "--out", "out"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no config file at no-such.json" in _one_error_line(err, "synth")
    assert not (tmp_path / "out").exists()


def _bad_json(tmp_path: Path) -> Path:
    (tmp_path / "bad.json").write_text("{")
    return tmp_path / "bad.json"


def _inconsistent(tmp_path: Path) -> Path:
    (tmp_path / "heads.json").write_text(json.dumps(tiny_config().to_hf() | {"num_attention_heads": 3}))
    return tmp_path / "heads.json"


def _no_config(tmp_path: Path) -> Path:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("argv, message", [
    (["synth", "--config", "{bad}", "--out", "{tmp}/o"], "bad.json is not a JSON config file"),
    (["synth", "--config", "{inconsistent}", "--out", "{tmp}/o"], "invalid DeepSeek-V4 config: n_heads=3"),
    (["synth", "--config", "flsh", "--out", "{tmp}/o"], "not a preset: flash, pro"),
    (["check", "{tmp}/absent"], "no checkpoint at"),
    (["check", "{no_config}"], "not a readable safetensors file"),
    (["generate", "hi", "--model", "{tmp}/absent"], "no checkpoint at"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    paths = {"tmp": tmp_path, "bad": _bad_json(tmp_path), "inconsistent": _inconsistent(tmp_path),
             "no_config": _no_config(tmp_path)}
    assert main([a.format(**paths) for a in argv]) == 2
    assert message in _one_error_line(capsys.readouterr().err, argv[0])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--max-tokens", "0"], "argument --max-new-tokens/--max-tokens: must be > 0"),
    (["generate", "hi", "--temperature", "-1"], "argument --temperature: must be >= 0"),
    (["generate", "hi", "--dtype", "fp16"], "argument --dtype: invalid choice"),
    (["synth", "--config", "flash", "--out", "o", "--shard-gb", "0"], "argument --shard-gb: must be > 0"),
    (["synth", "--out", "o"], "the following arguments are required: --config"),
    (["check"], "the following arguments are required: model"),
])
def test_argparse_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and f"dsv4 {argv[0]}: error: {message}" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys):
    assert main(["generate", "hi", "--device", "cuda"]) == 2
    assert "no CUDA device is available" in _one_error_line(capsys.readouterr().err, "generate")


def test_check_reports_every_offender(tmp_path, tiny_ckpt, capsys):
    assert main(["check", str(tiny_ckpt)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"num_hash_layers": 1}))
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv4 check: error: checkpoint ") and "Traceback" not in err
    assert "layers.1.ffn.gate.bias" in err and "layers.1.ffn.gate.tid2eid" in err
