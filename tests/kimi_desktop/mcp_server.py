"""A small MCP server for the tests (the mcp SDK's MCPServer, FastMCP's name in mcp 2.x), run as a
subprocess: `python mcp_server.py` (stdio) or `python mcp_server.py --http PORT` (streamable HTTP).
Importing this module starts nothing; stdio_config() builds the mcp.json entry that runs it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()


def stdio_config(*names: str) -> dict:
    """An mcp.json dict with one stdio server per name, each running this script."""
    return {"mcpServers": {n: {"command": sys.executable, "args": [str(SCRIPT)], "env": {"DEMO_NAME": n}}
                           for n in names}}


def bad_result_server() -> None:
    """A hand-written JSON-RPC server that speaks just enough MCP and answers tools/call with a result
    that is not a CallToolResult (content must be a list)."""
    import json
    for line in sys.stdin:
        msg = json.loads(line)
        if "id" not in msg:
            continue                                    # notifications
        if msg["method"] == "initialize":
            result = {"protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
                      "serverInfo": {"name": "bad", "version": "0"}}
        elif msg["method"] == "tools/list":
            result = {"tools": [{"name": "garble", "inputSchema": {"type": "object"}}]}
        elif msg["method"] == "tools/call":
            result = {"content": "not a list", "isError": "maybe"}
        else:
            print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "no"}}),
                  flush=True)
            continue
        print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}), flush=True)


def main() -> None:
    if sys.argv[1:] == ["--bad-result"]:
        return bad_result_server()
    from mcp.server.mcpserver import MCPServer

    app = MCPServer("kimi-test")

    @app.tool()
    def add(a: int, b: int) -> str:
        """Add two integers."""
        return str(a + b)

    @app.tool(name="weather.now")
    def weather(city: str) -> str:
        """The weather in a city (a name with a dot: not valid for K2 as it is)."""
        return f"{os.environ.get('DEMO_NAME', '?')}: sunny in {city}"

    @app.tool()
    def nap(seconds: float) -> str:
        """Sleep, then answer."""
        time.sleep(seconds)
        return "awake"

    @app.tool()
    def crash() -> str:
        """Kill the server in the middle of the call."""
        print("about to crash", file=sys.stderr, flush=True)
        os._exit(3)

    if sys.argv[1:2] == ["--http"]:                   # streamable HTTP on 127.0.0.1:PORT/mcp
        app.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        app.run()


if __name__ == "__main__":
    main()
