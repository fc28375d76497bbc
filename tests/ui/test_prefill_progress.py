"""Issue 14, app side: the prompt-reading bar follows PrefillProgress and hides at the first text; the
"Clear saved KV cache" button empties the KV folder and says what it freed (or why it could not)."""

from __future__ import annotations

from kimi_desktop.chat import PrefillProgress
from kimi_desktop.ui import status_bar
from kimi_desktop.ui.controller import Controller
from kimi_desktop.ui.status_bar import StatusPanel, format_status
from tests.ui.test_controller import send_and_wait


class _Stream:
    """Three progress events, then the scripted engine's own stream."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        for done in (512, 1024, 1500):
            yield PrefillProgress(done, 1500)
        yield from self.inner

    def cancel(self):
        self.inner.cancel()


def test_prefill_bar_shows_progress_then_hides(qtbot, store, scripted_engine, wrap_engine, script):
    class Eng(wrap_engine):
        def chat(self, *a, **k):
            return _Stream(self._e.chat(*a, **k))

    script("Hi there.<|im_end|>")
    c = Controller(store, Eng(scripted_engine), "scripted")
    panel = StatusPanel()
    qtbot.addWidget(panel)
    c.prefillProgress.connect(panel.show_prefill)
    seen = []
    c.prefillProgress.connect(lambda d, t: seen.append((d, t)))
    try:
        _, reason = send_and_wait(qtbot, c, "Hi")
    finally:
        c.shutdown()
    assert reason == "stop"
    assert seen[:3] == [(512, 1500), (1024, 1500), (1500, 1500)] and seen[-1] == (0, 0)
    assert panel.prefill.isHidden()


def test_prefill_bar_values_and_text(qtbot):
    panel = StatusPanel()
    qtbot.addWidget(panel)
    panel.resize(1400, 40)
    panel.show_prefill(700, 2000)
    assert not panel.prefill.isHidden()
    assert (panel.prefill.value(), panel.prefill.maximum()) == (700, 2000)
    assert panel.prefill.text() == "Reading the prompt: 700 / 2000 tokens"
    panel.show()
    panel.grab().save("/tmp/h6-progress.png")
    panel.show_prefill(0, 0)
    assert panel.prefill.isHidden()


def test_clear_button_empties_the_kv_folder(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kv = tmp_path / "kimi-desktop" / "kv"
    kv.mkdir(parents=True)
    (kv / "x.kv.safetensors").write_bytes(b"\0" * (3 * 2**20))
    panel = StatusPanel()
    qtbot.addWidget(panel)
    panel.clear_kv.click()
    assert not (kv / "x.kv.safetensors").exists()
    assert panel.kv_message.text() == "Freed 3.0 MiB"
    panel.resize(1400, 40)
    panel.show()
    panel.grab().save("/tmp/h6-clear.png")


def test_clear_button_reports_an_oserror(qtbot, monkeypatch):
    def boom():
        raise PermissionError("locked")
    monkeypatch.setattr(status_bar.kv_store, "clear_kv_cache", boom)
    panel = StatusPanel()
    qtbot.addWidget(panel)
    panel.clear_kv.click()
    assert panel.kv_message.text() == "Could not clear the KV cache: locked"


def test_status_shows_the_kv_figures():
    t = format_status({"kv_sessions": 3, "kv_ram_bytes": 5 * 2**20, "kv_disk_bytes": 2 * 2**30})
    assert t["kv"] == "KV 3 conv, RAM 5 MiB, disk 2.00 GiB"
    assert format_status({})["kv"] == ""
