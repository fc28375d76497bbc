"""The app's logic without a window: the engine, the conversation store, the current conversation, and
one generation at a time. Tests drive it directly; the window only calls its methods and listens.

    c = Controller(store, engine)
    c.new_conversation(); c.send("Hi")           # the answer streams: answerUpdated(index) ...
    c.stop(); c.regenerate(); c.edit_and_resend(index, "Hi again")

Generation runs on a worker thread (workers.StreamWorker); its events reach the UI thread batched,
the view is told at most every UPDATE_INTERVAL_MS, the store at most every WRITE_INTERVAL_S.
Before sending, the prompt is checked against the engine's context: if it does not fit,
contextOverflow(info) asks, and resolve_overflow("drop" | "stop") answers (never a silent truncation).
Tools: `tool_provider()` -> OpenAI tools list offered with every request; `on_tool_calls(controller,
index)` is called when an answer ends in tool calls (it adds results with add_tool_result() and
calls continue_turn()).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Qt, QTimer, Signal

from kimi_desktop.chat import (ChatRequestError, ChatResult, ContentDelta, PrefillProgress, ReasoningDelta, Sampling,
                               ToolCallDelta)
from kimi_desktop.context_fit import drop_oldest_turns, fit_context
from kimi_desktop.conversations import ConversationStore, Message, StreamWriter
from kimi_desktop.live_stats import LiveStats

from .workers import BackgroundCall, Poller, StreamEnd, StreamWorker

__all__ = ["Controller", "attachment_text", "UPDATE_INTERVAL_MS", "MAX_ATTACHMENT_BYTES"]

UPDATE_INTERVAL_MS = 40          # view refreshes while streaming (25 per second at most)
STATUS_INTERVAL_MS = 500
MAX_ATTACHMENT_BYTES = 1 << 20
TITLE_CHARS = 48
SAMPLING_FIELDS = {f.name for f in fields(Sampling)}


def attachment_text(path: str | Path) -> str:
    """A text file as it goes into the message: its name, then its text in a fence. ValueError if it
    is too big or not text."""
    p = Path(path)
    data = p.read_bytes()
    if len(data) > MAX_ATTACHMENT_BYTES:
        raise ValueError(f"{p.name}: {len(data)} bytes; attachments are text files of at most "
                         f"{MAX_ATTACHMENT_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{p.name}: not a UTF-8 text file") from None
    if "\x00" in text:
        raise ValueError(f"{p.name}: not a text file (it has NUL bytes)")
    fence = "````" if "```" in text else "```"
    return f"**{p.name}**\n{fence}\n{text.rstrip()}\n{fence}"


class _Turn:
    """The answer being generated."""

    def __init__(self, index: int, writer: StreamWriter, worker: StreamWorker):
        self.index, self.writer, self.worker = index, writer, worker
        self.result = ChatResult()
        self.last_view = 0.0
        self.view_due = False


class Controller(QObject):
    conversationsChanged = Signal()     # the list (titles, order) changed
    conversationLoaded = Signal(int)    # the current conversation is now this id (messages replaced)
    messageAppended = Signal(int)       # messages[index] is new
    messagesTruncated = Signal(int)     # messages[index:] are gone
    answerUpdated = Signal(int)         # messages[index] (the streaming answer) changed
    answerFinished = Signal(int, str)   # index, finish reason (stop, length, tool_calls, cancelled, error)
    busyChanged = Signal(bool)
    prefillProgress = Signal(int, int)  # prompt tokens read / to read; (0, 0): hide the bar
    contextOverflow = Signal(dict)      # {"prompt_tokens", "context", "reserve"}: ask, then resolve_overflow()
    notice = Signal(str)                # a one-line message for the user
    statusChanged = Signal(dict)        # live figures (kimi_desktop.live_stats)
    modelChanged = Signal(str)          # a label for the loaded model ("" when none)
    modelLoading = Signal(str)          # what the loader is doing (progress text)
    modelFailed = Signal(str, str)      # the file / folder, the problem (one line)
    engineClosing = Signal()            # the engine is about to be closed or replaced: stop using it now

    def __init__(self, store: ConversationStore, engine=None, model_label: str = "", parent: QObject | None = None,
                 status_interval_s: float = STATUS_INTERVAL_MS / 1000):
        """status_interval_s: how often statusChanged reports live figures (0: only on poll_status())."""
        super().__init__(parent)
        self.store = store
        self.engine = engine
        self.model_label = model_label if engine is not None else ""
        self.conversation_id: int | None = None
        self.messages: list[Message] = []
        self.turn: _Turn | None = None
        self.tool_provider: Callable[[], list[dict]] | None = None
        self.on_tool_calls: Callable[[Controller, int], None] | None = None
        self.live = LiveStats()
        self.loader: BackgroundCall | None = None
        self._overflow_retry: Callable[[str], Any] | None = None
        self._drop_policy: set[int] = set()         # conversations where the user chose "drop oldest"
        self._shut = False
        self.tools_running = False
        self.tools_cancel = threading.Event()      # set by stop() while tools run
        self.user_turn = 0                          # counts user turns (tool rounds are counted per turn)
        self._poller = Poller(self._sample, status_interval_s, self) if status_interval_s > 0 else None
        if self._poller is not None:
            self._poller.sampled.connect(self.statusChanged.emit, Qt.QueuedConnection)
            self._poller.start()

    # -- conversations ----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.turn is not None or self.tools_running

    def begin_tools(self) -> None:
        """Tool calls of the last answer run now (ui/tools.py): busy until end_tools(); stop() cancels."""
        self.tools_cancel.clear()
        self.tools_running = True
        self.busyChanged.emit(True)

    def end_tools(self) -> None:
        self.tools_running = False
        self.busyChanged.emit(False)

    def conversations(self):
        return self.store.conversations()

    def new_conversation(self, title: str = "New chat") -> int:
        if self.busy:
            self.stop()
        cid = self.store.create(title, model=self.model_label)
        self.open_conversation(cid)
        self.conversationsChanged.emit()
        return cid

    def open_conversation(self, cid: int) -> None:
        if self.busy and cid != self.conversation_id:
            self.stop()
            self._finish_now()
        self.store.get(cid)                        # KeyError for an unknown id
        self.conversation_id = cid
        self.messages = self.store.messages(cid)
        self.conversationLoaded.emit(cid)

    def rename(self, cid: int, title: str) -> None:
        self.store.rename(cid, title.strip() or "Untitled")
        self.conversationsChanged.emit()

    def delete(self, cid: int) -> None:
        if cid == self.conversation_id:
            if self.busy:
                self.stop()
                self._finish_now()
            self.conversation_id, self.messages = None, []
            self.conversationLoaded.emit(-1)
        self.store.delete(cid)
        self.conversationsChanged.emit()

    def search(self, query: str):
        return self.store.search(query)

    def settings(self) -> tuple[str, dict]:
        """(system prompt, sampling dict) of the current conversation."""
        if self.conversation_id is None:
            return "", {}
        c = self.store.get(self.conversation_id)
        return c.system_prompt, c.sampling

    def set_settings(self, system_prompt: str, sampling: dict) -> None:
        """Per-conversation system prompt and sampling (chat.Sampling fields; ChatRequestError if bad)."""
        s = self._sampling_from(sampling)
        s.validate()
        if self.conversation_id is None:
            self.new_conversation()
        self.store.update(self.conversation_id, system_prompt=system_prompt,
                          sampling={k: v for k, v in sampling.items() if k in SAMPLING_FIELDS})

    def export(self, path: str | Path, fmt: str | None = None) -> Path:
        """Write the current conversation as Markdown (.md) or JSON (.json)."""
        p = Path(path)
        fmt = fmt or ("json" if p.suffix.lower() == ".json" else "markdown")
        if self.conversation_id is None:
            raise ValueError("no conversation to export")
        text = self.store.export_json(self.conversation_id) if fmt == "json" else \
            self.store.export_markdown(self.conversation_id)
        p.write_text(text, encoding="utf-8")
        return p

    # -- sending ----------------------------------------------------------------------------------
    def send(self, text: str, attachments: list[str | Path] = (), overflow: str | None = None) -> bool:
        """Send a user message (attachments: text files, inlined with their names). False if nothing
        was sent (busy, no model, bad attachment, or the context question is pending)."""
        if self.busy or self._need_engine():
            return False
        parts = [text.strip()] if text.strip() else []
        try:
            parts += [attachment_text(a) for a in attachments]
        except (OSError, ValueError) as e:
            self.notice.emit(f"cannot attach {e}")
            return False
        if not parts:
            return False
        content = "\n\n".join(parts)
        if self.conversation_id is None:
            self.new_conversation()
        user = Message("user", content)
        history = self._chat(self.messages + [user])
        history = self._fit(history, overflow, lambda how: self.send(text, attachments, how))
        if history is None:
            return False
        self._append(user)
        self.user_turn += 1
        conv = self.store.get(self.conversation_id)
        if conv.title == "New chat":
            line = (text.strip() or Path(str(attachments[0])).name).splitlines()[0]
            self.rename(self.conversation_id, line[:TITLE_CHARS] + ("…" if len(line) > TITLE_CHARS else ""))
        return self._start(history)

    def regenerate(self, overflow: str | None = None) -> bool:
        """Answer the last user message again (what followed it is deleted)."""
        if self.busy or self._need_engine():
            return False
        users = [i for i, m in enumerate(self.messages) if m.role == "user"]
        if not users:
            return False
        history = self._fit(self._chat(self.messages[:users[-1] + 1]), overflow, self.regenerate)
        if history is None:
            return False
        self._truncate(users[-1] + 1)
        self.user_turn += 1
        return self._start(history)

    def edit_and_resend(self, index: int, text: str, overflow: str | None = None) -> bool:
        """Replace user message `index` with `text`, delete what followed, answer it."""
        if self.busy or self._need_engine():
            return False
        if not 0 <= index < len(self.messages) or self.messages[index].role != "user":
            raise ValueError(f"message {index} is not a user message")
        user = Message("user", text)
        history = self._fit(self._chat(self.messages[:index] + [user]), overflow,
                            lambda how: self.edit_and_resend(index, text, how))
        if history is None:
            return False
        self._truncate(index)
        self._append(user)
        self.user_turn += 1
        return self._start(history)

    def add_tool_result(self, tool_call_id: str, content: str, error: bool = False) -> int:
        """Append a tool's result (error: shown as an error card); returns its index."""
        return self._append(Message("tool", content, tool_call_id=tool_call_id, finish="error" if error else ""))

    def continue_turn(self) -> bool:
        """Generate the next answer from the history as it is (after tool results)."""
        if self.busy or self._need_engine():
            return False
        history = self._fit(self._chat(self.messages), "drop" if self.conversation_id in self._drop_policy else None,
                            lambda how: self.continue_turn())
        return history is not None and self._start(history)

    def resolve_overflow(self, choice: str) -> bool:
        """The answer to contextOverflow: "drop" (leave out the oldest turns, keep the system prompt;
        remembered for this conversation) or "stop" (send nothing)."""
        retry, self._overflow_retry = self._overflow_retry, None
        if choice == "drop" and retry is not None:
            self._drop_policy.add(self.conversation_id)
            return bool(retry("drop"))
        return False

    def stop(self) -> None:
        """Cancel the running answer (the engine stops before its next token) or the tool calls."""
        self.tools_cancel.set()
        if self.turn is not None:
            self.turn.worker.stream.cancel()

    # -- model ------------------------------------------------------------------------------------
    def set_engine(self, engine, label: str = "") -> None:
        if self.busy:
            self.stop()
            self._finish_now()
        if self.engine is not None and self.engine is not engine:
            self.engineClosing.emit()
        old, self.engine = self.engine, engine
        if old is not None and old is not engine:
            old.close()
        self.model_label = label if engine is not None else ""
        self.modelChanged.emit(self.model_label)
        self.poll_status()

    def unload(self) -> None:
        self.set_engine(None)

    def load_model(self, kind: str, path: str, label: str | None = None, **opts) -> BackgroundCall:
        """Open an engine on a worker thread: modelChanged on success, modelFailed(path, problem) if not."""
        from kimi_desktop.engines import open_engine

        def load(progress):
            progress(f"loading {Path(path).name}…")
            return open_engine(kind, path, **opts)
        return self._load(load, path, label or Path(path).name)

    def load_demo(self) -> BackgroundCall:
        """The built-in demo model (shipped in the package), on a worker thread."""
        from kimi_desktop.demo import demo_model_path
        from kimi_desktop.engines import open_engine

        def load(progress):
            progress("preparing the demo model…")
            path = demo_model_path()
            progress("loading the demo model (the first start compiles the kernels: a minute or two)…")
            return open_engine("native", path)
        return self._load(load, "the demo model", "demo (tiny trained K2)")

    def cancel_load(self) -> None:
        """Stop waiting for the model being loaded (it is closed when its load finishes)."""
        if self.loader is not None:
            self.loader.cancelled = True
            self.loader = None
            self.modelLoading.emit("")

    def _load(self, load, where: str, label: str) -> BackgroundCall:
        self.cancel_load()
        loader = BackgroundCall(load, self)
        self.loader = loader

        def done(engine):
            if loader.cancelled:
                engine.close()
                return
            self.loader = None
            self.modelLoading.emit("")
            self.set_engine(engine, label)

        def failed(problem, details):
            if loader.cancelled:
                return
            self.loader = None
            self.modelLoading.emit("")
            self.modelFailed.emit(where, problem)
        loader.done.connect(done, Qt.QueuedConnection)
        loader.failed.connect(failed, Qt.QueuedConnection)
        loader.progress.connect(self.modelLoading.emit, Qt.QueuedConnection)
        return loader.start()

    # -- status -----------------------------------------------------------------------------------
    def _sample(self) -> dict:
        snap = self.live.sample(self.engine)
        snap["model_label"] = self.model_label
        return snap

    def poll_status(self) -> dict:
        """Sample now (the poller thread does this every STATUS_INTERVAL_MS)."""
        snap = self._sample()
        self.statusChanged.emit(snap)
        return snap

    # -- internals --------------------------------------------------------------------------------
    def _need_engine(self) -> bool:
        if self.engine is None:
            self.notice.emit("no model is loaded: open one from the Model menu (or run with --demo)")
            return True
        return False

    def model_defaults(self) -> dict:
        """The loaded model's recommended sampling (its generation_config.json; {} without a model):
        what a conversation uses for the fields it does not set, as the server does."""
        if self.engine is None:
            return {}
        return {k: v for k, v in self.engine.generation_defaults().items() if k in SAMPLING_FIELDS}

    def _sampling_from(self, d: dict) -> Sampling:
        return Sampling(**{**self.model_defaults(), **{k: v for k, v in (d or {}).items() if k in SAMPLING_FIELDS}})

    def _chat(self, messages: list[Message]) -> list[dict]:
        return self.store.chat_messages(self.conversation_id, messages)

    def _tools(self) -> list[dict] | None:
        return (self.tool_provider() or None) if self.tool_provider is not None else None

    def _fit(self, history: list[dict], overflow: str | None, retry) -> list[dict] | None:
        tools = self._tools()
        sampling = self._sampling_from(self.settings()[1])
        fit = fit_context(self.engine, history, tools, max_tokens=sampling.max_tokens)
        if fit.fits:
            return history
        if overflow is None and self.conversation_id in self._drop_policy:
            overflow = "drop"
        if overflow == "drop":
            kept, dropped = drop_oldest_turns(self.engine, history, tools, max_tokens=sampling.max_tokens)
            if kept is None:
                self.notice.emit(f"the last message alone needs {fit.prompt_tokens} tokens with its answer's "
                                 f"{fit.reserve}, more than the context of {fit.context}: shorten it")
                return None
            self.notice.emit(f"left out the {dropped} oldest turn{'s' * (dropped != 1)} to fit the context of "
                             f"{fit.context} tokens (the system prompt is kept)")
            return kept
        self._overflow_retry = retry
        self.contextOverflow.emit({"prompt_tokens": fit.prompt_tokens, "context": fit.context,
                                   "reserve": fit.reserve})
        return None

    def _append(self, m: Message) -> int:
        self.store.add_message(self.conversation_id, m)
        self.messages.append(m)
        self.messageAppended.emit(len(self.messages) - 1)
        return len(self.messages) - 1

    def _truncate(self, index: int) -> None:
        self.store.truncate(self.conversation_id, index)
        del self.messages[index:]
        self.messagesTruncated.emit(index)

    def _start(self, history: list[dict]) -> bool:
        sampling = self._sampling_from(self.settings()[1])
        try:
            stream = self.engine.chat(history, tools=self._tools(), sampling=sampling)
        except (ChatRequestError, RuntimeError) as e:       # a bad request, a closed engine
            self.notice.emit(f"not sent: {e}")
            return False
        answer = Message("assistant", complete=False)
        writer = self.store.stream_writer(self.conversation_id, answer)
        self.messages.append(answer)
        worker = StreamWorker(stream, self._drain)
        self.turn = _Turn(len(self.messages) - 1, writer, worker)
        self.live.begin()
        self.messageAppended.emit(self.turn.index)
        self.busyChanged.emit(True)
        worker.start()
        return True

    def _drain(self) -> None:
        turn = self.turn
        if turn is None:
            return
        end = None
        r = turn.result
        for item in turn.worker.take():
            if isinstance(item, StreamEnd):
                end = item
                break
            if isinstance(item, PrefillProgress):
                turn.prefilling = True
                self.prefillProgress.emit(item.done, item.total)
                continue
            r.add(item)
            if isinstance(item, (ContentDelta, ReasoningDelta, ToolCallDelta)):
                self.live.token()
                if getattr(turn, "prefilling", False):     # the first text: the prompt is read
                    turn.prefilling = False
                    self.prefillProgress.emit(0, 0)
        turn.writer.update(content=r.content, reasoning=r.reasoning, tool_calls=_calls(r))
        if end is not None:
            self._finish(turn, end.error)
            return
        now = time.monotonic()
        wait_ms = UPDATE_INTERVAL_MS - (now - turn.last_view) * 1000
        if wait_ms <= 0:
            turn.last_view = now
            self.answerUpdated.emit(turn.index)
        elif not turn.view_due:
            turn.view_due = True
            QTimer.singleShot(int(wait_ms) + 1, lambda t=turn: self._view_due(t))

    def _view_due(self, turn: _Turn) -> None:
        turn.view_due = False
        if self.turn is turn:
            turn.last_view = time.monotonic()
            self.answerUpdated.emit(turn.index)

    def _finish(self, turn: _Turn, error: BaseException | None) -> None:
        r = turn.result
        self.prefillProgress.emit(0, 0)         # finish, error and cancel all end here
        reason = r.finish_reason or "stop"
        if error is not None:
            reason = "error"
            self.notice.emit(f"the answer failed: {error}")
        turn.writer.update(content=r.content, reasoning=r.reasoning, tool_calls=_calls(r))
        turn.writer.finish(complete=True, finish=reason if error is None else f"error: {error}")
        self.turn = None
        self.live.end()
        self.answerUpdated.emit(turn.index)
        self.answerFinished.emit(turn.index, reason)
        self.busyChanged.emit(False)
        self.conversationsChanged.emit()
        if reason == "tool_calls" and self.on_tool_calls is not None:
            self.on_tool_calls(self, turn.index)

    def _finish_now(self, timeout: float = 5.0) -> None:
        """Wait for the cancelled stream to end and record it (before switching conversation / engine)."""
        turn = self.turn
        if turn is None:
            return
        turn.worker.join(timeout)
        self._drain()
        if self.turn is turn:                      # the worker did not end in time
            self._finish(turn, TimeoutError("the engine did not stop in time"))

    def shutdown(self) -> None:
        """Stop the answer (recorded as it is), close the engine and the store (once)."""
        if self._shut:
            return
        self._shut = True
        if self._poller is not None:
            self._poller.stop()
        self.stop()
        self._finish_now()
        self.cancel_load()
        self.engineClosing.emit()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self.store.close()


def _calls(r: ChatResult) -> list[dict]:
    return [dict(tc) for tc in r.tool_calls]
