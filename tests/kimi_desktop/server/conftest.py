"""Servers for the API tests: uvicorn in a thread on a free loopback port, over the native engine on a
tiny random checkpoint, and over a scripted engine (same tokenizer, a session that returns fixed
logits per step) for flows a random model cannot be relied on to produce, and over the native engine
on a scripted checkpoint (bigram.py: the real model path writes a fixed reasoning block and tool call)."""

from __future__ import annotations

import pytest

from kimi_desktop.engines.native import NativeEngine
from kimi_desktop.server import LocalServer, create_app

from .helpers import KEY, ScriptedSession


@pytest.fixture(scope="session")
def server_engine(tiny_int4):
    e = NativeEngine(tiny_int4)
    yield e
    e.close()


def _serve(engine, name, **kw) -> LocalServer:
    return LocalServer(create_app(engine, name, **kw), port=0, logs=False).start_in_thread()


@pytest.fixture(scope="session")
def server(server_engine):
    s = _serve(server_engine, "tiny-k2")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def scripted_engine(tiny_int4, server_engine):
    e = NativeEngine(tiny_int4, model=server_engine.model, tokenizer=server_engine.tokenizer)
    e.session, e.pool = ScriptedSession(e.vocab), None          # every request on the scripted session
    yield e
    e.close()


@pytest.fixture(scope="session")
def scripted(scripted_engine):
    """A server over the scripted engine that needs KEY and lets at most one request wait."""
    s = _serve(scripted_engine, "scripted", api_key=KEY, max_queue=1)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def bigram_ckpt(tiny_int4, tmp_path_factory):
    """The scripted checkpoint: greedy decoding after the generation prompt writes BIGRAM_TEXT."""
    from .bigram import BIGRAM_TEXT, make_bigram_model
    return make_bigram_model(tiny_int4, tmp_path_factory.mktemp("bigram") / "ckpt", BIGRAM_TEXT)


@pytest.fixture(scope="session")
def bigram_engine(bigram_ckpt):
    e = NativeEngine(bigram_ckpt)
    yield e
    e.close()


@pytest.fixture(scope="session")
def bigram_server(bigram_engine):
    s = _serve(bigram_engine, "bigram")
    yield s
    s.stop()


@pytest.fixture
def script(scripted_engine):
    """script("text with <|special|> tokens", delay=0.0): what the scripted model writes next."""
    sess = scripted_engine.session

    def set_script(text: str, delay: float = 0.0) -> list[int]:
        sess.script = scripted_engine.tokenizer.encode(text)
        sess.delay = delay
        return sess.script
    yield set_script
    sess.delay = 0.0
    sess.jumps = {}
