"""OpenAI-style errors: every failure leaves the server as `{"error": {"message", "type", "param", "code"}}`.

Status codes: 400 for anything wrong with the request body (malformed JSON, wrong types, unknown or unsupported
parameters, values out of range, a prompt that does not fit the context — OpenAI answers all of these with 400),
404 for an unknown model or route, 405 for a wrong method, 503 when the engine has stopped. A 500 means a bug.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dsv4.serve")

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = INVALID_REQUEST):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _loc_param(loc: tuple) -> str | None:
    """`("body", "messages", 0, "user", "content", "str")` -> `messages[0].content` (the body itself -> None)."""
    out, prev = "", None
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_branch(part, prev):
            out += ("." if out else "") + part
        prev = part
    return out or None


_ROLES = {"system", "developer", "user", "assistant", "tool"}   # the tags of the messages' discriminated union


def _is_union_branch(part: str, prev) -> bool:
    """pydantic names the union branch it tried inside the location: a type (`str`, `list[int]`,
    `constrained-str`, `literal['a']`, a model class) or, after a list index, a message role."""
    if isinstance(prev, int) and part in _ROLES:
        return True
    return part in ("str", "int", "float", "bool") or any(c in part for c in "[-'") or part[:1].isupper()


_CODES = {"extra_forbidden": "unsupported_parameter", "missing": "missing_required_parameter",
          "json_invalid": "invalid_json"}


def validation_error(exc: RequestValidationError, content_type: str = "application/json") -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    loc = tuple(first.get("loc", ()))
    param = _loc_param(loc)
    kind = first.get("type", "")
    if kind == "json_invalid":
        param = None                    # the location is a character offset, not a field
        msg = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    elif loc == ("body",) and "json" not in content_type:
        msg = f"the request body must be a JSON object sent as Content-Type: application/json, got {content_type!r}"
    elif loc == ("body",):
        msg = "the request body must be a JSON object"
    elif kind == "extra_forbidden":
        msg = f"unsupported parameter: {param!r}"
    else:
        # A value that fits no branch of a union gives one error per branch, all at the same param.
        same = list(dict.fromkeys(e["msg"] for e in errors if _loc_param(tuple(e.get("loc", ()))) == param))
        msg = same[0] if len(same) == 1 else "it matches none of the allowed forms: " + "; ".join(same[:4])
        msg = f"{param}: {msg}" if param else msg
        errors = [e for e in errors if _loc_param(tuple(e.get("loc", ()))) != param]
        if errors:
            msg += f" (and {len(errors)} more problem{'s' if len(errors) > 1 else ''})"
    code = _CODES.get(kind, "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value")
    return APIError(msg, 400, param, code)


def error_response(body: dict, status: int, headers=None) -> Response:
    # ASCII JSON: a message quoting a client's string with a lone surrogate must still render (UTF-8 cannot).
    return Response(json.dumps(body), status, headers=headers, media_type="application/json")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc.body(), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = validation_error(exc, request.headers.get("content-type", ""))
        return error_response(err.body(), err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = INVALID_REQUEST if exc.status_code < 500 else "server_error"
        return error_response(error_body(str(exc.detail), kind, None, code), exc.status_code,
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception):
        log.exception("internal error")
        return error_response(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", None,
                                         "internal_error"), 500)
