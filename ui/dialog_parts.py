"""Widgets the small dialogs share: a monospace text box and the red line that names a problem."""

from __future__ import annotations

from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import QLabel, QPlainTextEdit

__all__ = ["monospace_text", "problem_label"]


def monospace_text(text: str = "", read_only: bool = False, min_size: tuple[int, int] = (480, 180)) -> QPlainTextEdit:
    box = QPlainTextEdit(text)
    box.setReadOnly(read_only)
    box.setFont(QFontDatabase.systemFont(QFontDatabase.FixedFont))
    box.setMinimumSize(*min_size)
    return box


def problem_label() -> QLabel:
    label = QLabel()
    label.setWordWrap(True)
    label.setStyleSheet("color: #c0392b")
    return label
