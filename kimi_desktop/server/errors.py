"""Errors in each API's own shape, chosen by the request's path:

    OpenAI (every path but /v1/messages...):  {"error": {"message", "type", "param", "code"}}
    Anthropic (/v1/messages, /v1/messages/*):  {"type": "error", "error": {"type", "message"}}

Every failure the server answers (bad JSON, a schema violation, a request the engine refuses, a
missing key, a full queue, no such route) goes through `error_response` / `body_for` (the Guard's
replies too), so clients see one shape per API that names the offending field: in `param` for
OpenAI, at the head of the message for Anthropic (which has no `param`). Anthropic's types:
invalid_request_error 400 / 405 / 415, authentication_error 401, permission_error 403,
not_found_error 404, request_too_large 413, rate_limit_error 429, api_error 500,
overloaded_error 503 (a full queue keeps 503 + Retry-After; Anthropic's own 529 is not used).
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kimi_desktop.chat import ChatRequestError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 422: "invalid_request_error", 503: "server_overloaded"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                   415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                   500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}
ANTHROPIC_PREFIX = "/v1/messages"


class APIError(Exception):
    """An answer other than 2xx; raised anywhere in a route, rendered by the app's handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def anthropic_error_body(status: int, message: str, param: str | None = None) -> dict:
    """Anthropic's error object; the field, having no slot of its own, leads the message."""
    if param and param not in message:
        message = f"{param}: {message}"
    return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


def is_anthropic(path: str | None) -> bool:
    return bool(path) and (path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"))


def body_for(path: str | None, status: int, message: str, param: str | None = None,
             code: str | None = None) -> dict:
    """The error body in the shape of the API that `path` belongs to."""
    if is_anthropic(path):
        return anthropic_error_body(status, message, param)
    return error_body(status, message, param, code)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None, path: str | None = None) -> JSONResponse:
    """path: the request's path (picks the API's shape); None: OpenAI's."""
    return JSONResponse(body_for(path, status, message, param, code), status_code=status,
                        headers=dict(headers or {}))


def from_chat_error(e: ChatRequestError) -> APIError:
    """The engine's refusal as a 400; a prompt past the context gets OpenAI's code for it."""
    msg = str(e)
    code = "context_length_exceeded" if "context holds" in msg else None
    return APIError(400, msg, e.param, code)


_UNKNOWN = object()


def field_path(loc: tuple, body=_UNKNOWN) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role", without pydantic's union-member labels
    (type names like "str" or "list[...]", model class names, the tag of a tagged union). body: the
    request's JSON, to tell a discriminated union's tag (which pydantic puts in `loc`) from a field."""
    out, tag_next, node = "", False, body
    parts = loc[1:] if loc and loc[0] == "body" else loc
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and -len(node) <= part < len(node) else _UNKNOWN
            continue
        if tag_next:                        # after "tagged-union[...]" and its index comes the tag
            tag_next = False
            continue
        if "tagged-union[" in part:
            tag_next = True
        if part in ("str", "int", "float", "bool", "dict") or "[" in part or part[:1].isupper() \
                or part.startswith(("function-", "literal")):
            continue
        if isinstance(node, dict) and part not in node and node.get("type") == part and i + 1 < len(parts):
            continue                        # {"type": "enabled", ...}: the member's tag, not a field
        out += f".{part}" if out else part
        node = node.get(part, _UNKNOWN) if isinstance(node, dict) else _UNKNOWN
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    errs = exc.errors()
    if not errs:
        return APIError(400, "the request body is not valid")
    # of a union's failed branches, the one that got furthest names the field best
    body = getattr(exc, "body", _UNKNOWN)
    first = max(errs, key=lambda e: len(field_path(tuple(e.get("loc", ())), body)))
    if first.get("type") == "json_invalid" or errs[0].get("type") == "json_invalid":
        first = errs[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail} at character "
                             f"{first['loc'][-1]})", None, "invalid_json")
    loc = tuple(first.get("loc", ()))
    param = field_path(loc, body) or None
    if kind == "missing" and len(loc) <= 1:
        return APIError(400, "the request needs a JSON object body", None)
    if kind in ("model_attributes_type", "dict_type") and len(loc) <= 1:
        return APIError(400, "the request body must be a JSON object", None)
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return APIError(400, f"{param or 'body'}: {msg}{more}", param)


def install_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers, request.url.path)

    @app.exception_handler(ChatRequestError)
    async def _chat_error(request: Request, exc: ChatRequestError):
        e = from_chat_error(exc)
        return error_response(e.status, e.message, e.param, e.code, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        e = validation_error(exc)
        return error_response(e.status, e.message, e.param, e.code, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(status, str(exc.detail))
        if status == 400 and "parsing the body" in str(exc.detail):
            msg = "the request body is not valid JSON in UTF-8"
        return error_response(status, msg, None, None, getattr(exc, "headers", None), request.url.path)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):      # never a bare 500 page
        return error_response(500, f"internal error: {type(exc).__name__}", None, "internal_error",
                              path=request.url.path)
