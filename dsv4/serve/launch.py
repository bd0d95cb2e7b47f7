"""Wiring for `dsv4 serve`: an `LLM` (model, tokenizer, engine) -> the app -> uvicorn."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from fastapi import FastAPI

from dsv4.checkpoint.generation import generation_defaults
from dsv4.serve.app import create_app
from dsv4.serve.async_engine import AsyncEngine
from dsv4.serve.metrics import Metrics
from dsv4.serve.prepare import ModelInfo

T = TypeVar("T")


def off_main_thread(fn: Callable[[], T]) -> T:
    """`fn()` run in a thread that ends before this returns (its exception re-raised here; Ctrl-C still stops
    the wait). Why: libgomp keeps an OpenMP worker pool for every thread that ever ran a parallel CPU op, and
    while two pools exist (the main thread's from loading the model, the engine thread's from stepping it) it
    throttles their spin-waits, so each of a CPU step's hundreds of small ops waits on a futex: 64 tokens of the
    built-in model through the openai client took 2.2 s instead of 1.0 s on 2 cores. Loading in a thread that
    ends leaves the engine thread's pool the only one (tests/test_serve_threads.py checks that mechanism)."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:       # handed to the caller, whatever it is
            box["error"] = e

    t = threading.Thread(target=run, name="dsv4-load", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["value"]


def build_app(llm, served_model_name: str, api_key: str | None = None) -> FastAPI:
    """The app serving `llm` (a `dsv4.LLM`) under `served_model_name`; the engine thread runs while the app does.
    With `api_key`, /v1/* requires `Authorization: Bearer api_key`. Sampling fields a request omits take the
    checkpoint's generation_config.json (a bad one stops the start with a ValueError naming it)."""
    cfg = llm.model.cfg
    info = ModelInfo(served_model_name, llm.engine.max_model_len, cfg.vocab_size, cfg.bos_token_id,
                     generation_defaults(llm.path))
    metrics = Metrics()
    return create_app(AsyncEngine(llm.engine, metrics), llm.tokenizer, info, metrics, api_key)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    # One process, one engine: uvicorn workers would each load the model.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
