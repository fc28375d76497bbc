"""Bad requests get the right status and an error object in their API's shape naming the field, and
the server keeps serving; the Host guard (DNS rebinding), the bearer key, CORS and the body limit."""

from __future__ import annotations

import json

import openai
import pytest

from kimi_desktop.server import LocalServer, create_app
from kimi_desktop.server.security import accepted_hosts, is_loopback, machine_addresses, normal_host

from tests.kimi_desktop.engine_cases import TOOLS

from .helpers import KEY, openai_client, raw

USER = [{"role": "user", "content": "Hi"}]
CHAT, COMPLETIONS, MESSAGES, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"
COUNT = "/v1/messages/count_tokens"
GET = "GET"                                 # as a body: send a GET without one
LONG = "word " * 3000                       # past the tiny model's context


def chat(**kw) -> dict:
    return {"model": "m", "messages": USER, "max_tokens": 2, **kw}


def msg(**kw) -> dict:
    return {"model": "claude-x", "messages": USER, "max_tokens": 2, **kw}


def resp(**kw) -> dict:
    return {"model": "m", "input": "Hi", "max_output_tokens": 2, **kw}


# (id, path, body, extra headers, status, param, code). OpenAI paths: `param` is the error's param and
# `code` its code (None: not checked). /v1/messages paths: Anthropic's shape; `param` must appear in
# the message and `code` is the error's type.
CASES = [
    # -- Chat Completions: JSON and UTF-8, wrong types, missing fields, ranges, tools ---------------------
    ("malformed-json", CHAT, b'{"messages": [', None, 400, None, "invalid_json"),
    ("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None, 400, None, None),
    ("deeply-nested", CHAT, b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", None, 400, None, None),
    ("body-is-a-list", CHAT, b"[]", None, 400, None, None),
    ("empty-body", CHAT, b"", None, 400, None, None),
    ("no-messages", CHAT, {"model": "m"}, None, 400, "messages", None),
    ("messages-a-string", CHAT, chat(messages="Hi"), None, 400, "messages", None),
    ("empty-messages", CHAT, chat(messages=[]), None, 400, "messages", None),
    ("bad-role", CHAT, chat(messages=[{"role": "robot", "content": "x"}]), None, 400, "messages[0].role", None),
    ("content-number", CHAT, chat(messages=[{"role": "user", "content": 123}]), None, 400,
     "messages[0].content", None),
    ("tool-calls-on-user", CHAT, chat(messages=[{"role": "user", "content": "x", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), None, 400, "messages", None),
    ("image-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]), None, 400, "messages[0].content[0].type", None),
    ("text-part-without-text", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), None, 400,
     "messages[0].content[0].text", None),
    ("temperature-string", CHAT, chat(temperature="hot"), None, 400, "temperature", None),
    ("temperature-infinite", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
     None, 400, "temperature", None),
    ("temperature-huge", CHAT, chat(temperature=1e300), None, 400, "temperature", None),
    ("top-p-zero", CHAT, chat(top_p=0), None, 400, "top_p", None),
    ("top-k-huge", CHAT, chat(top_k=2 ** 70), None, 400, "top_k", None),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), None, 400, "max_tokens", None),
    ("max-tokens-huge", CHAT, chat(max_tokens=10 ** 30), None, 400, "max_tokens", None),
    ("seed-huge", CHAT, chat(seed=2 ** 80), None, 400, "seed", None),
    ("stream-a-list", CHAT, chat(stream=[1]), None, 400, "stream", None),
    ("n-zero", CHAT, chat(n=0), None, 400, "n", None),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), None, 400,
     "stream_options", None),
    ("tools-not-a-list", CHAT, chat(tools={"type": "function"}), None, 400, "tools", None),
    ("tool-without-function", CHAT, chat(tools=[{"type": "function"}]), None, 400, "tools[0].function", None),
    ("tool-bad-name", CHAT, chat(tools=[{"type": "function", "function": {"name": "no spaces!"}}]), None, 400,
     "tools[0].function.name", None),
    ("tool-parameters-not-object", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": "x"}}]), None, 400, "tools[0].function.parameters", None),
    ("tool-parameters-a-list", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": [{"type": "object"}]}}]), None, 400, "tools[0].function.parameters", None),
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
    ("prompt-past-context", CHAT, chat(messages=[{"role": "user", "content": LONG}]), None, 400,
     "messages", "context_length_exceeded"),
    # -- headers: content type, size, Host, route, method ----------------------------------------------------
    ("wrong-content-type", CHAT, json.dumps(chat()), {"Content-Type": "text/plain"}, 415, None,
     "unsupported_media_type"),
    ("no-content-type", CHAT, json.dumps(chat()), {"Content-Type": None}, 415, None, "unsupported_media_type"),
    ("form-content-type", CHAT, json.dumps(chat()), {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     None, "unsupported_media_type"),
    ("declared-too-large", CHAT, b"{}", {"Content-Length": str(40 << 20)}, 413, None, "request_too_large"),
    ("foreign-host", CHAT, chat(), {"Host": "evil.example:8000"}, 403, None, "host_not_allowed"),
    ("no-such-endpoint", "/v1/embeddings", chat(), None, 404, None, None),
    ("wrong-method", CHAT, GET, None, 405, None, None),
    # -- Completions -------------------------------------------------------------------------------------
    ("suffix", COMPLETIONS, {"prompt": "def f(", "suffix": "):"}, None, 400, "suffix", None),
    ("two-prompts", COMPLETIONS, {"prompt": ["a", "b"]}, None, 400, "prompt", None),
    ("prompt-a-number", COMPLETIONS, {"prompt": 5}, None, 400, "prompt", None),
    ("token-past-vocab", COMPLETIONS, {"prompt": [1, 10 ** 9]}, None, 400, "prompt", None),
    ("completion-max-tokens-negative", COMPLETIONS, {"prompt": "a", "max_tokens": -1}, None, 400, "max_tokens", None),
    ("completion-logprobs-99", COMPLETIONS, {"prompt": "a", "logprobs": 99}, None, 400, "logprobs", None),
    ("echo-token-ids", COMPLETIONS, {"prompt": [1, 2], "echo": True}, None, 400, "echo", None),
    ("completion-past-context", COMPLETIONS, {"prompt": LONG}, None, 400, "prompt", "context_length_exceeded"),
    ("completion-prompt-missing", COMPLETIONS, {"max_tokens": 3}, None, 400, "prompt", None),
    # -- Responses (OpenAI's shape) ------------------------------------------------------------------------
    ("responses-malformed-json", RESPONSES, b'{"input": ', None, 400, None, "invalid_json"),
    ("responses-input-a-number", RESPONSES, resp(input=5), None, 400, "input", None),
    ("responses-previous-id", RESPONSES, resp(previous_response_id="resp_1"), None, 400, "previous_response_id",
     None),
    ("responses-max-output-zero", RESPONSES, resp(max_output_tokens=0), None, 400, "max_output_tokens", None),
    ("responses-tool-bad-name", RESPONSES, resp(tools=[{"type": "function", "name": "a b"}]), None, 400,
     "tools[0].name", None),
    ("responses-effort-unknown", RESPONSES, resp(reasoning={"effort": "maximal"}), None, 400, "reasoning.effort",
     None),
    ("responses-past-context", RESPONSES, resp(input=LONG), None, 400, "input", "context_length_exceeded"),
    ("responses-wrong-content-type", RESPONSES, json.dumps(resp()), {"Content-Type": "text/plain"}, 415, None,
     "unsupported_media_type"),
    # -- Anthropic Messages (Anthropic's shape) --------------------------------------------------------------
    ("messages-malformed-json", MESSAGES, b'{"messages": [', None, 400, None, "invalid_request_error"),
    ("messages-invalid-utf8", MESSAGES, b'{"max_tokens": 2, "messages": [{"role": "user", "content": "\xff"}]}',
     None, 400, None, "invalid_request_error"),
    ("messages-no-max-tokens", MESSAGES, {"messages": USER}, None, 400, "max_tokens", "invalid_request_error"),
    ("messages-max-tokens-huge", MESSAGES, msg(max_tokens=10 ** 30), None, 400, "max_tokens",
     "invalid_request_error"),
    ("messages-tool-role", MESSAGES, msg(messages=[{"role": "tool", "content": "x"}]), None, 400,
     "messages[0].role", "invalid_request_error"),
    ("messages-content-number", MESSAGES, msg(messages=[{"role": "user", "content": 7}]), None, 400,
     "messages[0].content", "invalid_request_error"),
    ("messages-temperature-2", MESSAGES, msg(temperature=2), None, 400, "temperature", "invalid_request_error"),
    ("messages-tool-bad-name", MESSAGES, msg(tools=[{"name": "a b", "input_schema": {"type": "object"}}]), None,
     400, "tools[0].name", "invalid_request_error"),
    ("messages-tool-schema-a-string", MESSAGES, msg(tools=[{"name": "f", "input_schema": "object"}]), None, 400,
     "tools[0].input_schema", "invalid_request_error"),
    ("messages-tool-choice-unknown", MESSAGES, msg(tool_choice={"type": "sometimes"}), None, 400, "tool_choice",
     "invalid_request_error"),
    ("messages-thinking-budget-string", MESSAGES, msg(thinking={"type": "enabled", "budget_tokens": "lots"}),
     None, 400, "thinking.budget_tokens", "invalid_request_error"),
    ("messages-past-context", MESSAGES, msg(messages=[{"role": "user", "content": LONG}]), None, 400,
     "messages", "invalid_request_error"),
    ("count-tokens-no-messages", COUNT, {"model": "m"}, None, 400, "messages", "invalid_request_error"),
    ("messages-wrong-content-type", MESSAGES, json.dumps(msg()), {"Content-Type": "text/plain"}, 415, None,
     "invalid_request_error"),
    ("messages-too-large", MESSAGES, b"{}", {"Content-Length": str(40 << 20)}, 413, None, "request_too_large"),
    ("messages-foreign-host", MESSAGES, msg(), {"Host": "attacker.example"}, 403, None, "permission_error"),
    ("messages-no-such-endpoint", "/v1/messages/batches", msg(), None, 404, None, "not_found_error"),
    ("messages-wrong-method", MESSAGES, GET, None, 405, None, "invalid_request_error"),
]

# against the keyed server: (id, path, headers, status, code or Anthropic type)
KEY_CASES = [
    ("no-key", CHAT, {}, 401, "invalid_api_key"),
    ("wrong-bearer", CHAT, {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
    ("empty-bearer", CHAT, {"Authorization": "Bearer "}, 401, "invalid_api_key"),
    ("basic-auth", CHAT, {"Authorization": f"Basic {KEY}"}, 401, "invalid_api_key"),
    ("key-with-suffix", COMPLETIONS, {"Authorization": f"Bearer {KEY}x"}, 401, "invalid_api_key"),
    ("metrics-without-key", "/metrics", {}, 401, "invalid_api_key"),
    ("messages-no-key", MESSAGES, {"anthropic-version": "2023-06-01"}, 401, "authentication_error"),
    ("messages-wrong-x-api-key", MESSAGES, {"x-api-key": "wrong"}, 401, "authentication_error"),
    ("responses-wrong-key", RESPONSES, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
]


def check_error(status, headers, body, want_status, param=None, code=None) -> dict:
    """An OpenAI error object: status, param and (when given) code as expected."""
    assert status == want_status, body
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert err["param"] == param and (code is None or err["code"] == code)
    return err


def check_anthropic(status, headers, body, want_status, kind, field=None) -> dict:
    """Anthropic's {"type": "error", "error": {"type", "message"}}, the field named in the message."""
    assert status == want_status, body
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert set(doc) == {"type", "error"} and doc["type"] == "error"
    err = doc["error"]
    assert set(err) == {"type", "message"} and err["type"] == kind
    assert isinstance(err["message"], str) and err["message"]
    assert field is None or field in err["message"], err["message"]
    return err


def still_serves(srv) -> None:
    r = openai_client(srv).chat.completions.create(model="m", messages=USER, max_tokens=1, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert srv.app.state.kimi.engine.waiting() == 0


def test_the_tables_hold_more_than_thirty_distinct_cases():
    ids = [c[0] for c in CASES + KEY_CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("path,body,headers,status,param,code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(server, path, body, headers, status, param, code):
    got = raw(server, "GET", path, headers=headers) if body == GET else raw(server, "POST", path, body, headers)
    if path.startswith(MESSAGES):
        err = check_anthropic(*got, status, code, param)
    else:
        err = check_error(*got, status, param, code)
    if LONG in str(body):
        ctx = server.app.state.kimi.engine.ctx
        numbers = [int(w) for w in err["message"].replace("(", " ").split() if w.isdigit()]
        assert ctx in numbers and any(n > ctx for n in numbers)        # both lengths are named
    if param == "suffix":
        assert "this model has no fill-in-the-middle tokens" in err["message"]
    if status == 403:                                                 # names the Host and the flag
        assert headers["Host"].split(":")[0] in err["message"] and "--allowed-host" in err["message"]
    still_serves(server)


@pytest.mark.parametrize("path,headers,status,code", [c[1:] for c in KEY_CASES], ids=[c[0] for c in KEY_CASES])
def test_bad_key(scripted, path, headers, status, code):
    body = {"messages": USER, "model": "m", "max_tokens": 1, "prompt": "a", "input": "a"}
    got = (raw(scripted, "GET", path, None, headers) if path == "/metrics"
           else raw(scripted, "POST", path, body, headers))
    if path.startswith(MESSAGES):
        check_anthropic(*got, status, code)
    else:
        check_error(*got, status, None, code)
        assert got[1]["www-authenticate"] == "Bearer"
    assert raw(scripted, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200


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


def serve(engine, **kw) -> LocalServer:
    """A server over `engine`; create_app's host is the address it is reachable at (the socket here
    stays on loopback)."""
    return LocalServer(create_app(engine, "m", **kw), port=0, logs=False).start_in_thread()


def models(srv, host: str | None = None, **headers) -> int:
    h = {"Host": host} if host else {}
    return raw(srv, "GET", "/v1/models", headers={**h, **headers})[0]


def test_accepted_hosts_follow_the_bind_address():
    assert accepted_hosts("127.0.0.1") == frozenset()                       # loopback names only
    assert accepted_hosts("localhost", ["MyBox.lan."]) == {"mybox.lan"}
    assert accepted_hosts("192.168.1.20") == {"192.168.1.20"}
    assert accepted_hosts("[fd00::2]", ["a.lan"]) == {"fd00::2", "a.lan"}
    import socket
    wild, own = accepted_hosts("0.0.0.0"), machine_addresses()
    assert wild == accepted_hosts("::") == {a for a in own if not is_loopback(a)}
    assert normal_host(socket.gethostname()) in own


def test_specific_bind_accepts_its_address_and_the_allowed_names(server_engine):
    s = serve(server_engine, api_key=KEY, host="192.168.1.20", allowed_hosts=["box.lan"])
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        assert models(s, "192.168.1.20:8000", **auth) == 200
        assert models(s, "BOX.lan:8000", **auth) == 200 and models(s, "box.lan.", **auth) == 200
        assert models(s, f"127.0.0.1:{s.port}", **auth) == 200 and models(s, "localhost", **auth) == 200
        assert models(s, "192.168.1.20:8000") == 401                        # the key still holds
        status, headers, body = raw(s, "GET", "/v1/models", headers={"Host": "192.168.1.21", **auth})
        err = check_error(status, headers, body, 403, code="host_not_allowed")
        assert "'192.168.1.21'" in err["message"] and "--allowed-host 192.168.1.21" in err["message"]
        assert models(s, "box.lan.evil.example", **auth) == 403
    finally:
        s.stop()


def test_wildcard_bind_accepts_this_machines_names_only(server_engine):
    import socket
    s = serve(server_engine, api_key=KEY, host="0.0.0.0")
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        assert models(s, f"{socket.gethostname()}:8000", **auth) == 200
        for addr in sorted(machine_addresses())[:6]:
            shown = f"[{addr}]:80" if ":" in addr else f"{addr}:80"
            assert models(s, shown, **auth) == 200, addr
        assert models(s, "203.0.113.9", **auth) == 403                      # TEST-NET-3: not this machine
        assert models(s, "evil.example", **auth) == 403
    finally:
        s.stop()


def test_loopback_bind_takes_allowed_hosts_too(server_engine):
    s = serve(server_engine, allowed_hosts=["devbox"])
    try:
        assert models(s, "devbox:8000") == 200 and models(s, "localhost") == 200
        assert models(s, "otherbox") == 403 and models(s, "192.168.1.20") == 403
    finally:
        s.stop()


PREFLIGHT = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}


def test_cors_is_off_by_default(scripted):
    status, headers, _ = raw(scripted, "OPTIONS", CHAT, headers=PREFLIGHT)
    assert status in (401, 405) and not any(k.startswith("access-control-") for k in headers)
    _, headers, _ = raw(scripted, "GET", "/v1/models", headers={"Origin": "http://localhost:3000",
                                                                "Authorization": f"Bearer {KEY}"})
    assert not any(k.startswith("access-control-") for k in headers)


def test_cors_for_the_listed_origins(scripted_engine, script):
    s = serve(scripted_engine, api_key=KEY, cors_origins=["http://localhost:3000"])
    try:
        status, headers, _ = raw(s, "OPTIONS", CHAT, headers=PREFLIGHT)        # no key: answered before the check
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in headers
        status, headers, _ = raw(s, "OPTIONS", CHAT, headers={**PREFLIGHT, "Origin": "http://evil.example"})
        assert status == 400 and "access-control-allow-origin" not in headers
        script("Hello")
        origin = {"Origin": "http://localhost:3000"}
        status, headers, _ = raw(s, "POST", CHAT, chat(max_tokens=1), {**origin, "Authorization": f"Bearer {KEY}"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        status, headers, body = raw(s, "POST", CHAT, chat(), origin)                # a refusal is readable too
        check_error(status, headers, body, 401, code="invalid_api_key")
        assert headers["access-control-allow-origin"] == "http://localhost:3000"
        _, headers, _ = raw(s, "GET", "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in headers
        assert raw(s, "OPTIONS", CHAT, headers={**PREFLIGHT, "Host": "evil.example"})[0] == 403
    finally:
        s.stop()


def test_cors_star_only_when_given(server_engine):
    s = serve(server_engine, cors_origins=["*"])
    try:
        status, headers, _ = raw(s, "OPTIONS", CHAT, headers={**PREFLIGHT, "Origin": "http://any.example"})
        assert status == 200 and headers["access-control-allow-origin"] in ("*", "http://any.example")
        _, headers, _ = raw(s, "GET", "/v1/models", headers={"Origin": "http://any.example"})
        assert headers["access-control-allow-origin"] == "*"
    finally:
        s.stop()


def test_openapi_schema_describes_the_bodies(server):
    status, _, body = raw(server, "GET", "/openapi.json")
    schemas = json.loads(body)["components"]["schemas"]
    assert status == 200
    chat_fields = set(schemas["ChatCompletionRequest"]["properties"])
    assert {"messages", "tools", "tool_choice", "response_format"} <= chat_fields
    assert {"prompt", "suffix"} <= set(schemas["CompletionRequest"]["properties"])


def test_a_full_queue_is_overloaded_error_on_messages(scripted, scripted_engine, script):
    from .helpers import open_stream, read_until, wait_until

    script("<think></think>" + " a" * 400 + "<|im_end|>", delay=0.01)
    body = {"model": "m", "messages": [{"role": "user", "content": "go"}], "temperature": 0, "stream": True}
    running = open_stream(scripted, CHAT, body, KEY)
    read_until(running, b'"content":" a')
    waiting = open_stream(scripted, CHAT, body, KEY)                  # max_queue=1: this one may wait
    try:
        assert wait_until(lambda: scripted_engine.waiting() == 1)
        status, headers, data = raw(scripted, "POST", MESSAGES, msg(), {"x-api-key": KEY})
        check_anthropic(status, headers, data, 503, "overloaded_error", "--max-queue")
        assert headers["retry-after"].isdigit()
    finally:
        waiting.close()
        running.close()
    assert wait_until(lambda: not scripted_engine.stats()["busy"] and scripted_engine.waiting() == 0)
