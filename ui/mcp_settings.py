"""Editing mcp.json from the app, with each server's status.

    dlg = McpSettingsDialog(parent, path=None, hub=hub)      # path: default_mcp_path(); hub: for status
    if dlg.exec():                                            # saved: dlg.config is the new McpConfig
        ...restart the hub on dlg.config

The text is checked with parse_mcp_config on every edit: a problem is shown under the editor (it names
the server and the field) and Save is disabled until it is fixed. Save writes the file atomically,
owner-only (env and headers often hold tokens). The table lists every server of the text being edited:
its transport, and from the running hub its state, tools and error ("not started" for new ones).
"""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtWidgets import (QDialog, QDialogButtonBox, QHeaderView, QLabel, QTableWidget, QTableWidgetItem,
                               QVBoxLayout, QWidget)

from kimi_desktop.mcp_tools import McpConfig, McpConfigError, default_mcp_path, parse_mcp_config
from kimi_desktop.settings import write_private

from .dialog_parts import monospace_text, problem_label

__all__ = ["McpSettingsDialog", "EXAMPLE"]

EXAMPLE = json.dumps({"mcpServers": {}}, indent=2) + "\n"
COLUMNS = ("Server", "Transport", "State", "Tools", "Problem")


class McpSettingsDialog(QDialog):
    def __init__(self, parent: QWidget | None = None, path: str | Path | None = None, hub=None):
        super().__init__(parent)
        self.path = Path(path) if path is not None else default_mcp_path()
        self.hub = hub
        self.config: McpConfig | None = None
        self.setWindowTitle("MCP servers")
        lay = QVBoxLayout(self)
        hint = QLabel(f"Servers in {self.path}: "
                      '{"mcpServers": {"name": {"command": ..., "args": [...], "env": {...}}}} for stdio, '
                      '{"url": ..., "headers": {...}} for streamable HTTP.')
        hint.setWordWrap(True)
        lay.addWidget(hint)
        self.editor = monospace_text(min_size=(560, 220))
        lay.addWidget(self.editor)
        self.problem = problem_label()
        lay.addWidget(self.problem)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        lay.addWidget(self.table)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Cancel)
        self.buttons.accepted.connect(self.save)
        self.buttons.rejected.connect(self.reject)
        lay.addWidget(self.buttons)
        self.editor.textChanged.connect(self.check)
        self.editor.setPlainText(self._read())
        self.check()

    def _read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return EXAMPLE
        except (OSError, UnicodeDecodeError) as e:
            self.problem.setText(f"{self.path}: cannot read the file: {e}")
            return EXAMPLE

    def text(self) -> str:
        return self.editor.toPlainText()

    def set_text(self, text: str) -> None:
        self.editor.setPlainText(text)

    def check(self) -> McpConfig | None:
        """Parse the text; show the problem (or the servers) and enable Save accordingly."""
        save = self.buttons.button(QDialogButtonBox.Save)
        try:
            cfg = parse_mcp_config(self.text(), self.path.name)
        except McpConfigError as e:
            self.problem.setText(str(e))
            save.setEnabled(False)
            return None
        self.problem.setText("")
        save.setEnabled(True)
        self._fill(cfg)
        return cfg

    def _fill(self, cfg: McpConfig) -> None:
        status = self.hub.status() if self.hub is not None else {}
        self.table.setRowCount(len(cfg.servers))
        for row, (name, spec) in enumerate(cfg.servers.items()):
            st = status.get(name)
            cells = (name, spec.transport, st.state if st else "not started",
                     ", ".join(st.tools) if st else "", (st.error or "") if st else "")
            for col, value in enumerate(cells):
                item = QTableWidgetItem(value)
                item.setToolTip(value)
                self.table.setItem(row, col, item)

    def row(self, name: str) -> dict[str, str] | None:
        """The table's cells for one server (tests, accessibility)."""
        for r in range(self.table.rowCount()):
            if self.table.item(r, 0).text() == name:
                return {c: self.table.item(r, i).text() for i, c in enumerate(COLUMNS)}
        return None

    def save(self) -> bool:
        """Write the file if the text is valid; accept the dialog. False (and the problem shown) if not."""
        cfg = self.check()
        if cfg is None:
            return False
        try:
            write_private(self.path, self.text() if self.text().endswith("\n") else self.text() + "\n")
        except OSError as e:
            self.problem.setText(f"{self.path}: cannot save: {e}")
            return False
        cfg.path = self.path
        self.config = cfg
        self.accept()
        return True
