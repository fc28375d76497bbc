"""The FastAPI app: one engine, the OpenAI routes, /health and /v1/models, behind the shared guard.

    app = create_app(engine, model_name="Kimi-K2-Thinking", api_key=None, host="127.0.0.1")

Any model name a request asks for is served by the loaded model (as llama-server does: clients send
their own names); /v1/models lists the loaded one with its context length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request

from kimi_desktop import __version__

from .admission import Admission
from .errors import install_handlers
from .openai_api import router as openai_router
from .security import Guard, is_loopback


@dataclass
class ServerState:
    engine: object
    model_name: str
    context_length: int | None
    admission: Admission
    fingerprint: str
    created: int = field(default_factory=lambda: int(time.time()))


def engine_context(engine) -> int | None:
    try:
        n = engine.stats().get("context_size")
    except Exception:               # noqa: BLE001 - a remote engine may not know it
        return None
    return int(n) if n else None


def create_app(engine, model_name: str, *, api_key: str | None = None, host: str = "127.0.0.1",
               max_queue: int = 16, max_body_bytes: int = 32 << 20) -> FastAPI:
    """The ASGI app (the guard wraps it). host: the address the server binds; a loopback one turns
    the Host-header check on."""
    app = FastAPI(title="kimi-desktop local API", version=__version__, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible Chat Completions and Completions on a local Kimi K2.")
    kind = getattr(engine, "kind", "engine")
    app.state.kimi = ServerState(engine=engine, model_name=model_name, context_length=engine_context(engine),
                                 admission=Admission(max_queue), fingerprint=f"kimi-desktop-{__version__}-{kind}")
    install_handlers(app)
    app.include_router(openai_router)

    @app.get("/health")
    async def health(request: Request):
        st: ServerState = request.app.state.kimi
        return {"status": "ok", "model": st.model_name, "waiting": max(st.admission.held() - 1, 0)}

    @app.get("/v1/models")
    async def models(request: Request):
        st: ServerState = request.app.state.kimi
        return {"object": "list", "data": [_model_entry(st)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        st: ServerState = request.app.state.kimi
        return {**_model_entry(st), "id": name}

    app.add_middleware(Guard, api_key=api_key, check_host=is_loopback(host), max_body_bytes=max_body_bytes)
    return app


def _model_entry(st: ServerState) -> dict:
    return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "kimi-desktop",
            "context_length": st.context_length, "meta": {"n_ctx": st.context_length}}
