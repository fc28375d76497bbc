"""The conversation: one widget per message in a scroll area. Assistant answers render as markdown
(markdown_render) with a collapsible reasoning section (open while it thinks, closed once the answer
starts), tool calls and tool results as cards, and Copy / Regenerate / Edit actions."""

from __future__ import annotations

import html
import json
import math

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QScrollArea,
                               QSizePolicy, QTextBrowser, QToolButton, QVBoxLayout, QWidget)

from kimi_desktop.conversations import Message

from .markdown_render import COPY_SCHEME, render_markdown, split_blocks
from .theme import LIGHT, Theme

__all__ = ["ChatView", "MessageWidget", "AutoTextBrowser", "MarkdownView", "ToolCard"]

MAX_RESULT_CHARS = 4000
HIGHLIGHT_RETRY_MS = 200


class AutoTextBrowser(QTextBrowser):
    """A read-only rich-text block as tall as its text (the scroll area scrolls, not each block)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setFrameShape(QFrame.NoFrame)
        self.setOpenLinks(False)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.document().setDocumentMargin(2)
        self.document().documentLayout().documentSizeChanged.connect(self._fit)
        self.code_blocks: list[str] = []
        self.anchorClicked.connect(self._anchor)

    def _fit(self, *_):
        h = math.ceil(self.document().size().height()) + 2
        if h != self.height():
            self.setFixedHeight(h)

    def resizeEvent(self, e):
        super().resizeEvent(e)
        self._fit()

    def _anchor(self, url):
        if url.scheme() == COPY_SCHEME:
            i = int(url.path() or 0)
            if 0 <= i < len(self.code_blocks):
                QGuiApplication.clipboard().setText(self.code_blocks[i])
        else:                                           # links open nowhere: the app is offline
            QGuiApplication.clipboard().setText(url.toString())

    def set_markdown(self, text: str, theme: Theme, highlight: bool = True) -> bool:
        """Render; True when a code block waits for its highlighting (render again soon)."""
        r = render_markdown(text, theme, highlight)
        self.code_blocks = r.code_blocks
        self.setHtml(r.html)
        return r.pending


class MarkdownView(QWidget):
    """Markdown as a column of blocks (markdown_render.split_blocks): an update re-renders only the
    blocks whose text changed, so a long answer streams at the cost of its last paragraph."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.lay = QVBoxLayout(self)
        self.lay.setContentsMargins(0, 0, 0, 0)
        self.lay.setSpacing(6)                  # the gap a paragraph break leaves in one document
        self.browsers: list[AutoTextBrowser] = []
        self.sources: list[tuple | None] = []

    def _resize(self, n: int) -> None:
        while len(self.browsers) < n:
            b = AutoTextBrowser()
            self.lay.addWidget(b)
            self.browsers.append(b)
            self.sources.append(None)
        while len(self.browsers) > n:
            self.browsers.pop().deleteLater()
            self.sources.pop()

    def set_markdown(self, text: str, theme: Theme, streaming: bool = False) -> None:
        """streaming: the last block is still being written (its code is not highlighted yet)."""
        pieces = split_blocks(text) or [""]
        self._resize(len(pieces))
        pending = False
        for i, piece in enumerate(pieces):
            tail = streaming and i == len(pieces) - 1
            key = (piece, tail)
            if self.sources[i] != key:
                plain = self.browsers[i].set_markdown(piece, theme, highlight=not tail)
                self.sources[i] = None if plain else key        # None: render again
                pending = pending or plain
        if pending and not streaming:                           # while streaming the next update retries
            QTimer.singleShot(HIGHLIGHT_RETRY_MS, self, lambda: self.set_markdown(text, theme))

    def setPlainText(self, text: str) -> None:
        self._resize(1)
        self.browsers[0].setPlainText(text)
        self.sources[0] = None

    def toPlainText(self) -> str:
        return "\n".join(b.toPlainText() for b in self.browsers)


class ToolCard(QFrame):
    """A tool call (name + arguments) or a tool's result (error=True: the call failed)."""

    def __init__(self, title: str, body: str, error: bool = False, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("toolCard")
        self.setProperty("error", "true" if error else "false")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(10, 6, 10, 8)
        lay.setSpacing(2)
        self.title = QLabel(title)
        self.title.setObjectName("errorLabel" if error else "roleLabel")
        self.body = QLabel()
        self.body.setTextFormat(Qt.PlainText)
        self.body.setWordWrap(True)
        self.body.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.body.setStyleSheet("font-family: monospace;")
        self.body.setText(body)
        lay.addWidget(self.title)
        lay.addWidget(self.body)


def _pretty_args(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False, indent=2)
    except (ValueError, TypeError):
        return arguments


class MessageWidget(QFrame):
    editRequested = Signal(int, str)
    regenerateRequested = Signal()

    def __init__(self, index: int, message: Message, theme: Theme, parent: QWidget | None = None):
        super().__init__(parent)
        self.index, self.message, self.theme = index, message, theme
        self.streaming = False
        self.reasoning_user_choice: bool | None = None     # the user opened/closed it: keep that
        self.setObjectName({"user": "userMessage", "tool": "toolMessage"}.get(message.role, "assistantMessage"))
        self.lay = QVBoxLayout(self)
        self.lay.setContentsMargins(12, 8, 12, 8)
        self.lay.setSpacing(4)
        head = QHBoxLayout()
        self.role = QLabel({"user": "You", "assistant": "Kimi", "tool": "Tool", "system": "System"}
                           .get(message.role, message.role))
        self.role.setObjectName("roleLabel")
        head.addWidget(self.role)
        self.state = QLabel()
        self.state.setObjectName("muted")
        head.addWidget(self.state)
        head.addStretch(1)
        self.action_row = QHBoxLayout()
        head.addLayout(self.action_row)
        self.head = QWidget()
        self.head.setLayout(head)
        head.setContentsMargins(0, 0, 0, 0)
        self.lay.addWidget(self.head)
        if message.role == "tool":                          # a tool result is its card alone
            self.head.hide()
            self.lay.setContentsMargins(12, 0, 12, 0)
        # reasoning (assistant only)
        self.reasoning_toggle = QToolButton()
        self.reasoning_toggle.setObjectName("reasoningToggle")
        self.reasoning_toggle.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.reasoning_toggle.setCheckable(True)
        self.reasoning_toggle.clicked.connect(self._toggle_reasoning)
        self.reasoning = AutoTextBrowser()
        self.reasoning.setObjectName("reasoningText")
        self.lay.addWidget(self.reasoning_toggle)
        self.lay.addWidget(self.reasoning)
        self.content = MarkdownView()
        self.lay.addWidget(self.content)
        self.cards: list[ToolCard] = []
        self.cards_box = QVBoxLayout()
        self.lay.addLayout(self.cards_box)
        self.editor: QPlainTextEdit | None = None
        self.copy_button = self._action("Copy", self._copy)
        self.regenerate_button = self._action("Regenerate", self.regenerateRequested.emit)
        self.edit_button = self._action("Edit", self.start_edit)
        self.refresh(message, streaming=False, last=False)

    def _action(self, text, slot) -> QToolButton:
        b = QToolButton()
        b.setText(text)
        b.clicked.connect(slot)
        self.action_row.addWidget(b)
        return b

    # -- rendering ----------------------------------------------------------------------------------
    def refresh(self, message: Message, streaming: bool, last: bool) -> None:
        self.message, self.streaming = message, streaming
        m = message
        is_answer = m.role == "assistant"
        self.copy_button.setVisible(m.role != "tool" and not streaming and bool(m.content))
        self.regenerate_button.setVisible(is_answer and last and not streaming)
        self.edit_button.setVisible(m.role == "user" and self.editor is None)
        self._render_reasoning(m)
        if m.role == "tool":
            self.content.hide()
        elif m.role == "user":
            self.content.setPlainText(m.content)
        elif m.content or not m.reasoning:
            self.content.set_markdown(m.content or ("…" if streaming else ""), self.theme, streaming)
        self.content.setVisible(m.role != "tool" and (bool(m.content) or (streaming and not m.reasoning)))
        self._render_cards(m)
        if streaming:
            self.state.setText("thinking…" if m.reasoning and not m.content else "writing…")
        elif not m.complete:
            self.state.setText("incomplete: the app stopped while it was written")
        elif m.finish == "cancelled":
            self.state.setText("stopped")
        elif m.finish == "length":
            self.state.setText("cut at the token limit")
        elif m.finish.startswith("error"):
            self.state.setText(m.finish)
        else:
            self.state.setText("")

    def _render_reasoning(self, m: Message) -> None:
        has = m.role == "assistant" and bool(m.reasoning)
        self.reasoning_toggle.setVisible(has)
        if not has:
            self.reasoning.hide()
            return
        thinking = self.streaming and not m.content and not m.tool_calls
        words = len(m.reasoning.split())
        self.reasoning_toggle.setText("Thinking…" if thinking else f"Reasoning ({words} words)")
        expanded = thinking if self.reasoning_user_choice is None else self.reasoning_user_choice
        self.reasoning_toggle.setChecked(expanded)
        self.reasoning_toggle.setArrowType(Qt.DownArrow if expanded else Qt.RightArrow)
        if expanded:
            self.reasoning.setHtml(f'<div style="color: {self.theme.muted};">'
                                   f'{html.escape(m.reasoning).replace(chr(10), "<br>")}</div>')
        self.reasoning.setVisible(expanded)

    def _toggle_reasoning(self, checked: bool) -> None:
        self.reasoning_user_choice = checked
        self._render_reasoning(self.message)

    @property
    def reasoning_collapsed(self) -> bool:
        return not self.reasoning.isVisibleTo(self)

    def _render_cards(self, m: Message) -> None:
        if m.role == "tool":
            error = m.finish == "error"
            body = m.content if len(m.content) <= MAX_RESULT_CHARS else m.content[:MAX_RESULT_CHARS] + "\n…"
            specs = [(("Tool error" if error else "Tool result") + f" · {m.tool_call_id}", body, error)]
        else:
            specs = [(f"Tool call · {tc.get('name') or '…'}", _pretty_args(tc.get("arguments", "")), False)
                     for tc in m.tool_calls]
        while len(self.cards) > len(specs):
            self.cards.pop().deleteLater()
        for i, (title, body, error) in enumerate(specs):
            if i < len(self.cards):
                self.cards[i].title.setText(title)
                self.cards[i].body.setText(body)
            else:
                card = ToolCard(title, body, error)
                self.cards.append(card)
                self.cards_box.addWidget(card)

    # -- actions ------------------------------------------------------------------------------------
    def _copy(self) -> None:
        QGuiApplication.clipboard().setText(self.message.content)

    def start_edit(self) -> None:
        if self.editor is not None:
            return
        self.editor = QPlainTextEdit(self.message.content)
        self.editor.setMinimumHeight(70)
        row = QHBoxLayout()
        send, cancel = QPushButton("Send"), QPushButton("Cancel")
        row.addStretch(1)
        row.addWidget(cancel)
        row.addWidget(send)
        self._edit_row = QWidget()
        self._edit_row.setLayout(row)
        self.lay.insertWidget(self.lay.indexOf(self.content), self.editor)
        self.lay.insertWidget(self.lay.indexOf(self.content), self._edit_row)
        self.content.hide()
        self.edit_button.hide()
        send.clicked.connect(lambda: self.editRequested.emit(self.index, self.editor.toPlainText()))
        cancel.clicked.connect(self.end_edit)
        self.editor.setFocus()

    def end_edit(self) -> None:
        if self.editor is None:
            return
        self.editor.deleteLater()
        self._edit_row.deleteLater()
        self.editor = None
        self.content.show()
        self.edit_button.show()


class ChatView(QScrollArea):
    editRequested = Signal(int, str)
    regenerateRequested = Signal()

    def __init__(self, theme: Theme = LIGHT, parent: QWidget | None = None):
        super().__init__(parent)
        self.theme = theme
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        inner = QWidget()
        inner.setObjectName("chatInner")
        self.setObjectName("chatArea")
        self.box = QVBoxLayout(inner)
        self.box.setContentsMargins(24, 16, 24, 16)
        self.box.setSpacing(10)
        self.placeholder = QLabel("Ask Kimi anything.\nEnter sends, Shift+Enter starts a new line.")
        self.placeholder.setAlignment(Qt.AlignCenter)
        self.placeholder.setObjectName("muted")
        self.box.addWidget(self.placeholder, 1)
        self.box.addStretch(0)
        self.setWidget(inner)
        self.widgets: list[MessageWidget] = []
        self.messages: list[Message] = []
        self.streaming_index: int | None = None
        self._follow = True
        self.verticalScrollBar().rangeChanged.connect(self._keep_bottom)
        self.verticalScrollBar().valueChanged.connect(self._scrolled)

    def set_theme(self, theme: Theme) -> None:
        self.theme = theme
        self.set_messages(self.messages)

    def set_messages(self, messages: list[Message]) -> None:
        for w in self.widgets:
            w.deleteLater()
        self.widgets = []
        self.messages = messages
        for i in range(len(messages)):
            self._add(i)
        self._refresh_last()
        self._follow = True
        QTimer.singleShot(0, self.scroll_to_bottom)

    def _add(self, i: int) -> None:
        w = MessageWidget(i, self.messages[i], self.theme)
        w.editRequested.connect(self.editRequested)
        w.regenerateRequested.connect(self.regenerateRequested)
        self.box.insertWidget(self.box.count() - 1, w)
        self.widgets.append(w)
        self.placeholder.setVisible(not self.widgets)

    def append(self, i: int, streaming: bool = False) -> None:
        if streaming:
            self.streaming_index = i
        start = max((j for j in range(len(self.widgets)) if self.messages[j].role == "assistant"),
                    default=len(self.widgets))
        while len(self.widgets) <= i:
            self._add(len(self.widgets))
        self._refresh_last(start)          # the new widgets and the one that was the last answer
        self._follow = True

    def truncate(self, i: int) -> None:
        for w in self.widgets[i:]:
            w.deleteLater()
        del self.widgets[i:]
        self.placeholder.setVisible(not self.widgets)
        self._refresh_last(max(self._last_answer(), 0))

    def update_message(self, i: int, streaming: bool) -> None:
        if i < len(self.widgets):
            if not streaming and self.streaming_index == i:
                self.streaming_index = None
            self.widgets[i].refresh(self.messages[i], streaming, last=i == self._last_answer())

    def _last_answer(self) -> int:
        return max((i for i, m in enumerate(self.messages) if m.role == "assistant"), default=-1)

    def _refresh_last(self, start: int = 0) -> None:
        last = self._last_answer()
        for i in range(start, len(self.widgets)):
            w = self.widgets[i]
            w.index = i
            w.refresh(self.messages[i], i == self.streaming_index, last=i == last)

    def _scrolled(self, value: int) -> None:
        bar = self.verticalScrollBar()
        self._follow = value >= bar.maximum() - 4

    def _keep_bottom(self, lo: int, hi: int) -> None:
        if self._follow:
            self.verticalScrollBar().setValue(hi)

    def show_message(self, i: int) -> None:
        """Scroll message i into view (once laid out) and stop following the bottom."""
        if 0 <= i < len(self.widgets):
            self._follow = False
            QTimer.singleShot(0, self, lambda w=self.widgets[i]: self.ensureWidgetVisible(w, 0, 40))

    def scroll_to_bottom(self) -> None:
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())
