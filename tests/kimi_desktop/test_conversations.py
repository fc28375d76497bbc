"""The conversation store: schema and migrations, messages, streaming writes, search, export."""

from __future__ import annotations

import json
import sqlite3

import pytest

from kimi_desktop.conversations import (MIGRATIONS, SCHEMA_VERSION, ConversationStore, Message, SchemaError,
                                        StreamWriter)


@pytest.fixture
def store(tmp_path):
    s = ConversationStore(tmp_path / "c.sqlite3")
    yield s
    s.close()


def test_a_version_1_database_is_migrated_and_keeps_its_messages(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.execute("INSERT INTO conversations (title, created, updated) VALUES ('old', 1, 1)")
    db.execute("INSERT INTO messages (conversation, position, role, content, created) VALUES (1, 0, 'user', "
               "'hello from v1', 1)")
    db.commit()
    db.close()
    s = ConversationStore(path)
    try:
        assert s.version == SCHEMA_VERSION == 2
        (m,) = s.messages(1)
        assert (m.content, m.finish, m.complete) == ("hello from v1", "", True)
        assert [h.conversation for h in s.search("hello")] == [1]      # indexed when FTS was added
    finally:
        s.close()


def test_a_database_from_a_newer_version_is_refused_clearly(tmp_path):
    path = tmp_path / "new.sqlite3"
    ConversationStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(SchemaError, match=r"new\.sqlite3: schema version 99 was written by a newer"):
        ConversationStore(path)


def test_the_database_uses_wal(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_messages_rename_truncate_delete(store):
    a = store.create("A", system_prompt="Be kind.", sampling={"temperature": 0.3})
    b = store.create("B")
    for text in ("one", "two", "three"):
        store.add_message(a, Message("user", text))
    assert [m.position for m in store.messages(a)] == [0, 1, 2]
    store.truncate(a, 1)
    assert [m.content for m in store.messages(a)] == ["one"]
    store.rename(a, "Renamed")
    assert [c.title for c in store.conversations()] == ["Renamed", "B"]     # most recently updated first
    assert store.get(a).sampling == {"temperature": 0.3}
    store.delete(a)
    assert [c.id for c in store.conversations()] == [b]
    assert store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    with pytest.raises(KeyError):
        store.get(a)


def test_history_in_the_chat_api_shape(store):
    cid = store.create("t", system_prompt="SYS")
    store.add_message(cid, Message("user", "weather?"))
    store.add_message(cid, Message("assistant", "", reasoning="look it up",
                                   tool_calls=[{"id": "functions.w:0", "name": "w", "arguments": "{}"}]))
    store.add_message(cid, Message("tool", "sunny", tool_call_id="functions.w:0"))
    assert store.chat_messages(cid) == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "look it up",
         "tool_calls": [{"id": "functions.w:0", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "functions.w:0"},
    ]


def test_a_streaming_answer_is_written_at_most_every_interval_and_at_the_end(store):
    now = [100.0]
    cid = store.create("t")
    m = Message("assistant")
    store.add_message(cid, m)
    w = StreamWriter(store, m, interval=0.5, clock=lambda: now[0])
    m.complete = False
    stored = lambda: store.messages(cid)[0]            # noqa: E731
    assert not w.update(content="He")                  # too soon
    assert stored().content == ""
    now[0] += 0.6
    assert w.update(content="Hello")
    assert (stored().content, stored().complete) == ("Hello", False)
    assert not w.update(content="Hello wor", reasoning="r")
    w.finish(complete=True, finish="stop")
    got = stored()
    assert (got.content, got.reasoning, got.complete, got.finish) == ("Hello wor", "r", True, "stop")
    assert w.writes == 2


def test_search_every_message_by_words_and_prefixes(store):
    a = store.create("Rust")
    b = store.create("Cooking")
    store.add_message(a, Message("user", "How do lifetimes work in Rust?"))
    store.add_message(b, Message("assistant", "Simmer the tomatoes", reasoning="the user wants pasta"))
    assert [(h.conversation, h.position) for h in store.search("lifetim")] == [(a, 0)]
    assert [h.conversation for h in store.search("pasta")] == [b]                   # reasoning too
    assert store.search('"quoted" AND ( NEAR') == []                               # user text is not FTS syntax
    hit = store.search("tomatoes")[0]
    assert hit.title == "Cooking" and "[tomatoes]" in hit.snippet


def test_search_without_fts5_matches_substrings(tmp_path):
    s = ConversationStore(tmp_path / "plain.sqlite3", fts=False)
    try:
        cid = s.create("x")
        s.add_message(cid, Message("user", "100% sure_thing"))
        assert s.search_note and "FTS5" in s.search_note
        assert [h.position for h in s.search("0% sure_")] == [0]
        assert s.search("zzz") == []
    finally:
        s.close()


def test_export_markdown_and_json(store):
    cid = store.create("Export me", system_prompt="SYS")
    store.add_message(cid, Message("user", "Hi"))
    store.add_message(cid, Message("assistant", "Hello", reasoning="greet", complete=False))
    md = store.export_markdown(cid)
    assert md.startswith("# Export me\n") and "**You**\n\nHi" in md and "*(incomplete)*" in md
    assert "<details><summary>Reasoning</summary>\n\ngreet" in md
    body = json.loads(store.export_json(cid))
    assert body["title"] == "Export me" and body["system_prompt"] == "SYS"
    assert [(m["role"], m["content"], m["complete"]) for m in body["messages"]] == [
        ("user", "Hi", True), ("assistant", "Hello", False)]
