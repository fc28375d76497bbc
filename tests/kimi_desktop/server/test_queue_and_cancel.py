"""A client that goes away cancels its generation (running or waiting); beyond --max-queue waiting
requests the server answers 503 with Retry-After. On the scripted engine, slowed per token."""

from __future__ import annotations

import json
import socket
import threading

from .helpers import KEY, open_stream, raw, read_until, wait_until

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
    except (socket.timeout, TimeoutError):
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
    def broken(ids, all_logits=False):
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
