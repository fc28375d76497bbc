"""What the server tests share: the scripted session, the key, and raw HTTP / SSE helpers."""

from __future__ import annotations

import http.client
import json
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kimi_desktop.server.runner import LocalServer

KEY = "test-key-9f8e7d"


class ScriptedSession:
    """The engine's session interface; each request's k-th forward pass (counted from the truncate
    that starts it) puts all the mass on script[k]. `delay` slows every feed (queue and cancel tests).
    `jumps` {token: ids}: feeding that token alone makes `ids` the script from there (so a token the
    engine forces, e.g. </think>, is answered the way the script goes on after it)."""

    def __init__(self, vocab: int):
        self.vocab, self.tokens, self.script, self.delay = vocab, [], [], 0.0
        self.pos, self.feeds = 0, 0
        self.jumps: dict[int, list[int]] = {}

    def __len__(self):
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        self.pos = 0

    def feed(self, ids, all_logits=False, progress=None, cancelled=None):
        self.feeds += 1
        if self.delay:
            time.sleep(self.delay)
        self.tokens.extend(int(i) for i in ids)
        if len(ids) == 1 and int(ids[0]) in self.jumps:
            self.script, self.pos = self.jumps[int(ids[0])], 0
        out = np.full(self.vocab, -30.0, dtype=np.float32)
        out[self.script[min(self.pos, len(self.script) - 1)]] = 30.0
        self.pos += 1
        return out


def openai_client(srv: LocalServer, key: str = "unused"):
    import openai
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=key, max_retries=0, timeout=30)


def raw(srv: LocalServer, method: str, path: str, body: bytes | str | dict | None = None,
        headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    """One request with full control of the bytes and headers: (status, headers, body)."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    h = {"Content-Type": "application/json"} if body is not None else {}
    h.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host="Host" in h, skip_accept_encoding=True)
        for k, v in h.items():
            if v is not None:
                conn.putheader(k, v)
        if body is not None and "Content-Length" not in h and "Transfer-Encoding" not in h:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def sse_events(data: bytes) -> list:
    """The JSON objects of an SSE body, and "[DONE]" where it came."""
    out = []
    for block in data.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def wait_until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()



def open_stream(srv, path: str, body: dict, key: str | None = None):
    """Send a request on a bare socket (the test reads and closes it when it likes)."""
    import socket
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (path.encode(), auth, len(data), data))
    return s


def read_until(sock, marker: bytes, limit: int = 1 << 20) -> bytes:
    got = b""
    while marker not in got and len(got) < limit:
        part = sock.recv(65536)
        if not part:
            break
        got += part
    return got
