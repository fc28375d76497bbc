"""Bad requests get the right status and an OpenAI error object naming the field, and the server
keeps serving; the Host guard (DNS rebinding), the bearer key and the body limit."""

from __future__ import annotations

import json

import openai
import pytest

from kimi_desktop.server import LocalServer, create_app

from tests.kimi_desktop.engine_cases import TOOLS

from .helpers import KEY, openai_client, raw

USER = [{"role": "user", "content": "Hi"}]
CHAT = "/v1/chat/completions"


def chat(**kw) -> dict:
    return {"model": "m", "messages": USER, "max_tokens": 2, **kw}


# (id, path, body, extra headers, status, param, code)
CASES = [
    ("malformed-json", CHAT, b'{"messages": [', None, 400, None, "invalid_json"),
    ("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None, 400, None, None),
    ("body-is-a-list", CHAT, b"[]", None, 400, None, None),
    ("empty-body", CHAT, b"", None, 400, None, None),
    ("no-messages", CHAT, {"model": "m"}, None, 400, "messages", None),
    ("empty-messages", CHAT, chat(messages=[]), None, 400, "messages", None),
    ("bad-role", CHAT, chat(messages=[{"role": "robot", "content": "x"}]), None, 400, "messages[0].role", None),
    ("content-number", CHAT, chat(messages=[{"role": "user", "content": 123}]), None, 400,
     "messages[0].content", None),
    ("tool-calls-on-user", CHAT, chat(messages=[{"role": "user", "content": "x", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), None, 400, "messages", None),
    ("image-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]), None, 400, "messages[0].content[0].type", None),
    ("temperature-string", CHAT, chat(temperature="hot"), None, 400, "temperature", None),
    ("temperature-infinite", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
     None, 400, "temperature", None),
    ("top-p-zero", CHAT, chat(top_p=0), None, 400, "top_p", None),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), None, 400, "max_tokens", None),
    ("max-tokens-huge", CHAT, chat(max_tokens=10 ** 30), None, 400, "max_tokens", None),
    ("seed-huge", CHAT, chat(seed=2 ** 80), None, 400, "seed", None),
    ("n-two", CHAT, chat(n=2), None, 400, "n", None),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), None, 400,
     "stream_options", None),
    ("tool-without-function", CHAT, chat(tools=[{"type": "function"}]), None, 400, "tools[0].function", None),
    ("tool-bad-name", CHAT, chat(tools=[{"type": "function", "function": {"name": "no spaces!"}}]), None, 400,
     "tools[0].function.name", None),
    ("tool-parameters-not-object", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": "x"}}]), None, 400, "tools[0].function.parameters", None),
    ("text-part-without-text", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), None, 400,
     "messages[0].content[0].text", None),
    ("named-choice-without-function", CHAT, chat(tools=TOOLS, tool_choice={"type": "function"}), None, 400,
     "tool_choice.function", None),
    ("stop-not-strings", CHAT, chat(stop=[1]), None, 400, "stop[0]", None),
    ("tool-choice-unknown", CHAT, chat(tools=TOOLS, tool_choice="sometimes"), None, 400, "tool_choice", None),
    ("tool-choice-undeclared", CHAT, chat(tools=TOOLS, tool_choice={"type": "function", "function": {
        "name": "nope"}}), None, 400, "tool_choice", None),
    ("tool-choice-required-no-tools", CHAT, chat(tool_choice="required"), None, 400, "tool_choice", None),
    ("response-format-xml", CHAT, chat(response_format={"type": "xml"}), None, 400, "response_format.type", None),
    ("top-logprobs-50", CHAT, chat(logprobs=True, top_logprobs=50), None, 400, "top_logprobs", None),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), None, 400, "top_logprobs", None),
    ("seventeen-stops", CHAT, chat(stop=[f"s{i}" for i in range(17)]), None, 400, "stop", None),
    ("prompt-past-context", CHAT, chat(messages=[{"role": "user", "content": "word " * 3000}]), None, 400,
     "messages", "context_length_exceeded"),
    ("wrong-content-type", CHAT, json.dumps(chat()), {"Content-Type": "text/plain"}, 415, None,
     "unsupported_media_type"),
    ("no-content-type", CHAT, json.dumps(chat()), {"Content-Type": None}, 415, None, "unsupported_media_type"),
    ("form-content-type", CHAT, json.dumps(chat()), {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     None, "unsupported_media_type"),
    ("declared-too-large", CHAT, b"{}", {"Content-Length": str(40 << 20)}, 413, None, "request_too_large"),
    ("unknown-endpoint", "/v1/embeddings", chat(), None, 404, None, None),
    ("suffix", "/v1/completions", {"prompt": "def f(", "suffix": "):"}, None, 400, "suffix", None),
    ("two-prompts", "/v1/completions", {"prompt": ["a", "b"]}, None, 400, "prompt", None),
    ("token-past-vocab", "/v1/completions", {"prompt": [1, 10 ** 9]}, None, 400, "prompt", None),
    ("completion-past-context", "/v1/completions", {"prompt": "word " * 3000}, None, 400, "prompt",
     "context_length_exceeded"),
    ("completion-prompt-missing", "/v1/completions", {"max_tokens": 3}, None, 400, "prompt", None),
]


def check_error(status, headers, body, want_status, param=None, code=None) -> dict:
    assert status == want_status, body
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert err["param"] == param and (code is None or err["code"] == code)
    return err


@pytest.mark.parametrize("path,body,headers,status,param,code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(server, path, body, headers, status, param, code):
    err = check_error(*raw(server, "POST", path, body, headers), status, param, code)
    if code == "context_length_exceeded":
        ctx = server.app.state.kimi.engine.ctx
        numbers = [int(w) for w in err["message"].replace("(", " ").split() if w.isdigit()]
        assert ctx in numbers and any(n > ctx for n in numbers)        # both lengths are named
    if path.endswith("completions") and param == "suffix":
        assert "this model has no fill-in-the-middle tokens" in err["message"]


def test_wrong_method_and_the_server_still_serves(server):
    check_error(*raw(server, "GET", CHAT), 405)
    r = openai_client(server).chat.completions.create(model="m", messages=USER, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert server.app.state.kimi.engine.waiting() == 0


@pytest.fixture(scope="module")
def small_body(server_engine):
    s = LocalServer(create_app(server_engine, "m", max_body_bytes=1024), port=0, logs=False).start_in_thread()
    yield s
    s.stop()


def test_body_over_the_limit_even_when_chunked(small_body):
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * 2000}])).encode()
    check_error(*raw(small_body, "POST", CHAT, big), 413, code="request_too_large")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 500]), big[i:i + 500]) for i in range(0, len(big), 500))
    check_error(*raw(small_body, "POST", CHAT, chunked + b"0\r\n\r\n", {"Transfer-Encoding": "chunked"}), 413)
    status, _, _ = raw(small_body, "POST", CHAT, chat())
    assert status == 200


@pytest.mark.parametrize("host,ok", [("evil.example", False), ("localhost.evil.example:80", False),
                                     ("192.168.1.20:8000", False), ("localhost", True), ("127.0.0.1:{port}", True),
                                     ("[::1]:{port}", True), ("127.0.0.2", True), ("LOCALHOST:{port}", True)])
def test_host_guard(server, host, ok):
    status, headers, body = raw(server, "GET", "/v1/models", headers={"Host": host.format(port=server.port)})
    if ok:
        assert status == 200
    else:
        check_error(status, headers, body, 403, code="host_not_allowed")


def test_bearer_key(scripted):
    check_error(*raw(scripted, "GET", "/v1/models"), 401, code="invalid_api_key")
    status, headers, _ = raw(scripted, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert raw(scripted, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    assert raw(scripted, "GET", "/v1/models", headers={"x-api-key": KEY})[0] == 200
    assert raw(scripted, "GET", "/health")[0] == 200                  # probes need no key
    assert raw(scripted, "GET", "/health", headers={"Host": "evil.example"})[0] == 403
    check_error(*raw(scripted, "POST", CHAT, chat()), 401)          # before the body is even looked at
    with pytest.raises(openai.AuthenticationError):
        openai_client(scripted, "not-the-key").models.list()
    assert openai_client(scripted, KEY).models.list().data[0].id == "scripted"


def test_non_loopback_bind_accepts_other_hosts_with_the_key(server_engine):
    # create_app's host is the address the server is reachable at; the socket here stays on loopback
    s = LocalServer(create_app(server_engine, "m", api_key=KEY, host="0.0.0.0"), port=0, logs=False).start_in_thread()
    try:
        assert raw(s, "GET", "/v1/models", headers={"Host": "192.168.1.20:8000",
                                                    "Authorization": f"Bearer {KEY}"})[0] == 200
        assert raw(s, "GET", "/v1/models", headers={"Host": "192.168.1.20:8000"})[0] == 401
    finally:
        s.stop()


def test_openapi_schema_describes_the_bodies(server):
    status, _, body = raw(server, "GET", "/openapi.json")
    schemas = json.loads(body)["components"]["schemas"]
    assert status == 200
    chat_fields = set(schemas["ChatCompletionRequest"]["properties"])
    assert {"messages", "tools", "tool_choice", "response_format"} <= chat_fields
    assert {"prompt", "suffix"} <= set(schemas["CompletionRequest"]["properties"])
