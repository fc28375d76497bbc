"""The FastAPI app: one engine, every API's routes, /health, /metrics and /v1/models, behind the guards.

    app = create_app(engine, model_name="Kimi-K2-Thinking", api_key=None, host="127.0.0.1",
                     allowed_hosts=(), cors_origins=(), strict_model=False)

Any model name a request asks for is served by the loaded model (as llama-server does: clients send
their own names, Claude Code other ones for background calls); /v1/models lists the loaded one with
its context length. strict_model: a request body naming another model gets 404 model_not_found.
Middlewares, outermost first: request counting (metrics.py), the Host check, CORS (only with
origins), the key and body guard (security.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from anyio import to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from kimi_desktop import __version__

from .admission import Admission
from .anthropic_api import router as anthropic_router
from .errors import APIError, install_handlers
from .metrics import CONTENT_TYPE, CountRequests, Metrics
from .openai_api import router as openai_router
from .responses_api import router as responses_router
from .security import Guard, HostGuard, accepted_hosts, cors


@dataclass
class ServerState:
    engine: object
    model_name: str
    context_length: int | None
    admission: Admission
    fingerprint: str
    strict_model: bool = False
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))


def engine_context(engine) -> int | None:
    try:
        n = engine.stats().get("context_size")
    except Exception:               # noqa: BLE001 - a remote engine may not know it
        return None
    return int(n) if n else None


def not_served(name: str, st: ServerState) -> APIError:
    return APIError(404, f"the model {name!r} is not served here: this server serves {st.model_name!r} "
                         f"(--strict-model)", "model", "model_not_found")


async def check_model_name(request: Request) -> None:
    """With --strict-model, a POST body naming another model is refused (before its own validation;
    a body that is not JSON is left to that)."""
    st: ServerState = request.app.state.kimi
    if not st.strict_model or request.method != "POST":
        return
    try:
        body = await request.json()
    except Exception:                   # noqa: BLE001 - the route's validation names the problem
        return
    name = body.get("model") if isinstance(body, dict) else None
    if isinstance(name, str) and name != st.model_name:
        raise not_served(name, st)


def create_app(engine, model_name: str, *, api_key: str | None = None, host: str = "127.0.0.1",
               allowed_hosts=(), cors_origins=(), strict_model: bool = False,
               max_queue: int = 16, max_body_bytes: int = 32 << 20) -> FastAPI:
    """The ASGI app (the guards wrap it). host: the address the server binds, which with
    allowed_hosts decides the Host names it answers (security.accepted_hosts); cors_origins: the
    browser origins allowed (none: CORS off)."""
    app = FastAPI(title="kimi-desktop local API", version=__version__, docs_url=None, redoc_url=None,
                  dependencies=[Depends(check_model_name)],
                  description="OpenAI Chat Completions, Completions and Responses and Anthropic Messages "
                              "on a local Kimi K2.")
    kind = getattr(engine, "kind", "engine")
    app.state.kimi = ServerState(engine=engine, model_name=model_name, context_length=engine_context(engine),
                                 admission=Admission(max_queue), fingerprint=f"kimi-desktop-{__version__}-{kind}",
                                 strict_model=strict_model)
    install_handlers(app)
    app.include_router(openai_router)
    app.include_router(responses_router)
    app.include_router(anthropic_router)

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
        if st.strict_model and name != st.model_name:
            raise not_served(name, st)
        return {**_model_entry(st), "id": name}

    @app.get("/metrics", response_class=Response)
    async def metrics(request: Request):
        st: ServerState = request.app.state.kimi
        stats = await to_thread.run_sync(_engine_stats, st.engine)
        text = st.metrics.render(stats, waiting_fallback=max(st.admission.held() - 1, 0))
        return Response(text, media_type=CONTENT_TYPE)

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    if cors_origins:
        app.add_middleware(cors, origins=tuple(cors_origins))
    app.add_middleware(HostGuard, accepted=accepted_hosts(host, allowed_hosts))
    app.add_middleware(CountRequests, metrics=app.state.kimi.metrics, known_paths=lambda: _plain_paths(app))
    return app


def _engine_stats(engine) -> dict:
    try:
        s = engine.stats()
    except Exception:                   # noqa: BLE001 - a scrape must not fail on the engine's account
        return {}
    return s if isinstance(s, dict) else {}


def _plain_paths(app: FastAPI) -> set[str]:
    return {r.path for r in app.routes if "{" not in getattr(r, "path", "{")}


def _model_entry(st: ServerState) -> dict:
    return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "kimi-desktop",
            "context_length": st.context_length, "meta": {"n_ctx": st.context_length}}
