"""The main window: conversations on the left, the chat and the message box on the right, the live
status row at the bottom. It only calls the Controller and follows its signals.

Keys: Enter sends, Shift+Enter new line, Ctrl+N new chat, Ctrl+K search, Esc stops the answer."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (QFileDialog, QFrame, QHBoxLayout, QInputDialog, QLabel, QMainWindow, QMenu,
                               QMessageBox, QPlainTextEdit, QProgressBar, QPushButton, QSplitter, QToolButton,
                               QVBoxLayout, QWidget)

from .chat_view import ChatView
from .controller import Controller
from .conversation_list import ConversationPanel
from .conversation_settings import ConversationSettingsDialog
from .local_api import LocalApi, LocalApiPanel
from .markdown_render import prepare_lexers
from .status_bar import StatusPanel
from .theme import LIGHT, Theme
from .workers import favour_the_ui_thread

__all__ = ["MainWindow", "MessageBox"]

NOTICE_MS = 10_000


class MessageBox(QPlainTextEdit):
    """Enter sends (submitted), Shift+Enter is a new line; grows with its text up to 8 lines."""

    submitted = Signal()
    PLACEHOLDER = "Message Kimi…  (Enter sends, Shift+Enter new line)"

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("messageBox")
        self.setPlaceholderText(self.PLACEHOLDER)
        self.setTabChangesFocus(True)
        self.document().documentLayout().documentSizeChanged.connect(self._grow)
        self._grow()

    def keyPressEvent(self, e):
        if e.key() in (Qt.Key_Return, Qt.Key_Enter) and not (e.modifiers() & Qt.ShiftModifier):
            self.submitted.emit()
            return
        super().keyPressEvent(e)

    def _grow(self, *_):
        line = self.fontMetrics().lineSpacing()
        lines = max(1, min(8, int(self.document().size().height())))
        self.setFixedHeight(lines * line + 14)


def _tool_button(text: str, on_click, tip: str | None = None) -> QToolButton:
    b = QToolButton()
    b.setText(text)
    if tip:
        b.setToolTip(tip)
    b.clicked.connect(on_click)
    return b


def _padded(widget: QWidget, side: int) -> QHBoxLayout:
    """`widget` in a row with `side` pixels of margin left and right."""
    row = QHBoxLayout()
    row.setContentsMargins(side, 0, side, 0)
    row.addWidget(widget)
    return row


class MainWindow(QMainWindow):
    mcpServersChanged = Signal()        # mcp.json was saved: the app restarts its tool servers

    def __init__(self, controller: Controller, theme: Theme = LIGHT, parent: QWidget | None = None,
                 settings=None):
        """settings: kimi_desktop.settings.Settings (the last model, approvals), or None."""
        super().__init__(parent)
        self.c = controller
        favour_the_ui_thread()
        prepare_lexers()                # Pygments compiles a language's lexer on first use: now, not mid-answer
        self.theme = theme
        self.settings = settings
        self.hub = None                 # the McpHub, once the app has started it
        self.attachments: list[str] = []
        self.error_box: QMessageBox | None = None
        self.overflow_box: QMessageBox | None = None
        self._sending = False
        self.setWindowTitle("Kimi Desktop")
        self.resize(1180, 780)
        self._build()
        self._connect()
        self.refresh_list()
        self.status.show_status(self.c.poll_status())
        self._model_changed(self.c.model_label)
        QTimer.singleShot(0, self.input.setFocus)

    # -- layout -------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.sidebar = ConversationPanel()
        right = QWidget()
        col = QVBoxLayout(right)
        col.setContentsMargins(0, 0, 0, 8)
        col.setSpacing(6)
        col.addLayout(self._build_header())
        self.api_panel = LocalApiPanel(self.local_api)
        self.api_panel.hide()
        self.local_api.action.toggled.connect(lambda on: on and self.api_panel.show())
        col.addLayout(_padded(self.api_panel, 12))
        self.chat = ChatView(self.theme)
        col.addWidget(self.chat, 1)
        col.addWidget(self._build_notice())
        col.addLayout(_padded(self._build_composer(), 16))
        split = QSplitter()
        split.addWidget(self.sidebar)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        split.setSizes([250, 930])
        self.setCentralWidget(split)
        self.status = StatusPanel(self.theme)
        self.statusBar().addPermanentWidget(self.status, 1)
        self.statusBar().setSizeGripEnabled(False)

    def _build_header(self) -> QHBoxLayout:
        """Title, model-load progress, then the model menu, Local API, Settings and Export buttons."""
        header = QHBoxLayout()
        header.setContentsMargins(12, 8, 12, 0)
        self.title = QLabel("New chat")
        self.title.setObjectName("roleLabel")
        header.addWidget(self.title, 1)
        self.progress = QProgressBar()
        self.progress.setRange(0, 0)                # busy: a model load reports no fraction
        self.progress.setFixedWidth(140)
        self.progress_label = QLabel()
        self.progress_label.setObjectName("muted")
        self.cancel_load = _tool_button("Cancel", self.c.cancel_load)
        for w in (self.progress_label, self.progress, self.cancel_load):
            header.addWidget(w)
            w.hide()
        self.model_button = QToolButton()
        self.model_button.setPopupMode(QToolButton.InstantPopup)
        self.model_button.setMenu(self._build_model_menu())
        header.addWidget(self.model_button)
        self.api_button = _tool_button("Local API", self.show_local_api, "The local API: URL, key, start and stop")
        self.local_api.changed.connect(lambda: self.api_button.setText(
            "Local API · on" if self.local_api.server is not None else "Local API"))
        header.addWidget(self.api_button)
        self.settings_button = _tool_button("Settings…", self.edit_settings)
        header.addWidget(self.settings_button)
        self.export_button = _tool_button("Export…", lambda: self.export_conversation(None))
        header.addWidget(self.export_button)
        return header

    def _build_model_menu(self) -> QMenu:
        self.model_menu = QMenu(self)
        self.model_menu.addAction("Open a model…", self.open_model)
        self.model_menu.addAction("Built-in demo model", self.c.load_demo)
        self.model_menu.addSeparator()
        self.unload_action = self.model_menu.addAction("Unload model (free the memory)", self.c.unload)
        self.model_menu.addSeparator()
        self.local_api = LocalApi(self.c, self.settings, self)
        self.model_menu.addAction(self.local_api.action)
        self.model_menu.addSeparator()
        self.model_menu.addAction("MCP servers…", self.edit_mcp_servers)
        return self.model_menu

    def _build_notice(self) -> QLabel:
        """A one-line notice under the chat that hides itself (show_notice)."""
        self.notice = QLabel()
        self.notice.setObjectName("muted")
        self.notice.setWordWrap(True)
        self.notice.setContentsMargins(16, 0, 16, 0)
        self.notice.hide()
        self._notice_timer = QTimer(self)
        self._notice_timer.setSingleShot(True)
        self._notice_timer.timeout.connect(self.notice.hide)
        return self.notice

    def _build_composer(self) -> QFrame:
        """Attach button, the attached files' names over the message box, Send."""
        composer = QFrame()
        composer.setObjectName("composer")
        row = QHBoxLayout(composer)
        row.setContentsMargins(8, 6, 8, 6)
        self.attach_button = _tool_button("Attach", self.attach_files,
                                          "Attach text files: their text goes into the message, with the file name")
        row.addWidget(self.attach_button, 0, Qt.AlignBottom)
        inner = QVBoxLayout()
        self.attached = QLabel()
        self.attached.setObjectName("muted")
        self.attached.hide()
        inner.addWidget(self.attached)
        self.input = MessageBox()
        inner.addWidget(self.input)
        row.addLayout(inner, 1)
        self.send_button = QPushButton("Send")
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.send_or_stop)
        row.addWidget(self.send_button, 0, Qt.AlignBottom)
        return composer

    def _connect(self) -> None:
        c = self.c
        c.conversationsChanged.connect(self.refresh_list)
        c.conversationLoaded.connect(self._loaded)
        c.messageAppended.connect(lambda i: self.chat.append(i, streaming=self._streaming(i)))
        c.messagesTruncated.connect(self.chat.truncate)
        c.answerUpdated.connect(lambda i: self.chat.update_message(i, streaming=self._streaming(i)))
        c.answerFinished.connect(self._finished)
        c.busyChanged.connect(lambda busy: self.send_button.setText("Stop" if busy else "Send"))
        c.statusChanged.connect(self.status.show_status)
        c.prefillProgress.connect(self.status.show_prefill)
        c.notice.connect(self.show_notice)
        c.modelChanged.connect(self._model_changed)
        c.modelLoading.connect(self._loading)
        c.modelFailed.connect(self.show_load_error)
        c.contextOverflow.connect(self.ask_overflow)
        self.input.submitted.connect(self.send)
        self.chat.editRequested.connect(self._edit)
        self.chat.regenerateRequested.connect(c.regenerate)
        s = self.sidebar
        s.newRequested.connect(self.new_chat)
        s.openRequested.connect(self.open_at)
        s.renameRequested.connect(self.rename_conversation)
        s.deleteRequested.connect(self.delete_conversation)
        s.exportRequested.connect(self.export_conversation)
        s.searchChanged.connect(self._search)
        for keys, slot in (("Ctrl+N", self.new_chat), ("Ctrl+K", s.focus_search), ("Esc", c.stop)):
            QShortcut(QKeySequence(keys), self, activated=slot)

    def _streaming(self, i: int) -> bool:
        return self.c.turn is not None and self.c.turn.index == i

    # -- controller -> view -------------------------------------------------------------------------
    def refresh_list(self) -> None:
        if not self.sidebar.searching:
            self.sidebar.show_conversations(self.c.conversations(), self.c.conversation_id)
        cid = self.c.conversation_id
        self.title.setText(self.c.store.get(cid).title if cid is not None else "New chat")

    def _loaded(self, cid: int) -> None:
        self.chat.set_messages(self.c.messages)
        self.refresh_list()
        self.input.setFocus()

    def _finished(self, i: int, reason: str) -> None:
        self.chat.update_message(i, streaming=False)
        self.input.setFocus()

    def _model_changed(self, label: str) -> None:
        self.model_button.setText(f"Model: {label}" if label else "Load a model")
        loaded = bool(label) or self.c.engine is not None
        self.unload_action.setEnabled(loaded)
        self.send_button.setEnabled(loaded)
        self.send_button.setToolTip("" if loaded else "No model is loaded: open one from the Model menu")
        self.input.setPlaceholderText(MessageBox.PLACEHOLDER if loaded else
                                      "No model is loaded: open one from the Model menu to chat")

    def _loading(self, text: str) -> None:
        for w in (self.progress_label, self.progress, self.cancel_load):
            w.setVisible(bool(text))
        self.progress_label.setText(text)

    def show_notice(self, text: str) -> None:
        self.notice.setText(text)
        self.notice.show()
        self._notice_timer.start(NOTICE_MS)

    def show_load_error(self, where: str, problem: str) -> None:
        """A dialog naming the file and the problem (never a traceback)."""
        box = QMessageBox(QMessageBox.Critical, "Could not load the model",
                          f"Could not load {where}", QMessageBox.Ok, self)
        box.setInformativeText(problem)
        box.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.error_box = box
        box.open()

    def ask_overflow(self, info: dict) -> None:
        box = QMessageBox(QMessageBox.Warning, "The conversation is longer than the context",
                          f"This conversation needs {info['prompt_tokens']:,} tokens plus {info['reserve']:,} for "
                          f"the answer, but the model's context holds {info['context']:,}.", parent=self)
        box.setInformativeText("Leave out the oldest turns (the system prompt is kept), or stop and "
                               "start a new chat?")
        drop = box.addButton("Drop oldest turns", QMessageBox.AcceptRole)
        box.addButton("Stop", QMessageBox.RejectRole)
        box.finished.connect(lambda _: self._overflow_answered(box.clickedButton() is drop))
        self.overflow_box = box
        box.open()

    def _overflow_answered(self, drop: bool) -> None:
        sent = self.c.resolve_overflow("drop" if drop else "stop")
        if sent and self._sending:
            self._clear_composer()
        self._sending = False

    # -- view -> controller -------------------------------------------------------------------------
    def send(self) -> None:
        if self.c.busy:
            return
        text = self.input.toPlainText()
        if not text.strip() and not self.attachments:
            return
        self._sending = True                # the text stays in the box until it is really sent
        if self.c.send(text, self.attachments):
            self._clear_composer()
            self._sending = False
        else:                               # still sending only if the context question is open
            self._sending = self.overflow_box is not None and self.overflow_box.isVisible()

    def _clear_composer(self) -> None:
        self.input.clear()
        self._set_attachments([])

    def send_or_stop(self) -> None:
        self.c.stop() if self.c.busy else self.send()

    def _edit(self, index: int, text: str) -> None:
        if self.c.edit_and_resend(index, text) is False and index < len(self.chat.widgets):
            self.chat.widgets[index].end_edit()

    def open_at(self, cid: int, position: int = -1) -> None:
        """Open a conversation; a search hit's message (position >= 0) is scrolled into view."""
        if cid != self.c.conversation_id:
            self.c.open_conversation(cid)
        self.chat.show_message(position)

    def new_chat(self) -> None:
        self.c.new_conversation()
        self.input.setFocus()

    def _search(self, text: str) -> None:
        if not text.strip():
            self.sidebar.show_conversations(self.c.conversations(), self.c.conversation_id)
            return
        self.sidebar.show_results(self.c.search(text), self.c.store.search_note)

    def rename_conversation(self, cid: int) -> None:
        title, ok = QInputDialog.getText(self, "Rename", "Title:", text=self.c.store.get(cid).title)
        if ok:
            self.c.rename(cid, title)

    def delete_conversation(self, cid: int) -> None:
        title = self.c.store.get(cid).title
        if QMessageBox.question(self, "Delete", f"Delete “{title}” and all its messages?") == QMessageBox.Yes:
            self.c.delete(cid)

    def export_conversation(self, cid: int | None) -> None:
        if cid is not None:
            self.c.open_conversation(cid)
        if self.c.conversation_id is None:
            return self.show_notice("nothing to export yet")
        name = self.c.store.get(self.c.conversation_id).title.replace("/", "-")[:40] or "conversation"
        path, _ = QFileDialog.getSaveFileName(self, "Export conversation", f"{name}.md",
                                              "Markdown (*.md);;JSON (*.json)")
        if path:
            self.show_notice(f"exported to {self.c.export(path)}")

    def edit_settings(self) -> None:
        prompt, sampling = self.c.settings()
        d = ConversationSettingsDialog(prompt, {**self.c.model_defaults(), **sampling}, self)
        if d.exec():
            try:
                self.c.set_settings(*d.values())
            except ValueError as e:
                self.show_notice(f"settings not saved: {e}")

    def attach_files(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Attach text files")
        if paths:
            self._set_attachments(self.attachments + paths)

    def _set_attachments(self, paths: list[str]) -> None:
        self.attachments = paths
        self.attached.setText("Attached: " + ", ".join(Path(p).name for p in paths))
        self.attached.setVisible(bool(paths))

    def open_model(self) -> None:
        """A checkpoint folder, a .gguf or a remote endpoint, with the plan first (ui/model_dialog.py);
        the choice is remembered in the settings."""
        from kimi_desktop.settings import model_open_args

        from .model_dialog import choose_model
        choice = choose_model(self, self.settings)
        if choice is None:
            return
        if self.settings is not None:
            self.settings.remember_model(choice)
            self.settings.save()
        kind, path, opts = model_open_args(choice)
        label = choice.get("name") or (path if kind == "remote" else Path(path).name)
        self.c.load_model(kind, path, label, **opts)

    def edit_mcp_servers(self) -> None:
        """Edit mcp.json (ui/mcp_settings.py); on Save the tool servers restart (mcpServersChanged)."""
        from .mcp_settings import McpSettingsDialog
        d = McpSettingsDialog(self, hub=self.hub)
        if d.exec():
            self.mcpServersChanged.emit()
        d.deleteLater()

    def show_local_api(self) -> None:
        self.api_panel.setVisible(not self.api_panel.isVisible())

    def set_theme(self, theme: Theme) -> None:
        self.theme = theme
        self.chat.set_theme(theme)
        self.status.set_theme(theme)

    def closeEvent(self, e):
        self.c.shutdown()
        super().closeEvent(e)
