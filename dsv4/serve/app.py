"""The FastAPI app: OpenAI routes, /health and /metrics over one `AsyncEngine`.

Disconnects: every generating request has a watcher task that waits for the client's `http.disconnect` and then
aborts the request's engine work (streamed or not), so an abandoned request frees its slot and pages before the
engine's next step instead of running to `max_tokens`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dsv4.engine.engine import RequestError
from dsv4.serve import chat, completions, prepare
from dsv4.serve.async_engine import AsyncEngine, EngineDeadError, Subscription
from dsv4.serve.auth import APIKeyMiddleware
from dsv4.serve.errors import APIError, install_handlers
from dsv4.serve.metrics import Metrics
from dsv4.serve.prepare import ModelInfo
from dsv4.serve.protocol import ChatCompletionRequest, CompletionRequest

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(engine: AsyncEngine, tokenizer, info: ModelInfo, metrics: Metrics | None = None,
               api_key: str | None = None) -> FastAPI:
    """The app; its lifespan starts the engine thread and stops it (aborting what runs) at shutdown.
    With `api_key`, every /v1/* route requires `Authorization: Bearer api_key` (auth.py)."""
    metrics = metrics or engine.metrics or Metrics()
    structured = getattr(engine.engine, "structured", None)
    grammars = structured.grammars if structured is not None else None   # compiled in prepare's worker thread
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="dsv4", summary="OpenAI-compatible API for DeepSeek-V4", lifespan=lifespan)
    install_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "error": engine.dead_reason(), **engine.stats}, 503)
        return {"status": "ok", **engine.stats}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": info.name, "object": "model", "created": created, "owned_by": "dsv4",
                "max_model_len": info.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != info.name:
            raise APIError(f"the model {model!r} does not exist", 404, "model", "model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, request: Request):
        # Tokenising a long prompt takes a while: off the event loop.
        prompts, params = await asyncio.to_thread(prepare.completion_inputs, req, tokenizer, info, grammars)
        sub = await _submit(engine, list(zip(prompts, params, strict=True)), "cmpl")
        lens, n = [len(p) for p in prompts], params[0].n
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(completions.stream(sub, lens, n, tokenizer, info.name, req.logprobs, include), sub,
                           request)
        return await _complete(completions.complete(sub, lens, n, tokenizer, info.name, req.logprobs), sub, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, request: Request):
        inputs = await asyncio.to_thread(prepare.chat_inputs, req, tokenizer, info, grammars)
        sub = await _submit(engine, [(inputs.prompt_ids, inputs.params)], "chatcmpl")
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(chat.stream_chat(sub, inputs, tokenizer, info.name, top, include), sub, request)
        return await _complete(chat.complete_chat(sub, inputs, tokenizer, info.name, top), sub, request)

    return app


async def _submit(engine: AsyncEngine, requests, prefix: str) -> Subscription:
    try:
        return await engine.submit(requests, prefix)
    except RequestError as e:
        raise APIError(str(e), 400, None, "invalid_value") from e
    except EngineDeadError as e:
        raise APIError(str(e), 503, None, "engine_dead", "server_error") from e


async def _abort_on_disconnect(request: Request, sub: Subscription) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    sub.abort()


async def _complete(coro, sub: Subscription, request: Request) -> JSONResponse:
    watcher = asyncio.create_task(_abort_on_disconnect(request, sub))
    try:
        return JSONResponse(await coro)
    except EngineDeadError as e:
        raise APIError(str(e), 503, None, "engine_dead", "server_error") from e
    finally:
        watcher.cancel()
        sub.abort()


def _stream(gen: AsyncIterator[str], sub: Subscription, request: Request) -> StreamingResponse:
    async def body():
        watcher = asyncio.create_task(_abort_on_disconnect(request, sub))
        try:
            async for piece in gen:
                yield piece
        finally:
            watcher.cancel()
            sub.abort()
            await gen.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
