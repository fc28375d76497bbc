"""The local API: one FastAPI app over one engine, speaking OpenAI Chat Completions, Completions and
Responses (openai_api, responses_api) and Anthropic Messages (anthropic_api); security (security.py),
errors in each API's shape (errors.py), queueing and streaming (admission.py, streaming.py) and
/metrics are shared by every route.

    from kimi_desktop.server import create_app, LocalServer
    server = LocalServer(create_app(engine, "Kimi-K2"), port=0).start_in_thread()
    server.base_url          # http://127.0.0.1:PORT ; the OpenAI base URL is base_url + "/v1"
    server.stop()
"""

from .app import create_app
from .runner import LocalServer

__all__ = ["create_app", "LocalServer"]
