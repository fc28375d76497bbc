"""The guard in front of every route: Host check (DNS rebinding), bearer key, body size and type.

A pure ASGI middleware (no BaseHTTPMiddleware, so streamed answers and disconnects pass through
untouched). Order of checks: Host, key, then the body (JSON only), which is read whole (up to the limit) before
the app sees it, so the size limit holds for chunked uploads too. Neither the key nor a body is ever
logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import json

from .errors import error_body

LOOPBACK_NAMES = ("localhost",)
OPEN_PATHS = ("/health",)          # status probes need no key (as llama-server); the Host check still holds


def is_loopback(host: str) -> bool:
    """True for localhost and for addresses in 127.0.0.0/8 or ::1 (brackets allowed)."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h in LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "[::1]"."""
    h = header.strip()
    if h.startswith("["):
        end = h.find("]")
        return h[:end + 1] if end > 0 else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class Guard:
    """ASGI middleware. api_key None: no key needed. check_host: only loopback Host names pass
    (on when the server binds a loopback address)."""

    def __init__(self, app, api_key: str | None = None, check_host: bool = True, max_body_bytes: int = 32 << 20):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.check_host = check_host
        self.max_body = int(max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        if self.check_host:
            host = headers.get("host")
            if host is None or not is_loopback(host_name(host)):
                shown = "none" if host is None else repr(host[:100])
                return await _reply(send, 403, f"Host header {shown} is not a loopback name: this server "
                                               f"binds a loopback address and answers only requests for "
                                               f"localhost (DNS-rebinding guard)", code="host_not_allowed")
        if self.api_key is not None and scope.get("path") not in OPEN_PATHS:
            if not self._key_ok(headers):
                return await _reply(send, 401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                                    code="invalid_api_key", extra=[(b"www-authenticate", b"Bearer")])
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            # JSON only, and said so: a web page can POST text/plain, a form or a typeless blob to a
            # loopback port without a CORS preflight, but not application/json
            ctype = headers.get("content-type")
            mime = (ctype or "").split(";", 1)[0].strip().lower()
            if mime != "application/json" and not mime.endswith("+json"):
                got = "none" if ctype is None else repr(ctype[:80])
                return await _reply(send, 415, f"Content-Type must be application/json, got {got} (curl: "
                                               f"-H 'Content-Type: application/json')", code="unsupported_media_type")
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                return await _too_large(send, self.max_body)
            body, ok = await _read_body(receive, self.max_body)
            if not ok:
                return await _too_large(send, self.max_body)
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

    def _key_ok(self, headers: dict) -> bool:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return bool(given) and hmac.compare_digest(given.encode("latin-1"), self.api_key)


async def _read_body(receive, limit: int) -> tuple[bytes, bool]:
    parts, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return b"", True
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", False
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts), True


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()              # then the real channel: disconnects reach the app
    return replay


async def _too_large(send, limit: int):
    return await _reply(send, 413, f"the request body is larger than the server's limit of "
                                   f"{limit / (1 << 20):g} MiB (--max-body-mb)", code="request_too_large")


async def _reply(send, status: int, message: str, param: str | None = None, code: str | None = None,
                 extra: list | None = None):
    data = json.dumps(error_body(status, message, param, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": data})
