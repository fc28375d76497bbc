"""MCP tools for the chat: the servers of an mcp.json, their tools offered to K2, calls that never raise.

    config = load_mcp_config()            # default: settings.config_dir() / "mcp.json"; missing = no servers
    hub = McpHub(config); hub.start()     # connects every server; a failing one is recorded, others go on
                                          # (start, call and close block: keep them off the UI thread)
    tools = hub.tools()                   # OpenAI function tools, names valid for K2 (^[A-Za-z0-9_-]{1,64}$)
    hub.server_of("read_file")            # "files" (None for a name no server offers)
    r = hub.call("read_file", {"path": "a.txt"}, timeout_s=30)   # ToolResult(text, is_error)
    hub.status()                          # {name: ServerStatus(name, transport, state, error, tools)}
    hub.close()

mcp.json is read by kimi_desktop.mcp_config (re-exported here): stdio servers (command, args, env) and
streamable HTTP ones (url, headers); a bad file raises McpConfigError naming the server and the field.

The hub runs its own asyncio loop on a background thread (the official `mcp` SDK, 2.x: stdio_client /
streamable_http_client + ClientSession); one task per server holds its connection open (after mcp.json
changes, close the hub and start a new one on the new config). Tool names are
the servers' own where valid and unique; otherwise sanitized, prefixed with the server name on a clash,
and numbered if still taken; the hub maps each back to (server, tool). call() turns a timeout, a
crashed server, arguments that are not a JSON object, an unknown tool or a bad result into a ToolResult
with is_error and a message that names the server and the tool: it never raises. A server's stderr goes
to a temporary file; its last lines are quoted when it fails.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from kimi_desktop.chat import parse_tool_arguments
from kimi_desktop.mcp_config import (HttpServer, McpConfig, McpConfigError, StdioServer, default_mcp_path,
                                     load_mcp_config, parse_mcp_config)

__all__ = ["McpConfig", "McpConfigError", "McpHub", "ServerStatus", "StdioServer", "HttpServer",
           "ToolResult", "default_mcp_path", "load_mcp_config", "parse_mcp_config", "parse_arguments",
           "k2_tool_name"]

MAX_RESULT_CHARS = 100_000      # a tool result larger than this is cut, with a note saying so
STDERR_TAIL = 400               # characters of a failed server's stderr quoted in its error


@dataclass(frozen=True)
class ToolResult:
    text: str
    is_error: bool = False


@dataclass
class ServerStatus:
    name: str
    transport: str               # stdio | http
    state: str                   # not started | connecting | connected | failed | crashed | closed
    error: str | None = None
    tools: list[str] = field(default_factory=list)      # the names offered to the model


def k2_tool_name(name: str) -> str:
    """`name` made valid for K2 / OpenAI: other characters become '_', at most 64."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "tool"


def parse_arguments(arguments: str | Mapping | None) -> dict:
    """A tool call's arguments as a dict; ValueError in plain words when they are not a JSON object."""
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if arguments is not None and not isinstance(arguments, str):
        raise ValueError(f"the arguments must be a JSON object, got {type(arguments).__name__}")
    return parse_tool_arguments(arguments or "")


def _leaf(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def result_to_tool_result(res: Any) -> ToolResult:
    """An MCP CallToolResult as text for the model: text blocks as they are, others described."""
    parts = []
    for block in getattr(res, "content", None) or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} ({block.mime_type}), not shown to the model]")
        elif kind == "resource":
            r = block.resource
            parts.append(r.text if getattr(r, "text", None) is not None else f"[resource {r.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource link: {block.uri}]")
        else:
            parts.append(f"[{kind} content]")
    if not parts and getattr(res, "structured_content", None) is not None:
        parts.append(json.dumps(res.structured_content, ensure_ascii=False))
    text = "\n".join(parts)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"\n[... {len(text) - MAX_RESULT_CHARS} more characters cut by the app]"
    return ToolResult(text, bool(getattr(res, "is_error", False)))


class _Server:
    def __init__(self, spec):
        self.spec = spec
        self.status = ServerStatus(spec.name, spec.transport, "not started")
        self.session = None
        self.tools: list = []                      # mcp Tool objects
        self.stop: asyncio.Event | None = None
        self.ready = threading.Event()
        self.errlog = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") \
            if spec.transport == "stdio" else None

    def stderr_tail(self) -> str:
        if self.errlog is None:
            return ""
        try:
            self.errlog.flush()
            self.errlog.seek(0)
            text = self.errlog.read().strip()
        except (OSError, ValueError):
            return ""
        return f"; its stderr ends: {text[-STDERR_TAIL:]}" if text else ""


class McpHub:
    def __init__(self, config: McpConfig | None, connect_timeout_s: float = 20.0):
        self.config = config or McpConfig()
        self.connect_timeout_s = connect_timeout_s
        self._servers = {name: _Server(spec) for name, spec in self.config.servers.items()}
        self._names: dict[str, tuple[str, str]] = {}       # K2 name -> (server, MCP tool name)
        self._tools: list[dict] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> McpHub:
        """Connect every server (in parallel); returns when each is connected or has failed."""
        if self._thread is not None or not self._servers:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kimi-mcp", daemon=True)
        self._thread.start()
        for srv in self._servers.values():
            srv.status.state = "connecting"
            asyncio.run_coroutine_threadsafe(self._run(srv), self._loop)
        deadline = time.monotonic() + self.connect_timeout_s + 5
        for srv in self._servers.values():
            srv.ready.wait(max(0.0, deadline - time.monotonic()))
        self._index()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Disconnect every server (stdio servers are stopped) and end the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None

        async def stop_all():
            for srv in self._servers.values():
                if srv.stop is not None:
                    srv.stop.set()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if others:
                await asyncio.wait(others, timeout=timeout_s)
        try:
            asyncio.run_coroutine_threadsafe(stop_all(), loop).result(timeout_s + 1)
        except Exception:                               # a server that will not stop: leave it to exit
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if not thread.is_alive():
            loop.close()
        for srv in self._servers.values():
            if srv.status.state == "connected":
                srv.status.state = "closed"
            if srv.errlog is not None:
                srv.errlog.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    async def _run(self, srv: _Server) -> None:
        """One server's connection, held open until close() (its context managers live in this task)."""
        spec, srv.stop = srv.spec, asyncio.Event()
        try:
            async with AsyncExitStack() as stack:
                import anyio
                from mcp import ClientSession, StdioServerParameters, stdio_client, types
                if spec.transport == "stdio":
                    params = StdioServerParameters(command=spec.command, args=list(spec.args),
                                                   env=dict(spec.env) if spec.env else None, cwd=spec.cwd)
                    read, write = await stack.enter_async_context(stdio_client(params, errlog=srv.errlog))
                else:
                    from mcp.client.streamable_http import streamable_http_client
                    from mcp.shared._httpx_utils import create_mcp_http_client
                    client = await stack.enter_async_context(create_mcp_http_client(headers=dict(spec.headers)))
                    read, write = await stack.enter_async_context(streamable_http_client(spec.url, http_client=client))
                session = await stack.enter_async_context(ClientSession(read, write))
                with anyio.fail_after(self.connect_timeout_s):       # scoped to the handshake only
                    await session.initialize()
                    tools, cursor = [], None
                    while True:                                  # every page of tools/list
                        page = await session.list_tools(
                            params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
                        tools += page.tools
                        cursor = page.next_cursor
                        if not cursor:
                            break
                srv.session, srv.tools = session, tools
                srv.status.state = "connected"
                srv.ready.set()
                await srv.stop.wait()
                srv.session = None
        except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
            raise
        except BaseException as e:             # noqa: BLE001 - a failing server is a status, never a crash
            leaf = _leaf(e)
            if srv.status.state == "connecting":
                what = "did not connect" if isinstance(leaf, TimeoutError) else "cannot connect"
                target = spec.command if spec.transport == "stdio" else spec.url
                srv.status.state = "failed"
                srv.status.error = (f"MCP server {spec.name!r} ({target}) {what}: "
                                    f"{type(leaf).__name__}: {leaf}{srv.stderr_tail()}")
        finally:
            srv.session = None
            srv.ready.set()

    def _index(self) -> None:
        """Offer each connected server's tools under K2-valid, unique names (servers in config order)."""
        names: dict[str, tuple[str, str]] = {}
        tools = []
        for sname, srv in self._servers.items():
            srv.status.tools = []
            for t in srv.tools if srv.status.state == "connected" else []:
                name = k2_tool_name(t.name)
                if name in names:
                    name = k2_tool_name(f"{sname}_{t.name}")
                n, base = 2, name
                while name in names:
                    name = f"{base[:64 - len(str(n)) - 1]}_{n}"
                    n += 1
                names[name] = (sname, t.name)
                srv.status.tools.append(name)
                schema = t.input_schema if isinstance(t.input_schema, dict) else {}
                tools.append({"type": "function", "function": {
                    "name": name, "description": t.description or t.title or "",
                    "parameters": schema or {"type": "object", "properties": {}}}})
        with self._lock:
            self._names, self._tools = names, tools

    # -- queries -----------------------------------------------------------------------------------
    def tools(self) -> list[dict]:
        with self._lock:
            return [dict(t, function=dict(t["function"])) for t in self._tools]

    def server_of(self, tool_name: str) -> str | None:
        with self._lock:
            hit = self._names.get(tool_name)
        return hit[0] if hit else None

    def status(self) -> dict[str, ServerStatus]:
        return {n: ServerStatus(**{**vars(s.status), "tools": list(s.status.tools)}) for n, s in self._servers.items()}

    # -- calls -------------------------------------------------------------------------------------
    def call(self, tool_name: str, arguments: str | Mapping | None, timeout_s: float = 30.0, *,
             cancelled: Callable[[], bool] | None = None) -> ToolResult:
        """Run one tool; every failure is a ToolResult with is_error (see the module docstring).
        `cancelled` (polled) abandons the call early: a ToolResult saying so."""
        with self._lock:
            hit = self._names.get(tool_name)
        if hit is None:
            return ToolResult(f"there is no tool named {tool_name!r} (the tools offered are: "
                              f"{', '.join(self._names) or 'none'})", True)
        sname, tname = hit
        label = f"tool {tname!r} of MCP server {sname!r}"
        try:
            args = parse_arguments(arguments)
        except ValueError as e:
            return ToolResult(f"{label} was not run: {e}", True)
        srv, loop = self._servers[sname], self._loop
        if srv.session is None or loop is None or srv.status.state != "connected":
            why = f" ({srv.status.error})" if srv.status.error else ""
            return ToolResult(f"{label} was not run: the server is {srv.status.state}{why}", True)
        fut = asyncio.run_coroutine_threadsafe(self._call(srv, tname, label, args, timeout_s), loop)
        deadline = time.monotonic() + timeout_s + 5          # the SDK's own timeout fires first
        while True:
            try:
                return fut.result(0.05)
            except TimeoutError:
                pass
            except Exception as e:                           # noqa: BLE001 - never raise to the chat
                return ToolResult(f"{label} failed: {type(e).__name__}: {e}", True)
            if cancelled is not None and cancelled():
                fut.cancel()
                return ToolResult(f"{label} was cancelled by the user", True)
            if time.monotonic() > deadline:
                fut.cancel()
                return ToolResult(f"{label} did not answer within {timeout_s:g} s", True)

    async def _call(self, srv: _Server, tname: str, label: str, args: dict, timeout_s: float) -> ToolResult:
        from mcp import MCPError
        from mcp.types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        try:
            res = await srv.session.call_tool(tname, args, read_timeout_seconds=timeout_s)
        except MCPError as e:
            if e.code == REQUEST_TIMEOUT:
                return ToolResult(f"{label} did not answer within {timeout_s:g} s", True)
            if e.code == CONNECTION_CLOSED:
                srv.status.state = "crashed"
                srv.status.error = f"the server stopped while running {tname!r}{srv.stderr_tail()}"
                return ToolResult(f"MCP server {srv.spec.name!r} stopped while running {tname!r}"
                                  f"{srv.stderr_tail()}", True)
            return ToolResult(f"{label} failed: {e.message}", True)
        except Exception as e:                               # noqa: BLE001 - a bad result, not a crash
            return ToolResult(f"{label} returned a result the app cannot read: {type(_leaf(e)).__name__}: "
                              f"{_leaf(e)}", True)
        return result_to_tool_result(res)
