"""PrefillProgress events (long prompts) are tolerated by every API's event consumer: no output of their own."""

from __future__ import annotations

from kimi_desktop.chat import ChatResult, ContentDelta, Finish, PrefillProgress
from kimi_desktop.server.anthropic_api import Blocks
from kimi_desktop.server.openai_api import _chat_chunker, _completion_chunker
from kimi_desktop.server.responses_output import Output


class _Turn:
    id, created, model, fingerprint = "chatcmpl-x", 0, "m", "fp"

    def timings(self) -> dict:
        return {}


def test_openai_chunkers_send_nothing_for_progress_and_open_on_the_first_token():
    chat = _chat_chunker(_Turn(), False)
    assert chat(PrefillProgress(512, 1024)) == [] and chat(PrefillProgress(1024, 1024)) == []
    first = chat(ContentDelta("hi"))
    assert [c["choices"][0]["delta"] for c in first] == [{"role": "assistant", "content": ""}, {"content": "hi"}]
    text = _completion_chunker(_Turn(), False, "echo ", False)
    assert text(PrefillProgress(1, 2)) == []
    assert [c["choices"][0]["text"] for c in text(ContentDelta("x"))] == ["echo ", "x"]


def test_other_consumers_ignore_progress():
    assert Blocks().feed(PrefillProgress(1, 2)) == [] and Output().feed(PrefillProgress(1, 2)) == []
    r = ChatResult()
    for ev in (PrefillProgress(1, 2), ContentDelta("a"), Finish("stop")):
        r.add(ev)
    assert r.content == "a" and r.finish_reason == "stop"


def test_metrics_show_prefill_progress_and_kv_bytes_from_stats():
    from kimi_desktop.server.metrics import Metrics
    text = Metrics().render({"prefill_done": 512, "prefill_total": 2048, "kv_sessions": 3,
                             "kv_ram_bytes": 7_000_000, "kv_disk_bytes": 0})
    lines = set(text.splitlines())
    assert {"kimi_desktop_prefill_done 512", "kimi_desktop_prefill_total 2048", "kimi_desktop_kv_sessions 3",
            "kimi_desktop_kv_ram_bytes 7000000", "kimi_desktop_kv_disk_bytes 0"} <= lines
