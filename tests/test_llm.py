"""`dsv4.LLM` (offline API), Hub ids through a local fake Hub cache, and the `dsv4 chat` terminal loop under a
pseudo-terminal."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time

import pytest

import dsv4
from dsv4.checkpoint.errors import CheckpointError


@pytest.fixture(scope="module")
def llm(builtin_ckpt):
    return dsv4.LLM(str(builtin_ckpt), max_num_seqs=4, num_pages=16, page_size=128)


def test_generate_takes_text_and_ids_and_per_prompt_params(llm):
    greedy = dsv4.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate(["hello", [0, 5, 6, 7]], [greedy, dsv4.SamplingParams(max_tokens=3, seed=1)])
    assert len(outs) == 2 and all(o.finished for o in outs)
    assert outs[0].prompt_token_ids[0] == 0 and outs[0].prompt_token_ids.count(0) == 1
    assert len(outs[0].token_ids) == 5 and outs[0].finish_reason == "length"
    assert len(outs[1].token_ids) <= 3 and isinstance(outs[1].text, str)
    again = llm.generate("hello", greedy)[0]
    assert again.token_ids == outs[0].token_ids


def test_n_completions_have_their_own_seeds(llm):
    out = llm.generate("x", dsv4.SamplingParams(n=3, seed=5, max_tokens=6, ignore_eos=True))[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_chat_parses_the_reply(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], dsv4.SamplingParams(temperature=0, max_tokens=4))[0]
    assert out.message["role"] == "assistant" and isinstance(out.message["content"], str)


def test_stream_yields_the_text_and_closing_aborts(llm):
    params = dsv4.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    pieces = list(llm.stream("stream me", params))
    assert "".join(pieces) == llm.generate("stream me", params)[0].text
    gen = llm.stream("stream me", dsv4.SamplingParams(max_tokens=50, ignore_eos=True))
    next(gen, None)
    gen.close()
    assert not llm.engine.has_unfinished() and llm.engine.cache.pages.num_used == 0


def test_unknown_engine_options_are_rejected(tiny_ckpt):
    with pytest.raises(TypeError, match="unknown engine options"):
        dsv4.LLM(str(tiny_ckpt), max_num_seq=4)


def fake_hub(root, repo, files_from):
    """A Hugging Face cache holding one snapshot of `repo` (what snapshot_download leaves behind)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files_from, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_hub_ids_resolve_through_huggingface_hub(tmp_path, tiny_ckpt, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fake_hub(tmp_path, "someone/tiny-v4", tiny_ckpt)
    llm = dsv4.LLM("someone/tiny-v4", download_dir=str(tmp_path), num_pages=8, page_size=128)
    assert llm.path.parent.parent.name == "models--someone--tiny-v4"
    assert len(llm.generate([[0, 1, 2]], dsv4.SamplingParams(max_tokens=2))[0].outputs) == 1
    with pytest.raises(CheckpointError, match="could not download"):
        dsv4.LLM("someone/missing", download_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="not a Hugging Face Hub id"):
        dsv4.LLM("no/such/dir")


def test_chat_command_in_a_pseudo_terminal(builtin_ckpt):
    """Two turns, /clear, then Ctrl-D: the loop answers each turn and exits cleanly."""
    primary, secondary = os.openpty()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dsv4", "chat", "--model", str(builtin_ckpt), "--max-tokens", "4",
                             "--seed", "1"], stdin=secondary, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    out = b""

    def read_until(marker: bytes, timeout: float = 120) -> None:
        nonlocal out
        end = time.monotonic() + timeout
        while marker not in out:
            assert time.monotonic() < end, f"timed out waiting for {marker!r}; got {out[-500:]!r}"
            if select.select([primary], [], [], 0.5)[0]:
                out += os.read(primary, 4096)

    try:
        read_until(b"> ")
        for line in (b"hello\n", b"/clear\n", b"again\n"):
            out = b""
            os.write(primary, line)
            read_until(b"> ")
        os.write(primary, b"\x04")                     # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(primary)
