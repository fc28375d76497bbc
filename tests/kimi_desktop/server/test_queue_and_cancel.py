"""A client that goes away cancels its generation (running or waiting); beyond --max-queue waiting
requests the server answers 503 with Retry-After. On the scripted engine, slowed per token."""

from __future__ import annotations

import json
import threading
import time

import pytest

from kimi_desktop.server import LocalServer, create_app

from .helpers import KEY, open_stream, raw, read_until, sse_events, wait_until

CHAT = "/v1/chat/completions"
LONG = "<think></think>" + " a" * 400 + "<|im_end|>"     # 400 tokens of content: slow enough to interrupt
BODY = {"model": "m", "messages": [{"role": "user", "content": "go"}], "temperature": 0}
AUTH = {"Authorization": f"Bearer {KEY}"}


def idle(engine) -> bool:
    return not engine.stats()["busy"] and engine.waiting() == 0


def test_disconnect_mid_stream_cancels_the_generation(scripted, scripted_engine, script):
    script(LONG, delay=0.01)
    sess = scripted_engine.session
    s = open_stream(scripted, CHAT, {**BODY, "stream": True}, KEY)
    got = read_until(s, b'"content":" a')                 # a few tokens have streamed
    assert b"200 OK" in got
    s.close()
    at_close = sess.feeds
    assert wait_until(lambda: idle(scripted_engine), 5)
    after = sess.feeds - at_close
    assert after < 50                                    # stopped long before the 400 tokens
    assert scripted_engine.stats()["last_completion_tokens"] < 100


def test_disconnect_while_waiting_for_a_plain_answer_cancels_it(scripted, scripted_engine, script):
    script(LONG, delay=0.01)
    try:
        raw(scripted, "POST", CHAT, BODY, AUTH, timeout=0.3)
    except TimeoutError:
        pass
    else:
        raise AssertionError("the answer came before the timeout: the test did not disconnect")
    assert wait_until(lambda: idle(scripted_engine), 5)
    assert scripted_engine.stats()["last_completion_tokens"] < 300


def test_queue_limit_fifo_and_a_waiting_client_that_leaves(scripted, scripted_engine, script):
    script(LONG, delay=0.01)
    running = open_stream(scripted, CHAT, {**BODY, "stream": True}, KEY)
    read_until(running, b'"content":" a')
    waiting = open_stream(scripted, CHAT, {**BODY, "stream": True}, KEY)        # max_queue=1: may wait
    assert wait_until(lambda: scripted_engine.waiting() == 1)
    status, headers, body = raw(scripted, "POST", CHAT, BODY, AUTH)
    assert status == 503 and headers["retry-after"].isdigit()
    assert json.loads(body)["error"]["code"] == "queue_full"
    waiting.close()                                      # the waiting client leaves: so does its request
    assert wait_until(lambda: scripted_engine.waiting() == 0)
    assert scripted_engine.stats()["busy"]               # ... and the running one goes on
    # now one may wait again; it is served after the running one, which then ends by disconnect
    script(LONG, delay=0.01)
    result = {}
    th = threading.Thread(target=lambda: result.update(r=raw(scripted, "POST", CHAT, {**BODY, "max_tokens": 3}, AUTH)))
    th.start()
    assert wait_until(lambda: scripted_engine.waiting() == 1)
    running.close()
    th.join(30)
    status, _, body = result["r"]
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] == "length"
    assert wait_until(lambda: idle(scripted_engine))


def test_an_engine_failure_is_an_error_object_and_the_server_goes_on(scripted, scripted_engine, script, monkeypatch):
    def broken(ids, all_logits=False, **kw):
        raise RuntimeError("disk on fire")
    script("<think></think>fine<|im_end|>")
    monkeypatch.setattr(scripted_engine.session, "feed", broken)
    status, _, body = raw(scripted, "POST", CHAT, BODY, AUTH)
    err = json.loads(body)["error"]
    assert status == 500 and err["code"] == "internal_error" and "RuntimeError" in err["message"]
    status, _, body = raw(scripted, "POST", CHAT, {**BODY, "stream": True}, AUTH)
    events = [json.loads(b[6:]) for b in body.decode().split("\n\n") if b.startswith("data: {")]
    assert status == 200 and "disk on fire" in events[-1]["error"]["message"]
    monkeypatch.undo()
    status, _, body = raw(scripted, "POST", CHAT, BODY, AUTH)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "fine"


@pytest.fixture(scope="module")
def roomy(scripted_engine):
    """The scripted engine behind a server that lets 8 requests wait."""
    s = LocalServer(create_app(scripted_engine, "scripted", api_key=KEY, max_queue=8), port=0, logs=False)
    s.start_in_thread()
    yield s
    s.stop()


def test_eight_concurrent_streams_finish_in_fifo_order(roomy, scripted_engine, script):
    script("<think></think>" + " a" * 20 + "<|im_end|>", delay=0.01)    # ~0.25 s each: they overlap
    socks, done, bodies = [], {}, {}

    def read(i, s):
        data = read_until(s, b"data: [DONE]")
        done[i] = time.monotonic()
        bodies[i] = data
        s.close()

    threads = []
    for i in range(8):
        s = open_stream(roomy, CHAT, {**BODY, "stream": True}, KEY)
        assert wait_until(lambda n=i + 1: scripted_engine.waiting() + scripted_engine.stats()["busy"] == n)
        socks.append(s)                                  # queued: the start order is the queue order
        threads.append(threading.Thread(target=read, args=(i, s)))
        threads[-1].start()
    assert scripted_engine.waiting() >= 6                # they really wait on each other
    for th in threads:
        th.join(30)
    assert sorted(done, key=done.get) == list(range(8))
    for i in range(8):
        head, _, body = bodies[i].partition(b"\r\n\r\n")
        assert b"200 OK" in head
        chunks = [e for e in sse_events(_unchunk(body)) if e != "[DONE]"]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == " a" * 20
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"          # none cancelled
    assert wait_until(lambda: idle(scripted_engine))


def _unchunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's payload."""
    out, rest = b"", body
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16) if size.strip() else 0
        if n == 0:
            break
        out, rest = out + rest[:n], rest[n + 2:]
    return out


def test_a_disconnect_frees_the_engine_within_one_token(scripted, scripted_engine, script, monkeypatch):
    """Measured: forward passes after the server sees the client leave (stream.cancel()); printed: the
    time from the client's close() to an idle engine."""
    script(LONG, delay=0.01)
    sess = scripted_engine.session
    seen: dict = {}
    chat = scripted_engine.chat

    def watched_chat(*a, **kw):
        stream = chat(*a, **kw)
        cancel = stream.cancel

        def noted_cancel():
            seen.setdefault("feeds", sess.feeds)
            seen.setdefault("at", time.monotonic())
            cancel()
        stream.cancel = noted_cancel
        return stream
    monkeypatch.setattr(scripted_engine, "chat", watched_chat)
    s = open_stream(scripted, CHAT, {**BODY, "stream": True}, KEY)
    got = read_until(s, b'"content":" a')
    assert b"200 OK" in got and b"[DONE]" not in got
    t_close = time.monotonic()
    s.close()
    assert wait_until(lambda: idle(scripted_engine), 5)
    t_idle = time.monotonic()
    assert "feeds" in seen, "the server never cancelled the stream"
    extra = sess.feeds - seen["feeds"]
    assert extra <= 1                                    # at most the forward pass in flight
    print(f"\ndisconnect: {extra} forward pass(es) after the cancel; close() -> cancel "
          f"{(seen['at'] - t_close) * 1e3:.1f} ms, close() -> idle engine {(t_idle - t_close) * 1e3:.1f} ms "
          f"(0.01 s per token)")
