"""The sidebar: New chat, search over every message (SQLite FTS5), the conversations (most recent
first) with Rename / Delete / Export in a context menu."""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (QLabel, QLineEdit, QListWidget, QListWidgetItem, QMenu, QPushButton,
                               QVBoxLayout, QWidget)

__all__ = ["ConversationPanel"]

ID_ROLE = Qt.UserRole
POS_ROLE = Qt.UserRole + 1


class ConversationPanel(QWidget):
    newRequested = Signal()
    openRequested = Signal(int, int)        # conversation id, message position to show (-1: none)
    renameRequested = Signal(int)
    deleteRequested = Signal(int)
    exportRequested = Signal(int)
    searchChanged = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setMinimumWidth(200)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 8, 4, 8)
        lay.setSpacing(6)
        self.new_button = QPushButton("New chat")
        self.new_button.setToolTip("Ctrl+N")
        self.new_button.clicked.connect(self.newRequested)
        lay.addWidget(self.new_button)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search all messages (Ctrl+K)")
        self.search.setClearButtonEnabled(True)
        lay.addWidget(self.search)
        self.note = QLabel()
        self.note.setObjectName("muted")
        self.note.setWordWrap(True)
        self.note.hide()
        lay.addWidget(self.note)
        self.list = QListWidget()
        self.list.setObjectName("conversationList")
        # long titles are elided (the full one is the tooltip), never scrolled sideways
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.list.setTextElideMode(Qt.ElideRight)
        self.list.setContextMenuPolicy(Qt.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._menu)
        self.list.itemActivated.connect(self._activated)
        self.list.itemClicked.connect(self._activated)
        lay.addWidget(self.list, 1)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(150)
        self._debounce.timeout.connect(lambda: self.searchChanged.emit(self.search.text()))
        self.search.textChanged.connect(lambda _: self._debounce.start())
        self.searching = False

    def show_conversations(self, conversations, current: int | None) -> None:
        self.searching = False
        self.note.hide()
        self.list.clear()
        for c in conversations:
            it = QListWidgetItem(c.title)
            it.setData(ID_ROLE, c.id)
            it.setData(POS_ROLE, -1)
            it.setToolTip(c.title)
            self.list.addItem(it)
            if c.id == current:
                self.list.setCurrentItem(it)

    def show_results(self, hits, note: str = "") -> None:
        """Search hits: one row per matching message (title and a snippet)."""
        self.searching = True
        self.list.clear()
        for h in hits:
            it = QListWidgetItem(f"{h.title}\n  {h.snippet}")
            it.setData(ID_ROLE, h.conversation)
            it.setData(POS_ROLE, h.position)
            self.list.addItem(it)
        text = note or ("" if hits else "no message matches")
        self.note.setText(text)
        self.note.setVisible(bool(text))

    def focus_search(self) -> None:
        self.search.setFocus()
        self.search.selectAll()

    def _activated(self, item: QListWidgetItem) -> None:
        self.openRequested.emit(int(item.data(ID_ROLE)), int(item.data(POS_ROLE)))

    def _menu(self, pos) -> None:
        item = self.list.itemAt(pos)
        if item is None:
            return
        cid = int(item.data(ID_ROLE))
        m = QMenu(self)
        m.addAction("Rename…", lambda: self.renameRequested.emit(cid))
        m.addAction("Export…", lambda: self.exportRequested.emit(cid))
        m.addSeparator()
        m.addAction("Delete", lambda: self.deleteRequested.emit(cid))
        m.popup(self.list.viewport().mapToGlobal(pos))
