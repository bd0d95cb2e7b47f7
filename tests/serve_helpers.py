"""A live server for tests: uvicorn in a background thread on 127.0.0.1 (a port the OS picks), stopped on exit.

The socket is bound here and handed to uvicorn, so the port is known before the server starts and no other
process can take it in between.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn


@contextlib.contextmanager
def live_server(app, startup_timeout: float = 30.0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # NOTE: keep-alive outlasts any pause of a test between requests (hypothesis can take seconds to draw a body):
    # a server closing an idle pooled connection just as the client reuses it is a connection reset, not a bug.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on",
                            timeout_keep_alive=120)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"


@contextlib.contextmanager
def serve_command(*args: str, env: dict | None = None, startup_timeout: float = 180.0):
    """`dsv4 serve ARGS --port P` as a subprocess (its own session) on a free loopback port: yields (process,
    base url) once /health answers; the whole process group is killed if it still runs at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv4", "serve", *args, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + startup_timeout
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class ScriptedRunner:
    """Stands in for the engine's `ModelRunner`: every sequence that reaches its last token "samples" the next
    token of `script` (then EOS). Scheduler, pages, detokenizer, stop rules and the whole server are real; only
    the model's choice is scripted, because the tiny models are untrained and emit noise."""

    speculator = None                   # as ModelRunner without speculative decoding

    def __init__(self, eos_id: int):
        self.script: list[int] = []
        self.eos_id = eos_id
        self.step_seconds = 0.0         # pretend each step computes for this long
        self.fail: Exception | None = None   # raised by the next step (a broken model)

    def resume(self, seq) -> None:
        """A prefix-cache hit: nothing to restore, nothing is computed."""

    def run(self, entries):
        from dsv4.engine.runner import Sampled

        if entries and self.fail is not None:
            raise self.fail
        if entries and self.step_seconds:
            time.sleep(self.step_seconds)
        out = {}
        for seq, n in entries:
            if seq.num_computed + n == seq.num_tokens:
                k = len(seq.output_ids)
                token = self.script[k] if k < len(self.script) else self.eos_id
                out[seq.seq_id] = Sampled(token, -0.25, [(token, -0.25)])
        return out


def scripted_engine(model, tokenizer, **options):
    from dsv4.engine.config import EngineConfig
    from dsv4.engine.engine import Engine

    options = {"max_num_seqs": 8, "page_size": 128, "num_pages": 32, "max_model_len": 1024} | options
    engine = Engine(model, tokenizer, EngineConfig(**options))
    engine.runner = ScriptedRunner(model.cfg.eos_token_id)
    return engine


def token_ids(tokenizer, pieces) -> list[int]:
    """Ids whose detokenised text is "".join(pieces), each piece encoded on its own: a marker cut between two
    pieces is cut between two tokens."""
    ids = [t for p in pieces for t in tokenizer.encode(p, add_special_tokens=False).ids]
    assert tokenizer.decode(ids, skip_special_tokens=False) == "".join(pieces)
    return ids


def make_app(engine, tokenizer, name: str = "m", vocab_size: int | None = None, api_key: str | None = None):
    from dsv4.serve.app import create_app
    from dsv4.serve.async_engine import AsyncEngine
    from dsv4.serve.metrics import Metrics
    from dsv4.serve.prepare import ModelInfo

    cfg = engine.model.cfg
    info = ModelInfo(name, engine.max_model_len, vocab_size or cfg.vocab_size, cfg.bos_token_id)
    metrics = Metrics()
    async_engine = AsyncEngine(engine, metrics)
    return create_app(async_engine, tokenizer, info, metrics, api_key), async_engine
