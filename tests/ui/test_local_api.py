"""The in-app local API (ui/local_api.py): the toggle serves the chat's engine at the shown URL behind
the key, the copy buttons, stopping, a taken port, unloading the model, the key across restarts."""

from __future__ import annotations

import gc
import os
import re
import socket
import threading
import time
import weakref

import openai
import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QLineEdit

from kimi_desktop.settings import Settings
from kimi_desktop.ui.controller import Controller
from kimi_desktop.ui.main_window import MainWindow
from tests.kimi_desktop.server.helpers import raw

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def config(tmp_path, monkeypatch):
    """Settings in a config dir of this test (KIMI_DESKTOP_CONFIG_DIR), serving on a free port."""
    monkeypatch.setenv("KIMI_DESKTOP_CONFIG_DIR", str(tmp_path / "config"))
    s = Settings.load()
    s.local_api["port"] = 0
    s.save()
    return s


def open_window(qtbot, store, engine, settings, label="scripted") -> MainWindow:
    w = MainWindow(Controller(store, engine, label, status_interval_s=0), settings=settings)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    return w


@pytest.fixture
def window(qtbot, store, scripted_engine, wrap_engine, config):
    w = open_window(qtbot, store, wrap_engine(scripted_engine), config)
    yield w
    w.c.shutdown()


def toggle(qtbot, w, until: str) -> float:
    """Flip the Local API action; returns the seconds the UI thread spent in it."""
    t0 = time.perf_counter()
    w.local_api.action.trigger()
    took = time.perf_counter() - t0
    qtbot.waitUntil(lambda: w.local_api.state == until, timeout=15_000)
    return took


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def port_of(url: str) -> int:
    return int(re.fullmatch(r"http://127\.0\.0\.1:(\d+)/v1", url).group(1))


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_toggle_serves_the_chat_engine_behind_the_key(qtbot, window, script):
    api, panel = window.local_api, window.api_panel
    window.model_menu.aboutToShow.emit()
    assert api.action in window.model_menu.actions() and api.action.isCheckable()
    window.local_api.action.trigger()
    assert api.state == "starting" and panel.isVisible()       # the UI thread did not wait for the server
    qtbot.waitUntil(lambda: api.state == "running", timeout=15_000)
    url = panel.url.text()
    assert port_of(url) > 0 and url == api.url and "running" in panel.status.text()
    assert api.action.isChecked() and panel.toggle.text() == "Stop" and not panel.port.isEnabled()
    key = api.key()
    assert panel.key.text() == key and panel.key.echoMode() == QLineEdit.Password and len(key) >= 32
    script("<think></think>Hello from the API.<|im_end|>")
    answer = client(url, key).chat.completions.create(model="any", messages=HI)
    assert answer.choices[0].message.content == "Hello from the API."
    with pytest.raises(openai.AuthenticationError):
        client(url, "not-the-key").chat.completions.create(model="any", messages=HI)
    assert raw(api.server, "POST", "/v1/chat/completions", {"model": "m", "messages": HI})[0] == 401


def test_chat_and_api_requests_share_the_engine(qtbot, window, script):
    api = window.local_api
    toggle(qtbot, window, "running")
    script("<think></think>" + " step" * 30 + "<|im_end|>", delay=0.01)
    got = {}
    with qtbot.waitSignal(window.c.answerFinished, timeout=20_000):
        assert window.c.send("from the window")
        th = threading.Thread(target=lambda: got.setdefault("api", client(api.url, api.key()).chat.completions.create(
            model="m", messages=HI).choices[0].message.content))
        th.start()
    qtbot.waitUntil(lambda: not th.is_alive(), timeout=20_000)
    want = " ".join(["step"] * 30)
    assert window.c.messages[-1].content.strip() == want and got["api"].strip() == want


def test_copy_buttons_and_show(qtbot, window):
    panel = window.api_panel
    window.show_local_api()
    assert panel.isVisible() and not panel.copy_url.isEnabled()    # port 0: no URL until it runs
    toggle(qtbot, window, "running")
    qtbot.mouseClick(panel.copy_url, Qt.LeftButton)
    assert QGuiApplication.clipboard().text() == window.local_api.url == panel.url.text()
    qtbot.mouseClick(panel.copy_key, Qt.LeftButton)
    assert QGuiApplication.clipboard().text() == window.local_api.key() == panel.key.text()
    qtbot.mouseClick(panel.show_key, Qt.LeftButton)
    assert panel.key.echoMode() == QLineEdit.Normal and panel.show_key.text() == "Hide"
    qtbot.mouseClick(panel.show_key, Qt.LeftButton)
    assert panel.key.echoMode() == QLineEdit.Password


def test_toggle_off_and_closing_the_window_stop_the_server(qtbot, store, scripted_engine, wrap_engine, config):
    w = open_window(qtbot, store, wrap_engine(scripted_engine), config)
    blocked = {"start": toggle(qtbot, w, "running")}
    port = port_of(w.local_api.url)
    assert w.api_button.text() == "Local API · on"
    t0 = time.perf_counter()
    w.local_api.action.trigger()
    blocked["stop"] = time.perf_counter() - t0
    assert w.local_api.state == "stopping"                      # the stop runs on the worker
    qtbot.waitUntil(lambda: w.local_api.state == "stopped", timeout=15_000)
    assert refused(port) and w.local_api.server is None and not w.local_api.action.isChecked()
    assert w.api_panel.status.text() == "stopped" and w.api_button.text() == "Local API"
    toggle(qtbot, w, "running")
    port = port_of(w.local_api.url)
    w.close()                                                   # closeEvent: shutdown stops it first
    assert refused(port) and w.local_api.state == "stopped"
    print(f"\nUI thread in the toggle: start {blocked['start'] * 1e3:.1f} ms, stop {blocked['stop'] * 1e3:.1f} ms")


def test_a_port_in_use_is_said_and_the_app_goes_on(qtbot, window, script):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        window.show_local_api()
        window.api_panel.port.setValue(taken.getsockname()[1])
        window.local_api.action.trigger()
        api = window.local_api
        assert api.state == "stopped" and not api.action.isChecked() and api.server is None
        status = window.api_panel.status
        assert f"port {taken.getsockname()[1]} is in use" in status.text() and status.objectName() == "errorLabel"
    finally:
        taken.close()
    script("<think></think>still here<|im_end|>")
    with qtbot.waitSignal(window.c.answerFinished, timeout=10_000):
        assert window.c.send("hello?")
    assert window.c.messages[-1].content == "still here"
    toggle(qtbot, window, "running")                            # the port is free now
    assert port_of(window.local_api.url) == window.api_panel.port.value()


def test_switching_the_model_restarts_the_server_on_the_new_engine(qtbot, window, scripted_engine, wrap_engine,
                                                                  script):
    toggle(qtbot, window, "running")
    old = window.local_api.server
    window.c.set_engine(wrap_engine(scripted_engine), "other")
    assert old.ready.is_set() and not old._thread.is_alive()    # stopped before the old engine closed
    qtbot.waitUntil(lambda: window.local_api.state == "running", timeout=15_000)
    assert window.local_api.server is not old
    script("<think></think>new engine<|im_end|>")
    c = client(window.local_api.url, window.local_api.key())
    assert c.models.list().data[0].id == "other"
    assert c.chat.completions.create(model="m", messages=HI).choices[0].message.content == "new engine"


def test_unload_stops_the_server_closes_the_engine_and_frees_it(qtbot, store, tiny_int4, config):
    import psutil

    from kimi_desktop.engines.native import NativeEngine
    engine = NativeEngine(tiny_int4, expert_cache_bytes=0)
    gone, model_gone = weakref.ref(engine), weakref.ref(engine.model)
    w = open_window(qtbot, store, engine, config, label="tiny")
    del engine
    assert w.send_button.isEnabled()
    toggle(qtbot, w, "running")
    port = port_of(w.local_api.url)
    assert client(w.local_api.url, w.local_api.key()).chat.completions.create(
        model="m", messages=HI, max_tokens=3).choices[0].finish_reason == "length"
    rss = psutil.Process(os.getpid()).memory_info().rss
    closed = gone()
    t0 = time.perf_counter()
    w.unload_action.trigger()
    took = time.perf_counter() - t0
    assert w.local_api.state == "stopped" and refused(port) and closed._closed
    del closed
    gc.collect()
    assert gone() is None, [type(r).__name__ for r in gc.get_referrers(gone())]
    assert model_gone() is None
    print(f"\nunload took {took * 1e3:.0f} ms on the UI thread (server stop + engine close); RSS "
          f"{rss / 2**20:.0f} MiB before, {psutil.Process(os.getpid()).memory_info().rss / 2**20:.0f} MiB after")
    assert not w.send_button.isEnabled() and "No model is loaded" in w.input.placeholderText()
    assert w.model_button.text() == "Load a model" and not w.unload_action.isEnabled()
    assert "unloaded" in w.api_panel.status.text()
    w.local_api.action.trigger()                                # no model: said, not started
    assert w.local_api.state == "stopped" and "no model is loaded" in w.api_panel.status.text()
    w.c.shutdown()


def test_the_key_and_port_persist_across_a_restart(qtbot, tmp_path, scripted_engine, wrap_engine, config):
    from kimi_desktop.conversations import ConversationStore
    db = tmp_path / "conversations.sqlite3"
    first = open_window(qtbot, ConversationStore(db), wrap_engine(scripted_engine), Settings.load())
    first.show_local_api()
    first.api_panel.port.setValue(0)
    key = first.api_panel.key.text()
    assert key and Settings.load().local_api == {"port": 0, "api_key": key}
    first.c.shutdown()
    first.close()
    path = tmp_path / "config" / "settings.json"
    assert path.stat().st_mode & 0o777 == 0o600
    again = open_window(qtbot, ConversationStore(db), wrap_engine(scripted_engine), Settings.load())
    assert again.local_api.key() == key
    again.show_local_api()
    assert again.api_panel.key.text() == key
    again.c.shutdown()
