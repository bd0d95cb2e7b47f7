"""The OpenAI-compatible server (`dsv4 serve`): FastAPI routes over one background engine thread.

`protocol` (request models) -> `prepare` (engine inputs) -> `async_engine` (the step loop) -> `chat` /
`completions` (responses, streamed or not); `errors`, `metrics` and `responses` serve them all.
"""

from dsv4.serve.launch import build_app, serve

__all__ = ["build_app", "serve"]
