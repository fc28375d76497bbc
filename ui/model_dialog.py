"""Choosing what to load: a checkpoint folder, a .gguf file or a remote endpoint, with the plan first.

    choice = choose_model(parent, settings)     # None if cancelled; else a dict like Settings.last_model:
        {"kind": "native", "path": DIR, "expert_cache_gb": None | GiB}   (None: sized to this machine)
        {"kind": "llama.cpp", "path": FILE.gguf}
        {"kind": "remote", "url": BASE_URL, "api_key": KEY or None, "name": NAME}
    kind, path, opts = model_open_args(choice)  # kimi_desktop.settings: for open_engine / load_model

The dialog lists the K2-family models already in the Hugging Face cache (kimi_desktop.model_finder;
clicking one fills the matching tab), starts from settings.last_model, and offers the saved remote
endpoints. For a checkpoint it shows the plan of `kimi-desktop plan` (kimi_desktop.planner: resident
RAM, expert cache, KV cache, disk, reads per token) for the expert-cache budget chosen in the spin box
("size to this machine", or GiB; 0 = the OS page cache), refreshed as either changes; a budget the
planner refuses is shown as the problem and Load stays off. Load checks the choice first (a folder with
config.json, an existing .gguf, an http(s) URL) and names what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFileDialog,
                               QFormLayout, QHBoxLayout, QLabel, QLineEdit, QListWidget, QListWidgetItem,
                               QPushButton, QTabWidget, QVBoxLayout, QWidget)

from .dialog_parts import monospace_text, problem_label

__all__ = ["ModelDialog", "choose_model", "TABS"]

TABS = ("native", "llama.cpp", "remote")


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _default_plan(ram_bytes: int | None) -> Callable[[str, float | None], str]:
    def plan(path: str, requested_gb: float | None) -> str:
        from kimi_desktop.planner import format_plan, plan_model
        return format_plan(plan_model(path, ram_bytes=ram_bytes, requested_gb=requested_gb))
    return plan


class ModelDialog(QDialog):
    def __init__(self, parent: QWidget | None = None, settings=None, found=None,
                 plan: Callable[[str, float | None], str] | None = None, ram_bytes: int | None = None):
        """found: the models to list (None: model_finder.find_models() now); plan(path, gb) -> text
        (default: the planner on this machine's memory, or on ram_bytes)."""
        super().__init__(parent)
        self.settings = settings
        self._plan = plan or _default_plan(ram_bytes)
        self.plan_ok = False
        self.setWindowTitle("Load a model")
        lay = QVBoxLayout(self)

        if found is None:
            from kimi_desktop.model_finder import find_models
            found = find_models()
        self.found = list(found)
        lay.addWidget(QLabel("K2 models in the Hugging Face cache:" if self.found else
                             "No K2 models in the Hugging Face cache; pick a folder, a file or an endpoint."))
        lay.addWidget(self._found_list())
        lay.addWidget(self._tabs())
        lay.addLayout(self._budget_row())

        self.plan_view = monospace_text(read_only=True, min_size=(640, 200))
        lay.addWidget(self.plan_view)
        self.problem = problem_label()
        lay.addWidget(self.problem)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        self.buttons.button(QDialogButtonBox.Ok).setText("Load")
        self.buttons.accepted.connect(self.try_accept)
        self.buttons.rejected.connect(self.reject)
        lay.addWidget(self.buttons)

        self._restore(getattr(settings, "last_model", None))
        self.folder.textChanged.connect(self.refresh)
        self.gguf.textChanged.connect(self.refresh)
        self.url.textChanged.connect(self.refresh)
        self.tabs.currentChanged.connect(self.refresh)
        self.auto_budget.toggled.connect(self._budget_toggled)
        self.budget.valueChanged.connect(self.refresh)
        self.refresh()

    # -- building -------------------------------------------------------------------------------------
    def _found_list(self) -> QListWidget:
        """The models found in the cache; picking one fills its tab (hidden when there are none)."""
        self.found_list = QListWidget()
        for m in self.found:
            item = QListWidgetItem(f"{m.repo_id}  ({'checkpoint' if m.kind == 'native' else 'GGUF'}, "
                                   f"{_gb(m.size_bytes)}, {m.revision[:8]})")
            item.setToolTip(str(m.path))
            self.found_list.addItem(item)
        self.found_list.setVisible(bool(self.found))
        self.found_list.setMaximumHeight(120)
        self.found_list.currentRowChanged.connect(self._pick_found)
        return self.found_list

    def _tabs(self) -> QTabWidget:
        self.tabs = QTabWidget()
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("a checkpoint folder (config.json + safetensors)")
        self.gguf = QLineEdit()
        self.gguf.setPlaceholderText("a .gguf file (the first part of a split one)")
        self.tabs.addTab(self._path_tab(self.folder, self._browse_folder), "Checkpoint folder")
        self.tabs.addTab(self._path_tab(self.gguf, self._browse_gguf), "GGUF file")
        self.tabs.addTab(self._remote_tab(), "Remote endpoint")
        return self.tabs

    def _budget_row(self) -> QHBoxLayout:
        """The expert-cache budget: sized to this machine (checked), or GiB from the spin box."""
        budget = QHBoxLayout()
        self.auto_budget = QCheckBox("Size the expert cache to this machine")
        self.auto_budget.setChecked(True)
        self.budget = QDoubleSpinBox()
        self.budget.setRange(0.0, 4096.0)
        self.budget.setDecimals(1)
        self.budget.setSingleStep(1.0)
        self.budget.setSuffix(" GiB")
        self.budget.setSpecialValueText("0 (the OS page cache)")
        self.budget.setEnabled(False)
        budget.addWidget(self.auto_budget)
        budget.addWidget(QLabel("Expert cache:"))
        budget.addWidget(self.budget)
        return budget

    def _path_tab(self, edit: QLineEdit, browse) -> QWidget:
        w = QWidget()
        row = QHBoxLayout(w)
        row.addWidget(edit)
        b = QPushButton("Browse…")
        b.clicked.connect(browse)
        row.addWidget(b)
        return w

    def _remote_tab(self) -> QWidget:
        w = QWidget()
        form = QFormLayout(w)
        self.endpoints = QComboBox()
        self.endpoints.addItem("(new endpoint)")
        for e in getattr(self.settings, "remote_endpoints", None) or []:
            self.endpoints.addItem(e.get("name") or e["base_url"], e)
        self.endpoints.currentIndexChanged.connect(self._pick_endpoint)
        self.endpoint_name = QLineEdit()
        self.url = QLineEdit()
        self.url.setPlaceholderText("http://127.0.0.1:8000/v1 or https://api.moonshot.ai/v1")
        self.api_key = QLineEdit()
        self.api_key.setEchoMode(QLineEdit.Password)
        self.api_key.setPlaceholderText("kept in the settings file, readable by you only")
        form.addRow("Saved:", self.endpoints)
        form.addRow("Name:", self.endpoint_name)
        form.addRow("Base URL:", self.url)
        form.addRow("API key:", self.api_key)
        return w

    def _restore(self, last: dict | None) -> None:
        if not last:
            return
        kind = last.get("kind")
        if kind == "native":
            self.folder.setText(last.get("path", ""))
            gb = last.get("expert_cache_gb")
            if gb is not None:
                self.auto_budget.setChecked(False)
                self.budget.setEnabled(True)
                self.budget.setValue(float(gb))
        elif kind == "llama.cpp":
            self.gguf.setText(last.get("path", ""))
        elif kind == "remote":
            self.url.setText(last.get("url", ""))
            self.api_key.setText(last.get("api_key") or "")
            self.endpoint_name.setText(last.get("name") or "")
        if kind in TABS:
            self.tabs.setCurrentIndex(TABS.index(kind))

    # -- reactions ------------------------------------------------------------------------------------
    def _browse_folder(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Checkpoint folder", self.folder.text())
        if d:
            self.folder.setText(d)

    def _browse_gguf(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "GGUF file", self.gguf.text(), "GGUF (*.gguf)")
        if f:
            self.gguf.setText(f)

    def _pick_found(self, row: int) -> None:
        if 0 <= row < len(self.found):
            m = self.found[row]
            (self.folder if m.kind == "native" else self.gguf).setText(str(m.path))
            self.tabs.setCurrentIndex(TABS.index(m.kind))

    def _pick_endpoint(self, index: int) -> None:
        e = self.endpoints.itemData(index)
        if isinstance(e, dict):
            self.endpoint_name.setText(e.get("name") or "")
            self.url.setText(e.get("base_url", ""))
            self.api_key.setText(e.get("api_key") or "")

    def _budget_toggled(self, auto: bool) -> None:
        self.budget.setEnabled(not auto)
        self.refresh()

    def kind(self) -> str:
        return TABS[self.tabs.currentIndex()]

    def requested_gb(self) -> float | None:
        return None if self.auto_budget.isChecked() else float(self.budget.value())

    def refresh(self) -> None:
        """Re-plan for a checkpoint; check the current choice; enable Load when it can be loaded."""
        kind, self.plan_ok = self.kind(), True
        for w in (self.auto_budget, self.budget):
            w.setVisible(kind == "native")
        problem = self.problem_text()
        if kind == "native":
            if problem:
                self.plan_view.setPlainText("Pick a checkpoint folder to see what goes where before loading.")
            else:
                try:
                    self.plan_view.setPlainText(self._plan(self.folder.text().strip(), self.requested_gb()))
                except Exception as e:              # noqa: BLE001 - a plan problem is shown, not raised
                    self.plan_ok = False
                    self.plan_view.setPlainText("")
                    problem = f"cannot plan {self.folder.text().strip()}: {e}"
        elif kind == "llama.cpp":
            p = Path(self.gguf.text().strip())
            self.plan_view.setPlainText("" if problem else f"{p.name}: {_gb(p.stat().st_size)} on disk "
                                        f"(llama.cpp plans its own memory)")
        else:
            self.plan_view.setPlainText("" if problem else "The model runs on the endpoint; nothing is loaded here.")
        self.problem.setText(problem or "")
        self.buttons.button(QDialogButtonBox.Ok).setEnabled(not problem)

    def problem_text(self) -> str | None:
        """What is wrong with the current choice (None: it can be loaded)."""
        kind = self.kind()
        if kind == "native":
            t = self.folder.text().strip()
            if not t:
                return "pick a checkpoint folder"
            p = Path(t)
            if not p.is_dir():
                return f"{p} is not a folder"
            if not (p / "config.json").is_file():
                return f"{p} is not a checkpoint folder: it has no config.json"
            return None
        if kind == "llama.cpp":
            t = self.gguf.text().strip()
            if not t:
                return "pick a .gguf file"
            p = Path(t)
            if p.suffix.lower() != ".gguf":
                return f"{p.name} is not a .gguf file"
            return None if p.is_file() else f"{p} does not exist"
        url = self.url.text().strip()
        if not url:
            return "give the endpoint's base URL"
        if not url.startswith(("http://", "https://")):
            return f"the base URL must start with http:// or https://, got {url!r}"
        return None

    def choice(self) -> dict:
        kind = self.kind()
        if kind == "native":
            return {"kind": "native", "path": self.folder.text().strip(), "expert_cache_gb": self.requested_gb()}
        if kind == "llama.cpp":
            return {"kind": "llama.cpp", "path": self.gguf.text().strip()}
        return {"kind": "remote", "url": self.url.text().strip(), "api_key": self.api_key.text() or None,
                "name": self.endpoint_name.text().strip() or None}

    def try_accept(self) -> None:
        self.refresh()
        if self.problem.text():
            return
        self.accept()


def choose_model(parent: QWidget | None = None, settings=None, **kw) -> dict | None:
    """Show the dialog; the choice (see the module docstring), or None if cancelled."""
    dlg = ModelDialog(parent, settings, **kw)
    choice = dlg.choice() if dlg.exec() else None
    dlg.deleteLater()
    return choice
