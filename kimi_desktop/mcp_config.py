"""mcp.json: the MCP servers the app connects to, in the usual shape (Claude Desktop, Cursor, LM Studio).

    config = load_mcp_config()        # default: settings.config_dir() / "mcp.json"; a missing file = no servers
    config.servers                    # {name: StdioServer | HttpServer}, in the file's order
    parse_mcp_config(text)            # the same from text (the settings dialog checks an edit with it)

{"mcpServers": {NAME: {"command": ..., "args": [...], "env": {...}, "cwd": ...} | {"url": ...,
"headers": {...}}}}; an entry with "disabled": true is skipped; "type" may say "stdio", "http" or
"streamable-http". A bad file raises McpConfigError (a ValueError) naming the file, the server and the
field. kimi_desktop.mcp_tools re-exports all of this.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["McpConfig", "McpConfigError", "StdioServer", "HttpServer", "default_mcp_path", "load_mcp_config",
           "parse_mcp_config"]


class McpConfigError(ValueError):
    """mcp.json is not usable; the message names the file, the server and the field."""


@dataclass(frozen=True)
class StdioServer:
    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    transport = "stdio"


@dataclass(frozen=True)
class HttpServer:
    name: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    transport = "http"


@dataclass
class McpConfig:
    servers: dict[str, StdioServer | HttpServer] = field(default_factory=dict)
    path: Path | None = None


def default_mcp_path() -> Path:
    from kimi_desktop.settings import config_dir
    return config_dir() / "mcp.json"


def load_mcp_config(path: str | Path | None = None) -> McpConfig:
    """The servers of the mcp.json at `path`; a missing file is a config with no servers."""
    p = Path(path) if path is not None else default_mcp_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return McpConfig(path=p)
    except (OSError, UnicodeDecodeError) as e:
        raise McpConfigError(f"{p}: cannot read the file: {e}") from None
    cfg = parse_mcp_config(text, str(p))
    cfg.path = p
    return cfg


def _str_map(v: Any, where: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise McpConfigError(f"{where} must be an object of string values")
    return dict(v)


def parse_mcp_config(text: str, where: str = "mcp.json") -> McpConfig:
    """Parse mcp.json text (the settings dialog checks an edit with this before saving)."""
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise McpConfigError(f"{where}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise McpConfigError(f'{where}: expected an object like {{"mcpServers": {{...}}}}')
    entries = data.get("mcpServers", {})
    if not isinstance(entries, dict):
        raise McpConfigError(f"{where}: mcpServers must be an object of server name -> settings")
    servers: dict[str, StdioServer | HttpServer] = {}
    for name, e in entries.items():
        at = f"{where}: server {name!r}"
        if not name.strip():
            raise McpConfigError(f"{where}: a server name must not be empty")
        if not isinstance(e, dict):
            raise McpConfigError(f"{at}: expected an object with command (stdio) or url (HTTP)")
        if e.get("disabled") is True:
            continue
        kind = e.get("type", "http" if "url" in e else "stdio")
        if kind not in ("stdio", "http", "streamable-http", "streamableHttp"):
            raise McpConfigError(f"{at}: type must be stdio, http or streamable-http, got {kind!r}"
                                 + (" (the old SSE transport is not supported)" if kind == "sse" else ""))
        if kind == "stdio":
            cmd = e.get("command")
            if not isinstance(cmd, str) or not cmd.strip():
                raise McpConfigError(f"{at}: command must be a non-empty string (the program to run)")
            args = e.get("args", [])
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise McpConfigError(f"{at}: args must be a list of strings")
            cwd = e.get("cwd")
            if cwd is not None and not isinstance(cwd, str):
                raise McpConfigError(f"{at}: cwd must be a string")
            servers[name] = StdioServer(name, cmd, tuple(args), _str_map(e.get("env"), f"{at}: env") or None, cwd)
        else:
            url = e.get("url")
            if not isinstance(url, str) or not re.match(r"^https?://", url):
                raise McpConfigError(f"{at}: url must be an http:// or https:// address, got {url!r}")
            servers[name] = HttpServer(name, url, _str_map(e.get("headers"), f"{at}: headers"))
    return McpConfig(servers)
