"""The local API (design.md section 5a): one FastAPI app over one engine, speaking OpenAI Chat
Completions and Completions; security and queueing are shared by every route.

    from kimi_desktop.server import create_app, LocalServer
    server = LocalServer(create_app(engine, "Kimi-K2"), port=0).start_in_thread()
    server.base_url          # http://127.0.0.1:PORT ; the OpenAI base URL is base_url + "/v1"
    server.stop()
"""

from .app import create_app
from .runner import LocalServer

__all__ = ["create_app", "LocalServer"]
