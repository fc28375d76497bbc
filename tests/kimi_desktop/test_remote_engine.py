"""The remote engine against a fake OpenAI-compatible server on 127.0.0.1 (stdlib http.server serving
canned SSE streams). Nothing else is ever contacted."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from kimi_desktop.chat import (ChatRequestError, ContentDelta, Engine, Finish, ReasoningDelta,  # noqa: E402
                               Sampling, TokenLogprobs, ToolCallDelta, Usage)
from kimi_desktop.engines import open_engine  # noqa: E402
from kimi_desktop.engines.remote import (ChunkMapper, RemoteConnectionError, RemoteEngine,  # noqa: E402
                                         RemoteEngineError, normalize_base_url)

from tests.kimi_desktop.engine_cases import MSGS, TOOL_HISTORY, TOOLS, cancel_after  # noqa: E402
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
         "prompt_tokens_details": {"cached_tokens": 4}}


def chunk(delta=None, finish=None, usage=None, logprobs=None, no_choices=False):
    c = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake",
         "choices": [] if no_choices else [{"index": 0, "delta": delta or {}, "finish_reason": finish,
                                            "logprobs": logprobs}]}
    if usage is not None:
        c["usage"] = usage
    return c


def lp(token, logprob, top=()):
    return {"content": [{"token": token, "logprob": logprob, "bytes": None,
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in top]}]}


SCENARIOS = {
    "chat": [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "Let me "}),
        chunk({"reasoning_content": "think."}),
        chunk({"content": "Hello"}, logprobs=lp("Hello", -0.1, [("Hello", -0.1), ("Hi", -2.5)])),
        chunk({"content": " world"}, logprobs=lp(" world", -0.3, [(" world", -0.3), ("!", -1.5)])),
        chunk({}, finish="stop"),
        chunk(no_choices=True, usage=USAGE),
    ],
    "reasoning-field": [                        # newer vLLM / OpenRouter spell it "reasoning"
        chunk({"role": "assistant", "reasoning": "hmm"}),
        chunk({"content": "ok"}),
        chunk({}, finish="length", usage={"prompt_tokens": 3, "completion_tokens": 2,
                                          "cached_tokens": 1}),          # Moonshot's cached_tokens
    ],
    "tools": [
        chunk({"role": "assistant", "reasoning_content": "need tools"}),
        chunk({"tool_calls": [{"index": 0, "id": "functions.get_weather:1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "functions.add:2", "type": "function",
                               "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]}),
        chunk({}, finish="tool_calls"),
        chunk(no_choices=True, usage=USAGE),
    ],
    "tools-noid": [                             # a server that sends no id, the name in a later delta
        chunk({"tool_calls": [{"index": 3, "function": {"arguments": '{"a":'}}]}),
        chunk({"tool_calls": [{"index": 3, "function": {"name": "add", "arguments": " 1}"}}]}),
        chunk({}, finish="tool_calls"),
    ],
    "raw": [                                    # a server without reasoning / tool parsers
        chunk({"content": "<think>pondering</thi"}),
        chunk({"content": "nk>Sure.<|tool_calls_section_begin|><|tool_call_begin|>functions.add:1"}),
        chunk({"content": '<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|><|tool_calls_section_end|>'}),
        chunk({}, finish="stop"),
    ],
    "stream-error": [
        chunk({"content": "partial"}),
        {"error": {"message": "engine overloaded", "type": "server_error", "code": "overloaded"}},
    ],
    "truncated": [chunk({"content": "cut"})],   # the connection closes: no finish_reason, no [DONE]
}


class _Handler(BaseHTTPRequestHandler):
    """FakeOpenAI's requests; the model in the body picks the scenario (self.server.fake records them)."""

    def log_message(self, *a):
        pass

    def _json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": "chat", "object": "model", "created": 0, "owned_by": "fake"},
                {"id": "tools", "object": "model", "created": 0, "owned_by": "fake"}]})
        else:
            self._json(404, {"error": {"message": "no such path"}})

    def _sse(self, c):
        self.wfile.write(b"data: " + json.dumps(c).encode() + b"\n\n")
        self.wfile.flush()

    def do_POST(self):
        fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        fake.requests.append(body)
        fake.headers.append({k.lower(): v for k, v in self.headers.items()})
        if self.path != "/v1/chat/completions":
            return self._json(404, {"error": {"message": "no such path"}})
        model = body.get("model")
        if model == "error400":
            return self._json(400, {"error": {"message": "temperature too high", "param": "temperature",
                                              "type": "invalid_request_error", "code": "bad_value"}})
        if model == "error500":
            return self._json(500, {"error": {"message": "GPU fell over", "type": "server_error"}})
        if model == "sleepy":
            time.sleep(1.5)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if model == "slow":
            return self._stream_slowly(fake)
        chunks = SCENARIOS.get(model, SCENARIOS["chat"])
        for c in chunks:
            self._sse(c)
        if model != "truncated" and model != "stream-error":
            self.wfile.write(b"data: [DONE]\n\n")

    def _stream_slowly(self, fake):
        """200 words 20 ms apart; a client that leaves sets fake.slow_disconnected."""
        try:
            self._sse(chunk({"role": "assistant", "content": ""}))
            for i in range(200):
                self._sse(chunk({"content": f"w{i} "}))
                fake.slow_written += 1
                time.sleep(0.02)
            self._sse(chunk({}, finish="length"))
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:
            fake.slow_disconnected.set()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass                    # a client that left early (cancel, timeout) is expected here


class FakeOpenAI:
    """A tiny OpenAI-compatible server: the request body's `model` picks the scenario."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.slow_written = 0
        self.slow_disconnected = threading.Event()
        self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Requests go straight to 127.0.0.1, whatever proxy the environment names."""
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def server():
    s = FakeOpenAI()
    yield s
    s.close()


def remote(server, model="chat", **kw):
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 10.0)
    return RemoteEngine(server.url, api_key="test-key", model=model, **kw)


def test_event_mapping_reasoning_content_logprobs_usage(server):
    e = remote(server)
    assert isinstance(e, Engine)
    evs = list(e.chat(MSGS, sampling=Sampling(logprobs=True, top_logprobs=2)))
    assert [type(x) for x in evs] == [ReasoningDelta, ReasoningDelta, ContentDelta, TokenLogprobs, ContentDelta,
                                      TokenLogprobs, Usage, Finish]
    r = e.chat(MSGS).result()
    assert r.reasoning == "Let me think." and r.content == "Hello world"
    assert evs[3] == TokenLogprobs("Hello", -0.1, (("Hello", -0.1), ("Hi", -2.5)))
    assert r.usage == Usage(12, 5, 4) and r.finish_reason == "stop"
    st = e.stats()
    assert st["engine"] == "remote" and st["last_prompt_tokens"] == 12 and st["last_cached_tokens"] == 4
    assert st["ttft_s"] is not None and st["waiting"] == 0 and not st["busy"] and st["requests"] == 2
    for k in ("decode_tok_s", "context_used", "context_size", "resident_bytes", "expert_cache_hits"):
        assert k in st
    e.close()


def test_reasoning_field_and_moonshot_cached_tokens(server):
    e = remote(server, model="reasoning-field")
    r = e.chat(MSGS).result()
    assert r.reasoning == "hmm" and r.content == "ok"
    assert r.finish_reason == "length" and r.usage == Usage(3, 2, 1)
    e.close()


def test_tool_call_deltas(server):
    e = remote(server, model="tools")
    evs = list(e.chat(TOOL_HISTORY, tools=TOOLS, tool_choice="required"))
    tcs = [x for x in evs if isinstance(x, ToolCallDelta)]
    assert tcs[0] == ToolCallDelta(0, "functions.get_weather:1", "get_weather", "")
    assert [t.arguments_fragment for t in tcs if t.index == 0][1:] == ['{"city":', ' "Paris"}']
    assert all(t.id is None and t.name is None for t in tcs[1:] if t.index == 0)
    r = e.chat(TOOL_HISTORY, tools=TOOLS).result()
    assert r.finish_reason == "tool_calls" and r.reasoning == "need tools" and r.content == ""
    assert [(tc["id"], tc["name"]) for tc in r.tool_calls] == [("functions.get_weather:1", "get_weather"),
                                                               ("functions.add:2", "add")]
    assert [json.loads(tc["arguments"]) for tc in r.tool_calls] == [{"city": "Paris"}, {"a": 2, "b": 3}]
    assert isinstance(evs[-2], Usage) and evs[-1] == Finish("tool_calls")
    e.close()


def test_tool_call_without_id_gets_k2_id_and_waits_for_its_name(server):
    e = remote(server, model="tools-noid")
    r = e.chat(TOOL_HISTORY, tools=TOOLS).result()       # one call in the history -> IDX 1
    assert r.tool_calls == [{"id": "functions.add:1", "name": "add", "arguments": '{"a": 1}'}]
    assert r.finish_reason == "tool_calls"
    assert r.usage == Usage(0, 2, 0)                        # no usage chunk: deltas counted
    e.close()


def test_raw_k2_output_goes_through_the_parser(server):
    e = remote(server, model="raw", raw_k2_output="thinking")
    r = e.chat(MSGS, tools=TOOLS).result()
    assert r.reasoning == "pondering" and r.content == "Sure."
    assert r.tool_calls == [{"id": "functions.add:1", "name": "add", "arguments": '{"a": 1}'}]
    e.close()


def test_request_body_carries_openai_fields_and_extras_in_extra_body(server):
    e = remote(server)
    n = len(server.requests)
    samp = Sampling(temperature=0.3, top_p=0.9, max_tokens=7, stop=["END"], seed=5, presence_penalty=0.5,
                    logprobs=True, top_logprobs=2, response_format={"type": "json_object"},
                    top_k=20, min_p=0.05, repetition_penalty=1.1)
    choice = {"type": "function", "function": {"name": "add"}}
    e.chat(TOOL_HISTORY, tools=TOOLS, tool_choice=choice, sampling=samp).result()
    body = server.requests[n]
    assert body["model"] == "chat" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == TOOL_HISTORY
    for k, v in (("temperature", 0.3), ("top_p", 0.9), ("max_tokens", 7), ("stop", ["END"]), ("seed", 5),
                 ("presence_penalty", 0.5), ("logprobs", True), ("top_logprobs", 2),
                 ("response_format", {"type": "json_object"}), ("tools", TOOLS), ("tool_choice", choice),
                 ("top_k", 20), ("min_p", 0.05), ("repetition_penalty", 1.1)):
        assert body[k] == v, k
    assert server.headers[n].get("authorization") == "Bearer test-key"
    # defaults: only what was asked for
    e.chat(MSGS).result()
    body = server.requests[n + 1]
    assert body["temperature"] == 1.0 and body["top_p"] == 1.0
    for k in ("max_tokens", "stop", "seed", "logprobs", "top_logprobs", "response_format", "tools",
              "tool_choice", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        assert k not in body, k
    e.close()


def test_extras_refused_where_the_endpoint_takes_none(server):
    e = remote(server, extra_sampling=False, extra_body={"chat_template_kwargs": {"thinking": True}})
    n = len(server.requests)
    with pytest.raises(ChatRequestError) as ei:
        e.chat(MSGS, sampling=Sampling(top_k=40))
    assert ei.value.param == "top_k" and len(server.requests) == n
    e.chat(MSGS).result()
    assert server.requests[n]["chat_template_kwargs"] == {"thinking": True}
    e.close()
    assert RemoteEngine("https://api.openai.com/v1", api_key="x", model="m").extra_sampling is False


def test_reasoning_budget_and_one_tool_call_are_passed_on_or_refused(server):
    e = remote(server)
    n = len(server.requests)
    e.chat(TOOL_HISTORY, tools=TOOLS, sampling=Sampling(max_reasoning_tokens=0, parallel_tool_calls=False)).result()
    body = server.requests[n]
    assert body["thinking_token_budget"] == 0 and body["parallel_tool_calls"] is False      # vLLM's field
    e.chat(TOOL_HISTORY, tools=TOOLS).result()
    assert "thinking_token_budget" not in server.requests[n + 1] and "parallel_tool_calls" not in server.requests[n + 1]
    assert e.generation_defaults() == {}
    e.close()
    strict = remote(server, extra_sampling=False)
    with pytest.raises(ChatRequestError) as ei:
        strict.chat(MSGS, sampling=Sampling(max_reasoning_tokens=64))
    assert ei.value.param == "max_reasoning_tokens" and "reasoning budget" in str(ei.value)
    strict.close()


def test_model_from_the_models_list(server):
    e = open_engine("remote", server.url.removesuffix("/v1"), api_key="k", max_retries=0)   # /v1 appended
    assert isinstance(e, RemoteEngine) and e.base_url == server.url
    r = e.chat(MSGS).result()
    assert r.content == "Hello world" and e.model == "chat" and e.stats()["model"] == "chat"
    e.close()


def test_cancel_closes_the_http_stream(server):
    e = remote(server, model="slow")
    s = e.chat(MSGS)
    t_cancel, _ = cancel_after(s, 3, kinds=ContentDelta)
    t_end = time.monotonic()
    assert t_cancel is not None and s.finish_reason == "cancelled"
    assert t_end - t_cancel < 1.0
    assert server.slow_disconnected.wait(3.0)           # the server saw the client go
    assert server.slow_written < 60
    # the engine serves the next request
    e.model = "chat"
    assert e.chat(MSGS).result().content == "Hello world"
    e.close()


def test_fifo_and_a_cancelled_waiter_leaves_the_queue(server):
    e = remote(server, model="slow")
    s1 = e.chat(MSGS)
    s2 = e.chat(MSGS)
    assert s1.started.wait(5)
    assert e.waiting() == 1
    s2.cancel()
    r2 = s2.result()
    assert r2.finish_reason == "cancelled" and s2.started_at is None and e.waiting() == 0
    s3 = e.chat(MSGS)
    s1.cancel()
    assert s1.result().finish_reason == "cancelled"
    s3.cancel()
    s3.result()
    assert s3.started_at is None or s3.started_at >= s1.finished_at
    e.close()


@pytest.mark.parametrize("model,status", [("error400", 400), ("error500", 500)])
def test_error_status_becomes_remote_engine_error(server, model, status):
    e = remote(server, model=model)
    with pytest.raises(RemoteEngineError) as ei:
        e.chat(MSGS).result()
    err = ei.value
    assert err.status_code == status and not isinstance(err, RemoteConnectionError)
    if status == 400:
        assert err.param == "temperature" and err.code == "bad_value" and "temperature too high" in str(err)
    else:
        assert "GPU fell over" in str(err)
    assert e.stats()["errors"] == 1 and not e.stats()["busy"]
    e.model = "chat"                                     # the engine still works
    assert e.chat(MSGS).result().content == "Hello world"
    e.close()


def test_error_event_inside_the_stream(server):
    e = remote(server, model="stream-error")
    s = e.chat(MSGS)
    got = []
    with pytest.raises(RemoteEngineError, match="engine overloaded"):
        for ev in s:
            got.append(ev)
    assert got == [ContentDelta("partial")]
    e.close()


def test_truncated_stream_is_a_connection_error(server):
    e = remote(server, model="truncated")
    with pytest.raises(RemoteConnectionError, match="finish_reason"):
        e.chat(MSGS).result()
    e.close()


def test_unreachable_and_timeout_are_connection_errors(server):
    with socket.socket() as sock:                         # a port on 127.0.0.1 with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    e = RemoteEngine(f"http://127.0.0.1:{port}/v1", api_key="k", model="m", max_retries=0, timeout=5.0)
    with pytest.raises(RemoteConnectionError):
        e.chat(MSGS).result()
    e.close()
    e = remote(server, model="sleepy", timeout=0.5)
    with pytest.raises(RemoteConnectionError):
        e.chat(MSGS).result()
    e.close()


def test_bad_requests_and_arguments_raise_before_anything_is_sent(server):
    e = remote(server)
    n = len(server.requests)
    with pytest.raises(ChatRequestError) as ei:
        e.chat(MSGS, sampling=Sampling(temperature=-1))
    assert ei.value.param == "temperature"
    with pytest.raises(ChatRequestError):
        e.chat(MSGS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert len(server.requests) == n
    e.close()
    for bad in ("", "ftp://x", "127.0.0.1:8000"):
        with pytest.raises(ValueError):
            normalize_base_url(bad)
    assert normalize_base_url("http://h:1/") == "http://h:1/v1"
    assert normalize_base_url("https://api.moonshot.ai/v1/") == "https://api.moonshot.ai/v1"


def test_chunk_mapper_on_plain_dicts():
    m = ChunkMapper()
    assert m.feed({"choices": [{"index": 1, "delta": {"content": "other choice"}}]}) == []
    assert m.feed({"choices": [{"index": 0, "delta": {"function_call": {"name": "f", "arguments": "{}"}},
                                "finish_reason": "function_call"}]}) == [
        ToolCallDelta(0, "functions.f:0", "f", ""), ToolCallDelta(0, None, None, "{}")]
    assert m.finish_reason == "tool_calls" and m.usage is None
