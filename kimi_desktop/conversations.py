"""The app's conversations: one SQLite database (WAL) in the platformdirs data dir. Qt-free.

    store = ConversationStore()                  # or ConversationStore(path) in tests
    cid = store.create("New chat", system_prompt="Be brief.")
    store.add_message(cid, Message("user", "Hi"))
    w = store.stream_writer(cid, Message("assistant", complete=False))   # a streaming answer
    w.update(content="Hel")                      # written at most every WRITE_INTERVAL_S
    w.finish(complete=True)                      # written once at the end
    store.chat_messages(cid)                     # the history as chat-API (OpenAI-shaped) messages

Durability: every finished message is its own committed transaction; a streaming answer is written
as incomplete and rewritten at most every WRITE_INTERVAL_S and once at the end, so a crash or kill -9
keeps a recent prefix of it, marked incomplete. WAL + synchronous=NORMAL: a committed transaction
survives the process dying (an OS crash may lose the last ones, never corrupt the file).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConversationStore", "Conversation", "Message", "SearchHit", "StreamWriter", "SchemaError",
           "default_db_path", "SCHEMA_VERSION", "WRITE_INTERVAL_S"]

WRITE_INTERVAL_S = 0.5

# Each entry moves the schema from version i to i + 1; append, never edit a released one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        system_prompt TEXT NOT NULL DEFAULT '',
        sampling TEXT NOT NULL DEFAULT '{}',        -- JSON: chat.Sampling fields
        model TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL DEFAULT '',
        reasoning TEXT NOT NULL DEFAULT '',
        tool_calls TEXT NOT NULL DEFAULT '[]',      -- JSON: [{"id", "name", "arguments"}]
        tool_call_id TEXT,
        complete INTEGER NOT NULL DEFAULT 1,
        created REAL NOT NULL,
        UNIQUE (conversation, position)
    );
    CREATE INDEX conversations_by_update ON conversations(updated);
    """,
    # v2: a note on how an answer ended (stop, length, cancelled, tool_calls, error: ...)
    "ALTER TABLE messages ADD COLUMN finish TEXT NOT NULL DEFAULT '';",
]
SCHEMA_VERSION = len(MIGRATIONS)

FTS_SQL = """
CREATE VIRTUAL TABLE messages_fts USING fts5(content, reasoning, content='messages', content_rowid='id');
CREATE TRIGGER messages_fts_ins AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content, reasoning) VALUES (new.id, new.content, new.reasoning);
END;
CREATE TRIGGER messages_fts_del AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content, reasoning)
        VALUES ('delete', old.id, old.content, old.reasoning);
END;
CREATE TRIGGER messages_fts_upd AFTER UPDATE OF content, reasoning ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content, reasoning)
        VALUES ('delete', old.id, old.content, old.reasoning);
    INSERT INTO messages_fts(rowid, content, reasoning) VALUES (new.id, new.content, new.reasoning);
END;
INSERT INTO messages_fts(messages_fts) VALUES ('rebuild');
"""
FTS_MISSING = "search matches plain substrings: this Python's SQLite has no FTS5"


class SchemaError(RuntimeError):
    """The database cannot be used by this version (e.g. written by a newer kimi-desktop)."""


def default_db_path() -> Path:
    import platformdirs
    return Path(platformdirs.user_data_dir("kimi-desktop")) / "conversations.sqlite3"


@dataclass
class Message:
    role: str                                   # system | user | assistant | tool
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)    # [{"id", "name", "arguments"}]
    tool_call_id: str | None = None
    complete: bool = True
    finish: str = ""
    id: int | None = None
    position: int | None = None
    created: float = 0.0

    def chat(self) -> dict:
        """This message in the chat API's (OpenAI) shape."""
        m: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.role == "assistant":
            if self.reasoning:
                m["reasoning_content"] = self.reasoning
            if self.tool_calls:
                m["content"] = self.content or None
                m["tool_calls"] = [{"id": tc.get("id"), "type": "function",
                                    "function": {"name": tc.get("name"), "arguments": tc.get("arguments", "")}}
                                   for tc in self.tool_calls]
        if self.role == "tool":
            m["tool_call_id"] = self.tool_call_id or ""
        return m


@dataclass
class Conversation:
    id: int
    title: str
    created: float
    updated: float
    system_prompt: str = ""
    sampling: dict = field(default_factory=dict)
    model: str = ""


@dataclass
class SearchHit:
    conversation: int
    title: str
    position: int
    snippet: str


def _message(row: sqlite3.Row) -> Message:
    return Message(role=row["role"], content=row["content"], reasoning=row["reasoning"],
                   tool_calls=json.loads(row["tool_calls"] or "[]"), tool_call_id=row["tool_call_id"],
                   complete=bool(row["complete"]), finish=row["finish"], id=row["id"],
                   position=row["position"], created=row["created"])


def _conversation(row: sqlite3.Row) -> Conversation:
    return Conversation(id=row["id"], title=row["title"], created=row["created"], updated=row["updated"],
                        system_prompt=row["system_prompt"], sampling=json.loads(row["sampling"] or "{}"),
                        model=row["model"])


class ConversationStore:
    """Conversations and their messages. Use from one thread (the UI thread)."""

    def __init__(self, path: str | Path | None = None, clock: Callable[[], float] = time.time, fts: bool = True):
        """fts=False: search by plain substrings, as on a Python whose SQLite lacks FTS5."""
        self.path = Path(path) if path is not None else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.db = sqlite3.connect(str(self.path), isolation_level=None)   # autocommit; explicit BEGIN
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        self.fts = fts and self._ensure_fts()
        self.search_note = "" if self.fts else FTS_MISSING

    # -- schema ---------------------------------------------------------------------------------
    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = self.db.execute("SELECT version FROM schema_version").fetchone()
        have = row[0] if row else 0
        if have > SCHEMA_VERSION:
            raise SchemaError(f"{self.path}: schema version {have} was written by a newer kimi-desktop "
                              f"(this one knows up to {SCHEMA_VERSION})")
        for v in range(have, SCHEMA_VERSION):
            with self._tx():                    # one transaction per step: a crash leaves version v
                for s in _statements(MIGRATIONS[v]):
                    self.db.execute(s)
                self.db.execute("DELETE FROM schema_version")
                self.db.execute("INSERT INTO schema_version VALUES (?)", (v + 1,))
        self.version = SCHEMA_VERSION

    def _ensure_fts(self) -> bool:
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE name='messages_fts'").fetchone():
            return True
        try:
            with self._tx():
                for s in _statements(FTS_SQL):
                    self.db.execute(s)
            return True
        except sqlite3.OperationalError as e:
            if "fts5" in str(e).lower():
                return False
            raise

    def _tx(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    # -- conversations --------------------------------------------------------------------------
    def create(self, title: str = "New chat", system_prompt: str = "", sampling: dict | None = None,
               model: str = "") -> int:
        now = self.clock()
        with self._tx():
            cur = self.db.execute("INSERT INTO conversations (title, created, updated, system_prompt, sampling, "
                                  "model) VALUES (?, ?, ?, ?, ?, ?)",
                                  (title, now, now, system_prompt, json.dumps(sampling or {}), model))
        return int(cur.lastrowid)

    def conversations(self) -> list[Conversation]:
        """All conversations, the most recently updated first."""
        rows = self.db.execute("SELECT * FROM conversations ORDER BY updated DESC, id DESC").fetchall()
        return [_conversation(r) for r in rows]

    def get(self, cid: int) -> Conversation:
        row = self.db.execute("SELECT * FROM conversations WHERE id=?", (cid,)).fetchone()
        if row is None:
            raise KeyError(f"no conversation {cid}")
        return _conversation(row)

    def rename(self, cid: int, title: str) -> None:
        self.update(cid, title=title)

    def update(self, cid: int, *, title: str | None = None, system_prompt: str | None = None,
               sampling: dict | None = None, model: str | None = None) -> None:
        sets, args = ["updated=?"], [self.clock()]
        for col, v in (("title", title), ("system_prompt", system_prompt), ("model", model),
                       ("sampling", None if sampling is None else json.dumps(sampling))):
            if v is not None:
                sets.append(f"{col}=?")
                args.append(v)
        with self._tx():
            self.db.execute(f"UPDATE conversations SET {', '.join(sets)} WHERE id=?", (*args, cid))

    def delete(self, cid: int) -> None:
        with self._tx():
            self.db.execute("DELETE FROM messages WHERE conversation=?", (cid,))
            self.db.execute("DELETE FROM conversations WHERE id=?", (cid,))

    # -- messages -------------------------------------------------------------------------------
    def messages(self, cid: int) -> list[Message]:
        rows = self.db.execute("SELECT * FROM messages WHERE conversation=? ORDER BY position", (cid,)).fetchall()
        return [_message(r) for r in rows]

    def add_message(self, cid: int, m: Message) -> Message:
        """Append m (its id, position and created are filled in)."""
        now = self.clock()
        with self._tx():
            pos = self.db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation=?",
                                  (cid,)).fetchone()[0]
            cur = self.db.execute(
                "INSERT INTO messages (conversation, position, role, content, reasoning, tool_calls, tool_call_id, "
                "complete, finish, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, pos, m.role, m.content, m.reasoning, json.dumps(m.tool_calls), m.tool_call_id,
                 int(m.complete), m.finish, now))
            self.db.execute("UPDATE conversations SET updated=? WHERE id=?", (now, cid))
        m.id, m.position, m.created = int(cur.lastrowid), int(pos), now
        return m

    def update_message(self, m: Message) -> None:
        """Write m's text, tool calls, complete flag and finish note (m.id must be set)."""
        with self._tx():
            self.db.execute("UPDATE messages SET content=?, reasoning=?, tool_calls=?, complete=?, finish=? "
                            "WHERE id=?", (m.content, m.reasoning, json.dumps(m.tool_calls), int(m.complete),
                                           m.finish, m.id))

    def truncate(self, cid: int, position: int) -> None:
        """Delete the messages at `position` and after (regenerate, edit-and-resend)."""
        with self._tx():
            self.db.execute("DELETE FROM messages WHERE conversation=? AND position>=?", (cid, position))
            self.db.execute("UPDATE conversations SET updated=? WHERE id=?", (self.clock(), cid))

    def stream_writer(self, cid: int, m: Message) -> StreamWriter:
        m.complete = False
        self.add_message(cid, m)
        return StreamWriter(self, m)

    # -- search and export ----------------------------------------------------------------------
    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Messages matching `query` in every conversation, best first (FTS5; plain substrings without it)."""
        query = query.strip()
        if not query:
            return []
        if self.fts:
            # each word a quoted prefix term: user text is never FTS syntax
            terms = " ".join('"' + w.replace('"', '""') + '"*' for w in query.split())
            rows = self.db.execute(
                "SELECT m.conversation, c.title, m.position, "
                "snippet(messages_fts, -1, '[', ']', '…', 12) AS snip FROM messages_fts "
                "JOIN messages m ON m.id = messages_fts.rowid JOIN conversations c ON c.id = m.conversation "
                "WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?", (terms, limit)).fetchall()
        else:
            like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = self.db.execute(
                "SELECT m.conversation, c.title, m.position, substr(m.content, 1, 80) AS snip FROM messages m "
                "JOIN conversations c ON c.id = m.conversation WHERE m.content LIKE ? ESCAPE '\\' "
                "OR m.reasoning LIKE ? ESCAPE '\\' ORDER BY c.updated DESC LIMIT ?", (like, like, limit)).fetchall()
        return [SearchHit(r[0], r[1], r[2], r[3]) for r in rows]

    def chat_messages(self, cid: int, messages: list[Message] | None = None) -> list[dict]:
        """The conversation as chat-API messages: its system prompt (if any), then every message."""
        conv = self.get(cid)
        msgs = self.messages(cid) if messages is None else messages
        out = [{"role": "system", "content": conv.system_prompt}] if conv.system_prompt else []
        return out + [m.chat() for m in msgs]

    def export_json(self, cid: int) -> str:
        conv = self.get(cid)
        body = {"format": "kimi-desktop conversation", "version": 1, **asdict(conv),
                "messages": [{k: v for k, v in asdict(m).items() if k not in ("id",)} for m in self.messages(cid)]}
        return json.dumps(body, ensure_ascii=False, indent=2)

    def export_markdown(self, cid: int) -> str:
        conv = self.get(cid)
        out = [f"# {conv.title}", ""]
        if conv.system_prompt:
            out += ["**System**", "", conv.system_prompt, ""]
        for m in self.messages(cid):
            head = {"user": "**You**", "assistant": "**Kimi**", "tool": f"**Tool result** `{m.tool_call_id}`",
                    "system": "**System**"}.get(m.role, m.role)
            out += [head + ("" if m.complete else " *(incomplete)*"), ""]
            if m.reasoning:
                out += ["<details><summary>Reasoning</summary>", "", m.reasoning, "", "</details>", ""]
            if m.content:
                out += [m.content, ""]
            for tc in m.tool_calls:
                out += [f"Tool call `{tc.get('name')}` (`{tc.get('id')}`):", "", "```json",
                        tc.get("arguments", ""), "```", ""]
        return "\n".join(out)


class StreamWriter:
    """Writes a streaming answer: update() at most every `interval` seconds, finish() once."""

    def __init__(self, store: ConversationStore, m: Message, interval: float = WRITE_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.store, self.message, self.interval, self.clock = store, m, interval, clock
        self.last = clock()
        self.writes = 0
        self.written_chars = 0          # len(content) as last written

    def update(self, content: str | None = None, reasoning: str | None = None,
               tool_calls: list[dict] | None = None) -> bool:
        """Set the answer so far; True when it was written now."""
        m = self.message
        if content is not None:
            m.content = content
        if reasoning is not None:
            m.reasoning = reasoning
        if tool_calls is not None:
            m.tool_calls = tool_calls
        if self.clock() - self.last < self.interval:
            return False
        self._write()
        return True

    def finish(self, complete: bool = True, finish: str = "") -> Message:
        self.message.complete = complete
        self.message.finish = finish
        self._write()
        return self.message

    def _write(self) -> None:
        self.store.update_message(self.message)
        self.last = self.clock()
        self.writes += 1
        self.written_chars = len(self.message.content)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def _statements(script: str) -> list[str]:
    """A script split into statements (sqlite3.complete_statement keeps trigger bodies whole)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--") and not buf.strip():
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return [s for s in out if s.strip(" ;\n")]
