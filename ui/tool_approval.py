"""Asking the user before an MCP tool runs: Allow once / Always allow this server / Deny.

    choice = ask_approval(parent, server, tool, args)        # "once" | "always" | "deny" (UI thread)
    approve = Approver(parent, settings)                     # for tool_loop.run_turn(approve=...)

ToolApprovalDialog shows the server, the tool and its arguments pretty-printed; closing it or Esc
denies, and Deny is the default button (an Enter meant for the message box must not run a tool).
Approver is callable from any thread (run_turn runs on a worker): it answers "always" at once for
servers in settings.mcp_always_allow, otherwise shows the dialog on the UI thread and waits; an
"always" answer is added to the settings and saved.
"""

from __future__ import annotations

import html
import json
import threading
from typing import Any

from PySide6.QtCore import QObject, QThread, Qt, Signal, Slot
from PySide6.QtWidgets import QApplication, QDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from .dialog_parts import monospace_text

__all__ = ["ToolApprovalDialog", "ask_approval", "Approver", "format_arguments"]


def format_arguments(args: Any) -> str:
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return args
    return json.dumps(args, indent=2, ensure_ascii=False)


class ToolApprovalDialog(QDialog):
    def __init__(self, server: str, tool: str, args: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.choice = "deny"
        self.setWindowTitle("Run a tool?")
        self.setModal(True)
        lay = QVBoxLayout(self)
        self.header = QLabel(f"The model wants to run <b>{html.escape(tool)}</b> from the MCP server "
                             f"<b>{html.escape(server)}</b> with these arguments:")
        self.header.setWordWrap(True)
        self.header.setTextFormat(Qt.RichText)
        lay.addWidget(self.header)
        self.arguments = monospace_text(format_arguments(args), read_only=True, min_size=(420, 160))
        lay.addWidget(self.arguments)
        row = QHBoxLayout()
        self.once_button = QPushButton("Allow once")
        self.always_button = QPushButton(f"Always allow {server}")
        self.always_button.setToolTip(f"Run tools of {server} without asking from now on (kept in the settings)")
        self.deny_button = QPushButton("Deny")
        for b, answer in ((self.once_button, "once"), (self.always_button, "always"), (self.deny_button, "deny")):
            b.setAutoDefault(False)
            b.clicked.connect(lambda _=False, a=answer: self._answer(a))
            row.addWidget(b)
        self.deny_button.setDefault(True)
        self.deny_button.setFocus()
        lay.addLayout(row)

    def _answer(self, answer: str) -> None:
        self.choice = answer
        self.accept() if answer != "deny" else self.reject()

    def reject(self) -> None:                    # Esc, the close button
        if self.choice not in ("once", "always"):
            self.choice = "deny"
        super().reject()


def ask_approval(parent: QWidget | None, server: str, tool: str, args: Any) -> str:
    """Show the dialog (modal, on the UI thread) and return "once", "always" or "deny"."""
    dlg = ToolApprovalDialog(server, tool, args, parent)
    dlg.exec()
    choice = dlg.choice
    dlg.deleteLater()                # Qt deletes it, on its thread (not Python's garbage collector)
    return choice


class _Asker(QObject):
    request = Signal(object)           # a _Pending; handled on the thread this object lives in (the UI's)

    def __init__(self, parent: QWidget | None, ask_fn):
        super().__init__()
        self.parent_widget, self.ask_fn = parent, ask_fn
        self.request.connect(self._ask, Qt.QueuedConnection)

    @Slot(object)
    def _ask(self, pending) -> None:
        try:
            pending.answer = self.ask_fn(self.parent_widget, *pending.question)
        finally:
            pending.done.set()


class _Pending:
    def __init__(self, question):
        self.question, self.answer, self.done = question, "deny", threading.Event()


class Approver:
    """approve(server, tool, args) for run_turn, callable from any thread (create it on the UI thread)."""

    def __init__(self, parent: QWidget | None = None, settings=None, ask=None):
        self.settings = settings
        self._asker = _Asker(parent, ask or ask_approval)      # `ask`: tests replace the dialog

    def __call__(self, server: str, tool: str, args: Any) -> str:
        if self.settings is not None and server in self.settings.mcp_always_allow:
            return "always"
        app = QApplication.instance()
        if app is not None and QThread.currentThread() is app.thread():
            answer = self._asker.ask_fn(self._asker.parent_widget, server, tool, args)
        else:
            pending = _Pending((server, tool, args))
            self._asker.request.emit(pending)
            pending.done.wait()
            answer = pending.answer
        if answer == "always" and self.settings is not None:
            self.settings.allow_always(server)
            self.settings.save()
        return answer
