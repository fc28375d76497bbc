"""The controller without a window, on the scripted engine: streaming, stop, regenerate, edit-and-resend,
restart, context overflow, tool-call hooks, model loading failures."""

from __future__ import annotations

import pytest

from kimi_desktop.conversations import ConversationStore

LONG = "<think></think>" + " a" * 400 + "<|im_end|>"


def finished(qtbot, c, timeout=10_000):
    with qtbot.waitSignal(c.answerFinished, timeout=timeout) as blocker:
        pass
    return blocker.args


def send_and_wait(qtbot, c, text, **kw):
    with qtbot.waitSignal(c.answerFinished, timeout=10_000) as blocker:
        assert c.send(text, **kw)
    return blocker.args


def test_send_streams_the_answer_token_by_token(qtbot, controller, script):
    ids = script("<think>Let me think.</think>Hello there, friend.<|im_end|>", delay=0.02)
    seen = []
    controller.answerUpdated.connect(lambda i: seen.append(controller.messages[i].content))
    idx, reason = send_and_wait(qtbot, controller, "Hi")
    m = controller.messages[idx]
    assert reason == "stop" and m.complete and m.finish == "stop"
    assert m.content == "Hello there, friend." and m.reasoning == "Let me think."
    growing = [s for s in seen if s]
    assert len(set(growing)) >= 3                     # the answer appeared in several steps...
    assert all(b.startswith(a) for a, b in zip(growing, growing[1:]))   # ...each a prefix of the next
    assert len(ids) > len(set(growing)) / 2
    assert [x.role for x in controller.messages] == ["user", "assistant"]


def test_stop_cancels_within_one_token(qtbot, controller, script, scripted_engine):
    script(LONG, delay=0.01)
    sess = scripted_engine.session
    assert controller.send("go")
    qtbot.waitUntil(lambda: len(controller.messages[-1].content) >= 10 or
                    len(controller.turn.result.content) >= 10, timeout=5000)
    with qtbot.waitSignal(controller.answerFinished, timeout=5000) as blocker:
        feeds = sess.feeds
        controller.stop()
    assert blocker.args[1] == "cancelled"
    assert sess.feeds - feeds <= 1                     # at most the forward pass in flight
    m = controller.messages[-1]
    assert m.finish == "cancelled" and 0 < len(m.content) < 800


def test_regenerate_replaces_the_last_answer(qtbot, controller, script):
    script("<think></think>first<|im_end|>")
    send_and_wait(qtbot, controller, "Q")
    script("<think></think>second<|im_end|>")
    with qtbot.waitSignal(controller.answerFinished, timeout=10_000):
        assert controller.regenerate()
    assert [(m.role, m.content) for m in controller.messages] == [("user", "Q"), ("assistant", "second")]
    assert [m.content for m in controller.store.messages(controller.conversation_id)] == ["Q", "second"]


def test_edit_and_resend_drops_what_followed(qtbot, controller, script):
    script("<think></think>one<|im_end|>")
    send_and_wait(qtbot, controller, "first question")
    send_and_wait(qtbot, controller, "second question")
    script("<think></think>edited answer<|im_end|>")
    with qtbot.waitSignal(controller.answerFinished, timeout=10_000):
        assert controller.edit_and_resend(0, "better question")
    assert [(m.role, m.content) for m in controller.messages] == [("user", "better question"),
                                                                  ("assistant", "edited answer")]
    with pytest.raises(ValueError, match="not a user message"):
        controller.edit_and_resend(1, "x")


def test_a_conversation_survives_a_restart(qtbot, controller, script, store, scripted_engine, wrap_engine):
    from kimi_desktop.ui.controller import Controller

    script("<think>hm</think>kept<|im_end|>")
    controller.set_settings("Be brief.", {"temperature": 0.5, "max_tokens": 64})
    send_and_wait(qtbot, controller, "remember me")
    cid = controller.conversation_id
    path = store.path
    controller.shutdown()

    again = Controller(ConversationStore(path), wrap_engine(scripted_engine), "scripted")
    try:
        assert [c.id for c in again.conversations()] == [cid]
        again.open_conversation(cid)
        assert [(m.role, m.content, m.reasoning, m.complete) for m in again.messages] == [
            ("user", "remember me", "", True), ("assistant", "kept", "hm", True)]
        assert again.settings() == ("Be brief.", {"temperature": 0.5, "max_tokens": 64})
        assert again.conversations()[0].title == "remember me"
    finally:
        again.shutdown()


def test_an_overlong_conversation_asks_before_sending(qtbot, controller, script, scripted_engine):
    script("<think></think>ok<|im_end|>")
    ctx = scripted_engine.ctx
    controller.set_settings("SYSTEM PROMPT", {})
    tok = scripted_engine.tokenizer
    per_100 = len(tok.encode("word " * 100))
    big = "word " * (ctx * 35 // per_100)                 # 35% of the context each
    third = "the third " + "word " * (ctx * 20 // per_100)
    send_and_wait(qtbot, controller, big)
    send_and_wait(qtbot, controller, big)
    n_before = len(controller.messages)
    with qtbot.waitSignal(controller.contextOverflow, timeout=2000) as asked:
        assert not controller.send(third)
    info = asked.args[0]
    assert info["context"] == ctx and info["prompt_tokens"] + info["reserve"] > ctx
    assert len(controller.messages) == n_before          # nothing was sent or stored
    assert not controller.resolve_overflow("stop")
    sent = []
    scripted_engine_chat = scripted_engine.chat

    def spy(messages, **kw):
        sent.append(messages)
        return scripted_engine_chat(messages, **kw)
    controller.engine.chat = spy
    with qtbot.waitSignal(controller.contextOverflow, timeout=2000):
        controller.send(third)
    notes = []
    controller.notice.connect(notes.append)
    with qtbot.waitSignal(controller.answerFinished, timeout=10_000):
        assert controller.resolve_overflow("drop")
    msgs = sent[-1]
    assert msgs[0] == {"role": "system", "content": "SYSTEM PROMPT"}      # the system prompt is kept
    assert msgs[-1]["content"] == third.strip() and len(msgs) < n_before + 2
    assert any("left out the" in n for n in notes)
    assert [m.content for m in controller.messages][:2] == [big.strip(), "ok"]    # the history itself is kept


def test_attachments_go_into_the_message_with_their_name(qtbot, controller, script, tmp_path):
    script("<think></think>read it<|im_end|>")
    f = tmp_path / "notes.txt"
    f.write_text("line one\nline two\n")
    send_and_wait(qtbot, controller, "summarise", attachments=[f])
    assert controller.messages[0].content == "summarise\n\n**notes.txt**\n```\nline one\nline two\n```"
    b = tmp_path / "blob.bin"
    b.write_bytes(b"\xff\xfe\x00")
    notes = []
    controller.notice.connect(notes.append)
    assert not controller.send("x", attachments=[b])
    assert notes == ["cannot attach blob.bin: not a UTF-8 text file"]


CALL = ('<think>Need the weather.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')


def test_tool_calls_reach_the_hook_and_the_turn_continues(qtbot, controller, script):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    controller.tool_provider = lambda: tools
    calls = []

    def on_calls(c, index):
        calls.append(c.messages[index].tool_calls)
        c.add_tool_result(c.messages[index].tool_calls[0]["id"], "sunny")
        script("<think></think>It is sunny in Paris.<|im_end|>")
        c.continue_turn()
    controller.on_tool_calls = on_calls
    script(CALL)
    with qtbot.waitSignals([controller.answerFinished, controller.answerFinished], timeout=10_000):
        controller.send("weather in Paris?")
    qtbot.waitUntil(lambda: not controller.busy, timeout=5000)
    assert calls == [[{"id": "functions.get_weather:0", "name": "get_weather", "arguments": '{"city": "Paris"}'}]]
    assert [m.role for m in controller.messages] == ["user", "assistant", "tool", "assistant"]
    assert controller.messages[1].finish == "tool_calls" and controller.messages[3].content == "It is sunny in Paris."
    chat = controller.store.chat_messages(controller.conversation_id)
    assert chat[2] == {"role": "tool", "content": "sunny", "tool_call_id": "functions.get_weather:0"}


def test_a_model_that_fails_to_load_reports_file_and_problem(qtbot, store, tmp_path):
    from kimi_desktop.ui.controller import Controller

    c = Controller(store)
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{ nope")
    with qtbot.waitSignal(c.modelFailed, timeout=10_000) as blocker:
        c.load_model("native", str(bad))
    where, problem = blocker.args
    assert where == str(bad)
    assert "config.json" in problem and "Traceback" not in problem and "\n" not in problem
    assert c.engine is None
    notes = []
    c.notice.connect(notes.append)
    assert not c.send("hi") and "no model is loaded" in notes[0]
    c.shutdown()


def test_status_reports_live_figures(qtbot, controller, script):
    script("<think></think>" + " b" * 60 + "<|im_end|>", delay=0.01)
    snaps = []
    controller.statusChanged.connect(snaps.append)
    send_and_wait(qtbot, controller, "go")
    s = controller.poll_status()
    assert s["context_size"] == controller.engine.ctx and s["context_used"] > 0
    assert s["ram_bytes"] > 0 and s["tok_s"] > 0 and s["ttft_s"] is not None
    assert any(x["generating"] for x in snaps)


def test_the_models_recommended_sampling_fills_what_a_conversation_leaves_unset(qtbot, controller, script):
    """As the server does: generation_config.json's values (the demo model's is greedy) apply to the
    fields a conversation does not set; the conversation's own values win."""
    seen = []
    chat = controller.engine.chat
    controller.engine.generation_defaults = lambda: {"temperature": 0.0, "top_p": 0.5}
    controller.engine.chat = lambda *a, sampling, **kw: seen.append(sampling) or chat(*a, sampling=sampling, **kw)
    script("fine<|im_end|>")
    send_and_wait(qtbot, controller, "a")
    controller.set_settings("", {"temperature": 0.7})
    script("fine<|im_end|>")
    send_and_wait(qtbot, controller, "b")
    assert [(s.temperature, s.top_p) for s in seen] == [(0.0, 0.5), (0.7, 0.5)]
    assert controller.model_defaults() == {"temperature": 0.0, "top_p": 0.5}
