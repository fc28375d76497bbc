"""The guards in front of every route: Host check (DNS rebinding), CORS, bearer key, body size and type.

Pure ASGI middlewares (no BaseHTTPMiddleware, so streamed answers and disconnects pass through
untouched), outermost first:

    HostGuard   the Host header must name this server (`accepted_hosts`), else 403
    CORS        only with --cors-origin: Starlette's CORSMiddleware for exactly those origins; it
                answers preflights itself (OPTIONS carries no key), so they never reach the key check
    Guard       bearer key (401), then the body: JSON only (415), read whole up to the limit (413)
                before the app sees it, so the limit holds for chunked uploads too

Which Host names pass (`accepted_hosts(bind, allowed)`): always the loopback names (localhost,
*.localhost, 127.0.0.0/8, ::1) and every --allowed-host name; for a non-loopback bind also that
address; for a wildcard bind (0.0.0.0, ::) also every address of this machine's interfaces and its
host name, read at start (a request for an IP literal cannot come from DNS rebinding, whose pages
carry the attacker's own name). Ports are ignored. Replies are in the shape of the request's API
(errors.body_for). Neither the key nor a body is ever logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket

from .errors import body_for

LOOPBACK_NAMES = ("localhost",)
WILDCARDS = ("0.0.0.0", "::", "")
OPEN_PATHS = ("/health",)          # status probes need no key (as llama-server); the Host check still holds


def is_loopback(host: str) -> bool:
    """True for localhost and for addresses in 127.0.0.0/8 or ::1 (brackets allowed)."""
    h = normal_host(host)
    if h in LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def normal_host(name: str) -> str:
    """A host name or address as compared: lower case, no brackets, no trailing dot, no IPv6 zone;
    addresses in their canonical spelling."""
    h = name.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.split("%", 1)[0] if ":" in h else h
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return h


def host_name(header: str) -> str:
    """The name part of a Host header: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "[::1]"."""
    h = header.strip()
    if h.startswith("["):
        end = h.find("]")
        return h[:end + 1] if end > 0 else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def machine_addresses() -> set[str]:
    """This machine's interface addresses and host name (what a wildcard bind is reachable as)."""
    out = {normal_host(socket.gethostname())}
    try:
        import psutil
        for addrs in psutil.net_if_addrs().values():
            out.update(normal_host(a.address) for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    except Exception:                       # noqa: BLE001 - psutil missing / denied: the resolver's view
        try:
            out.update(normal_host(i[4][0]) for i in socket.getaddrinfo(socket.gethostname(), None))
        except OSError:
            pass
    return out


def accepted_hosts(bind: str, allowed=()) -> frozenset[str]:
    """The Host names (besides loopback ones) a server bound to `bind` answers; see the module doc."""
    names = {normal_host(a) for a in allowed}
    if normal_host(bind) in WILDCARDS or bind.strip() in WILDCARDS:
        names |= machine_addresses()
    elif not is_loopback(bind):
        names.add(normal_host(bind))
    return frozenset(n for n in names if n and not is_loopback(n))


class HostGuard:
    """ASGI middleware: 403 unless the Host header is a loopback name or one of `accepted`."""

    def __init__(self, app, accepted=frozenset()):
        self.app = app
        self.accepted = frozenset(normal_host(a) for a in accepted)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = header(scope, b"host")
        if host is None or not self.allows(host):
            shown = "none" if host is None else repr(host[:100])
            hint = (f"start the server with --allowed-host {normal_host(host_name(host))[:100]} to accept it"
                    if host else "send a Host header")
            known = ", ".join(["localhost", "127.0.0.1", "::1", *sorted(self.accepted)][:8])
            return await _reply(send, scope, 403, f"Host header {shown} is not a name this server answers to "
                                                  f"({known}): {hint} (DNS-rebinding guard)",
                                code="host_not_allowed")
        return await self.app(scope, receive, send)

    def allows(self, host: str) -> bool:
        name = host_name(host)
        return is_loopback(name) or normal_host(name) in self.accepted


def header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class Guard:
    """ASGI middleware. api_key None: no key needed."""

    def __init__(self, app, api_key: str | None = None, max_body_bytes: int = 32 << 20):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = int(max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        if self.api_key is not None and scope.get("path") not in OPEN_PATHS:
            if not self._key_ok(headers):
                return await _reply(send, scope, 401, "a valid API key is needed: send 'Authorization: Bearer KEY' "
                                                      "or 'x-api-key: KEY'", code="invalid_api_key",
                                    extra=[(b"www-authenticate", b"Bearer")])
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            # JSON only, and said so: a web page can POST text/plain, a form or a typeless blob to a
            # loopback port without a CORS preflight, but not application/json
            ctype = headers.get("content-type")
            mime = (ctype or "").split(";", 1)[0].strip().lower()
            if mime != "application/json" and not mime.endswith("+json"):
                got = "none" if ctype is None else repr(ctype[:80])
                return await _reply(send, scope, 415, f"Content-Type must be application/json, got {got} (curl: "
                                                      f"-H 'Content-Type: application/json')",
                                    code="unsupported_media_type")
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                return await _too_large(send, scope, self.max_body)
            body, ok = await _read_body(receive, self.max_body)
            if not ok:
                return await _too_large(send, scope, self.max_body)
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

    def _key_ok(self, headers: dict) -> bool:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return bool(given) and hmac.compare_digest(given.encode("latin-1"), self.api_key)


def cors(app, origins):
    """Starlette's CORSMiddleware for exactly `origins` ("*" only when given). The key travels in a
    header, never a cookie, so credentials stay off; any request header may be sent (the SDKs add
    their own x-stainless-* / anthropic-* ones)."""
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(app, allow_origins=list(origins), allow_methods=["GET", "POST", "OPTIONS"],
                          allow_headers=["*"], expose_headers=["Retry-After"], allow_credentials=False,
                          max_age=600)


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


async def _too_large(send, scope, limit: int):
    return await _reply(send, scope, 413, f"the request body is larger than the server's limit of "
                                          f"{limit / (1 << 20):g} MiB (--max-body-mb)", code="request_too_large")


async def _reply(send, scope, status: int, message: str, param: str | None = None, code: str | None = None,
                 extra: list | None = None):
    data = json.dumps(body_for(scope.get("path"), status, message, param, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": data})
