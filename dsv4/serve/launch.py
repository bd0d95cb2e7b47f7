"""Wiring for `dsv4 serve`: an `LLM` (model, tokenizer, engine) -> the app -> uvicorn."""

from __future__ import annotations

from fastapi import FastAPI

from dsv4.serve.app import create_app
from dsv4.serve.async_engine import AsyncEngine
from dsv4.serve.metrics import Metrics
from dsv4.serve.prepare import ModelInfo


def build_app(llm, served_model_name: str, api_key: str | None = None) -> FastAPI:
    """The app serving `llm` (a `dsv4.LLM`) under `served_model_name`; the engine thread runs while the app does.
    With `api_key`, /v1/* requires `Authorization: Bearer api_key`."""
    cfg = llm.model.cfg
    info = ModelInfo(served_model_name, llm.engine.max_model_len, cfg.vocab_size, cfg.bos_token_id)
    metrics = Metrics()
    return create_app(AsyncEngine(llm.engine, metrics), llm.tokenizer, info, metrics, api_key)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    # One process, one engine: uvicorn workers would each load the model.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
