"""McpHub over real MCP servers on stdio (tests/kimi_desktop/mcp_server.py as subprocesses): tools for K2,
calls, and every failure (timeout, crash, bad arguments, bad result, a server that will not start) as
an error ToolResult, never an exception. And mcp.json parsing with errors that name server and field."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from kimi_desktop.chat import TOOL_NAME_RE
from kimi_desktop.mcp_tools import (HttpServer, McpConfigError, McpHub, StdioServer, ToolResult, k2_tool_name,
                                    load_mcp_config, parse_arguments, parse_mcp_config)

from .mcp_server import SCRIPT, stdio_config


@pytest.fixture(scope="module")
def http_port():
    """The test server on streamable HTTP; started first, so it boots while the stdio servers do."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--http", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return port
            except OSError:
                time.sleep(0.05)
        pytest.fail("the HTTP MCP test server did not start")
    yield up
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def hub(http_port):
    cfg = stdio_config("demo", "other", "crashy")
    cfg["mcpServers"]["broken"] = {"command": "/nonexistent/kimi-mcp-server"}
    cfg["mcpServers"]["dies"] = {"command": sys.executable,
                                 "args": ["-c", "import sys; print('boom at start', file=sys.stderr); sys.exit(1)"]}
    cfg["mcpServers"]["garbled"] = {"command": sys.executable, "args": [str(SCRIPT), "--bad-result"]}
    h = McpHub(parse_mcp_config(json.dumps(cfg)), connect_timeout_s=15).start()
    yield h
    h.close()


def names(hub):
    return [t["function"]["name"] for t in hub.tools()]


def test_tools_have_unique_k2_names_mapped_back(hub):
    n = names(hub)
    assert n[:4] == ["add", "weather_now", "nap", "crash"]          # the first server keeps its names
    assert {"other_add", "other_weather_now", "crashy_crash", "garble"} <= set(n)
    assert len(n) == len(set(n)) and all(TOOL_NAME_RE.match(x) for x in n)
    assert hub.server_of("weather_now") == "demo" and hub.server_of("other_weather_now") == "other"
    assert hub.server_of("garble") == "garbled" and hub.server_of("nothing") is None
    add = next(t for t in hub.tools() if t["function"]["name"] == "add")
    assert add["type"] == "function" and add["function"]["description"] == "Add two integers."
    assert add["function"]["parameters"]["required"] == ["a", "b"]
    st = hub.status()
    assert st["demo"].state == "connected" and st["other"].tools[0] == "other_add"


def test_call_runs_on_the_right_server(hub):
    r = hub.call("add", '{"a": 2, "b": 40}', timeout_s=10)
    assert (r.text, r.is_error) == ("42", False)
    r = hub.call("other_weather_now", {"city": "Oslo"}, timeout_s=10)
    assert (r.text, r.is_error) == ("other: sunny in Oslo", False)


@pytest.mark.parametrize("args, says", [('{"a": 1', "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_arguments_are_an_error_result(hub, args, says):
    r = hub.call("add", args, timeout_s=10)
    assert r.is_error and says in r.text and "'add'" in r.text and "'demo'" in r.text


def test_unknown_tool_and_server_side_errors(hub):
    r = hub.call("no_such_tool", {}, timeout_s=10)
    assert r.is_error and "no_such_tool" in r.text
    r = hub.call("add", {"a": "x", "b": 1}, timeout_s=10)        # the server's own validation
    assert r.is_error and "add" in r.text


def test_timeout_is_an_error_result_and_the_server_goes_on(hub):
    t0 = time.monotonic()
    r = hub.call("nap", {"seconds": 2}, timeout_s=0.5)
    assert r.is_error and "did not answer within 0.5 s" in r.text
    assert time.monotonic() - t0 < 10
    assert hub.call("add", {"a": 1, "b": 1}, timeout_s=10).text == "2"


def test_cancelled_call_returns_at_once(hub):
    t0 = time.monotonic()
    r = hub.call("other_nap", {"seconds": 2}, timeout_s=20, cancelled=lambda: time.monotonic() - t0 > 0.2)
    assert r.is_error and "cancelled" in r.text and time.monotonic() - t0 < 1.5


def test_crash_mid_call_is_an_error_result(hub):
    r = hub.call("crashy_crash", {}, timeout_s=10)
    assert r.is_error and "'crashy'" in r.text and "stopped while running 'crash'" in r.text
    assert "about to crash" in r.text                              # the server's last stderr words
    st = hub.status()["crashy"]
    assert st.state == "crashed" and "crash" in st.error
    r = hub.call("crashy_add", {"a": 1, "b": 2}, timeout_s=10)
    assert r.is_error and "not run" in r.text and "crashed" in r.text
    assert hub.call("other_add", {"a": 1, "b": 2}, timeout_s=10).text == "3"     # the others go on


def test_bad_result_is_an_error_result(hub):
    r = hub.call("garble", {}, timeout_s=10)
    assert r.is_error and "cannot read" in r.text and "'garble'" in r.text and "'garbled'" in r.text


def test_servers_that_fail_to_start_are_recorded(hub):
    st = hub.status()
    assert st["broken"].state == "failed" and "/nonexistent/kimi-mcp-server" in st["broken"].error
    assert st["dies"].state == "failed" and "boom at start" in st["dies"].error
    assert st["broken"].tools == [] and hub.server_of("broken") is None


def test_empty_hub():
    h = McpHub(None).start()
    assert h.tools() == [] and h.status() == {} and h.call("x", {}).is_error
    h.close()


# -- mcp.json ----------------------------------------------------------------------------------------

def test_config_shapes(tmp_path):
    assert load_mcp_config(tmp_path / "missing.json").servers == {}
    p = tmp_path / "mcp.json"
    p.write_text(json.dumps({"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "server-files", "/tmp"], "env": {"K": "v"}},
        "web": {"url": "http://127.0.0.1:9/mcp", "headers": {"Authorization": "Bearer x"}},
        "typed": {"type": "streamable-http", "url": "https://example.org/mcp"},
        "off": {"command": "nothing", "disabled": True}}}))
    cfg = load_mcp_config(p)
    assert cfg.path == p and list(cfg.servers) == ["files", "web", "typed"]
    assert cfg.servers["files"] == StdioServer("files", "npx", ("-y", "server-files", "/tmp"), {"K": "v"})
    assert cfg.servers["web"] == HttpServer("web", "http://127.0.0.1:9/mcp", {"Authorization": "Bearer x"})
    assert parse_mcp_config("").servers == {}


@pytest.mark.parametrize("cfg, says", [
    ('{"mcpServers": {"a": {"command": "x",}}}', "not valid JSON"),
    ('[1]', "mcpServers"),
    ('{"mcpServers": []}', "mcpServers must be an object"),
    ('{"mcpServers": {"files": "npx"}}', "server 'files': expected an object"),
    ('{"mcpServers": {"files": {"args": ["x"]}}}', "server 'files': command"),
    ('{"mcpServers": {"files": {"command": "npx", "args": "-y"}}}', "server 'files': args"),
    ('{"mcpServers": {"files": {"command": "npx", "env": {"K": 1}}}}', "server 'files': env"),
    ('{"mcpServers": {"web": {"url": "ftp://x"}}}', "server 'web': url"),
    ('{"mcpServers": {"web": {"url": "http://x", "headers": ["a"]}}}', "server 'web': headers"),
    ('{"mcpServers": {"old": {"type": "sse", "url": "http://x"}}}', "SSE transport"),
])
def test_config_errors_name_server_and_field(tmp_path, cfg, says):
    p = tmp_path / "mcp.json"
    p.write_text(cfg)
    with pytest.raises(McpConfigError) as e:
        load_mcp_config(p)
    assert says in str(e.value) and str(p) in str(e.value)


def test_helpers():
    assert k2_tool_name("weather.now") == "weather_now" and k2_tool_name("") == "tool"
    assert len(k2_tool_name("x" * 100)) == 64
    assert parse_arguments(None) == {} and parse_arguments("") == {} and parse_arguments('{"a": 1}') == {"a": 1}
    with pytest.raises(ValueError, match="JSON object"):
        parse_arguments('"text"')


def test_streamable_http_server(http_port):
    cfg = {"mcpServers": {"web": {"url": f"http://127.0.0.1:{http_port()}/mcp", "headers": {"X-Test": "1"}}}}
    with McpHub(parse_mcp_config(json.dumps(cfg)), connect_timeout_s=15) as h:
        assert h.status()["web"].state == "connected" and h.status()["web"].transport == "http"
        assert h.call("add", {"a": 20, "b": 22}, timeout_s=10) == ToolResult("42", False)
    assert h.status()["web"].state == "closed"
    r = h.call("add", {"a": 5, "b": 5}, timeout_s=10)
    assert r.is_error and "not run" in r.text
    h.close()                                       # twice is fine
    refused = McpHub(parse_mcp_config(json.dumps({"mcpServers": {"gone": {"url": "http://127.0.0.1:9/mcp"}}})),
                     connect_timeout_s=5).start()
    assert refused.status()["gone"].state == "failed" and "127.0.0.1:9" in refused.status()["gone"].error
    refused.close()


@pytest.mark.parametrize("text", ['{"n": NaN}', '{"n": Infinity}', '{"n": -Infinity}', '{"n": 1e999}',
                                  '{"n": [-1.5e309]}', '{"n": 1', '[]', '"x"', "null"])
def test_tool_arguments_are_strict_json_objects(text):
    """What no JSON encoder writes back (NaN, Infinity, a number past a double) is refused, as is a
    value that is not an object: the tool gets an error naming why, not a crash later."""
    with pytest.raises(ValueError, match="not valid JSON|JSON object"):
        parse_arguments(text)


def test_tool_arguments_keep_what_json_keeps():
    text = '{"n": 1.5e308, "big": 123456789012345678901234567890, "s": "NaN", "a": [true, null]}'
    assert parse_arguments(text) == {"n": 1.5e308, "big": 123456789012345678901234567890, "s": "NaN",
                                     "a": [True, None]}
