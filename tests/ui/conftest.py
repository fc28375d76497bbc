"""Qt app tests: offscreen (set here, before anything imports Qt), pytest-qt's qtbot, a store in
tmp, and two engines on the tiny random checkpoint: the real one and a scripted one (its session puts
all the mass on the next token of a script, so answers are exact; `delay` slows each forward pass),
shared with the API tests."""

from __future__ import annotations

import gc
import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"
os.environ.setdefault("PYTEST_QT_API", "pyside6")

import pytest  # noqa: E402

pytest.importorskip("PySide6")

from kimi_desktop.conversations import ConversationStore  # noqa: E402

# the API tests' engines: the tiny random model, and the scripted one (script(text, delay) sets its answer)
from tests.kimi_desktop.server.conftest import script, scripted_engine, server_engine  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _collect_on_the_ui_thread():
    """Collect each test's garbage here: a collection that a worker thread (uvicorn, an engine) happens
    to trigger would otherwise destroy Qt objects off the UI thread (a segfault). What survives is
    frozen (gc.freeze): later collections skip it, so this costs milliseconds, not a full collection."""
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture
def store(tmp_path):
    s = ConversationStore(tmp_path / "conversations.sqlite3")
    yield s
    s.close()


class _Engine:
    """Lets the session-scoped engines outlive a controller's shutdown()."""

    def __init__(self, engine):
        self._e = engine

    def close(self):
        pass

    def __getattr__(self, name):
        return getattr(self._e, name)


@pytest.fixture
def controller(qtbot, store, scripted_engine):  # noqa: F811 - the fixture imported above
    from kimi_desktop.ui.controller import Controller
    c = Controller(store, _Engine(scripted_engine), "scripted")
    yield c
    c.shutdown()


@pytest.fixture
def wrap_engine():
    return _Engine
