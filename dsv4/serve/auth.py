"""API keys: with a key set, every `/v1/*` request must carry `Authorization: Bearer KEY` (else 401, OpenAI's
error body); `/health` and `/metrics` stay open for probes and scrapers.

A plain ASGI middleware rather than FastAPI's `@app.middleware("http")`: that one wraps the request's `receive`,
which the disconnect watchers in app.py read. The key is compared with `hmac.compare_digest` (constant time).
"""

from __future__ import annotations

import hmac
import ipaddress
import sys

from starlette.datastructures import Headers

from dsv4.serve.errors import error_body, error_response

ENV_VAR = "DSV4_API_KEY"


class APIKeyMiddleware:
    def __init__(self, app, api_key: str):
        if not api_key:
            raise ValueError("the API key must not be empty")
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"] + "/").startswith("/v1/") and not self._allowed(scope):
            given = Headers(scope=scope).get("authorization")
            message = ("missing API key: send the header 'Authorization: Bearer YOUR_KEY'" if not given else
                       "incorrect API key provided")
            body = error_body(message, "invalid_request_error", None, "invalid_api_key")
            await error_response(body, 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope) -> bool:
        given = Headers(scope=scope).get("authorization", "").encode("latin-1", "replace")
        return hmac.compare_digest(given, self.expected)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, api_key: str | None, out=sys.stderr) -> bool:
    """Print a warning when the server binds beyond this machine without a key; True if it did."""
    if api_key or is_loopback(host):
        return False
    print(f"warning: serving on {host} without an API key: anyone who can reach this address can use the "
          f"model. Set --api-key KEY or the {ENV_VAR} environment variable.", file=out)
    return True
