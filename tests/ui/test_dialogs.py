"""The three small dialogs, offscreen: tool approval, mcp.json settings, and choosing a model."""

from __future__ import annotations

import json
import os
import stat
import threading

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QApplication, QDialogButtonBox

from kimi_desktop.mcp_tools import ServerStatus
from kimi_desktop.model_finder import FoundModel
from kimi_desktop.planner import format_plan, plan_model
from kimi_desktop.settings import Settings
from kimi_desktop.ui.mcp_settings import EXAMPLE, McpSettingsDialog
from kimi_desktop.ui.model_dialog import ModelDialog
from kimi_desktop.ui.tool_approval import Approver, ToolApprovalDialog, ask_approval

ARGS = {"path": "/tmp/notes.txt", "lines": [1, 2], "note": "café"}
GIB = 1 << 30


# -- tool approval -----------------------------------------------------------------------------------

def test_approval_dialog_shows_the_call_and_answers(qtbot):
    for button, answer in (("once_button", "once"), ("always_button", "always"), ("deny_button", "deny")):
        dlg = ToolApprovalDialog("files", "read_file", ARGS)
        qtbot.addWidget(dlg)
        assert "read_file" in dlg.header.text() and "files" in dlg.header.text()
        assert dlg.arguments.toPlainText() == json.dumps(ARGS, indent=2, ensure_ascii=False)
        assert dlg.arguments.isReadOnly() and "files" in dlg.always_button.text()
        qtbot.mouseClick(getattr(dlg, button), Qt.LeftButton)
        assert dlg.choice == answer


def test_escape_and_default_deny(qtbot):
    dlg = ToolApprovalDialog("files", "rm", '{"path": "/"}')
    qtbot.addWidget(dlg)
    assert dlg.deny_button.isDefault() and not dlg.once_button.isDefault()
    assert '"path": "/"' in dlg.arguments.toPlainText()           # a JSON string is pretty-printed too
    dlg.show()
    qtbot.keyClick(dlg, Qt.Key_Escape)
    assert dlg.choice == "deny" and not dlg.isVisible()


def test_ask_approval_is_modal_and_returns_the_click(qtbot):
    def click():
        dlg = QApplication.activeModalWidget()
        assert isinstance(dlg, ToolApprovalDialog)
        dlg.always_button.click()
    QTimer.singleShot(50, click)
    assert ask_approval(None, "files", "read_file", ARGS) == "always"


def test_approver_from_a_worker_thread_keeps_always(qtbot, tmp_path):
    settings = Settings.load(tmp_path / "settings.json")
    asked = []

    def ask(parent, server, tool, args):
        assert threading.current_thread() is threading.main_thread()       # dialogs only on the UI thread
        asked.append((server, tool, args))
        return "always" if server == "files" else "deny"
    approve = Approver(None, settings, ask=ask)
    answers = []
    th = threading.Thread(target=lambda: answers.extend([approve("files", "read_file", ARGS),
                                                        approve("files", "write_file", {}),
                                                        approve("web", "fetch", {"url": "x"})]))
    th.start()
    qtbot.waitUntil(lambda: not th.is_alive(), timeout=5000)
    assert answers == ["always", "always", "deny"]
    assert asked == [("files", "read_file", ARGS), ("web", "fetch", {"url": "x"})]     # files asked once
    assert Settings.load(tmp_path / "settings.json").mcp_always_allow == ["files"]
    assert approve("web", "fetch", {}) == "deny" and len(asked) == 3                  # on the UI thread


# -- mcp.json ----------------------------------------------------------------------------------------

class FakeHub:
    def status(self):
        return {"files": ServerStatus("files", "stdio", "connected", None, ["read_file", "write_file"]),
                "web": ServerStatus("web", "http", "failed", "cannot connect: refused")}


def save_button(dlg):
    return dlg.buttons.button(QDialogButtonBox.Save)


def test_mcp_settings_validates_before_saving(qtbot, tmp_path):
    path = tmp_path / "cfg" / "mcp.json"
    dlg = McpSettingsDialog(None, path=path, hub=FakeHub())
    qtbot.addWidget(dlg)
    assert dlg.text() == EXAMPLE and save_button(dlg).isEnabled() and dlg.table.rowCount() == 0
    dlg.set_text('{"mcpServers": {"files": {"command": "npx", "args": "-y"}}}')
    assert "server 'files': args must be a list" in dlg.problem.text()
    assert not save_button(dlg).isEnabled() and dlg.save() is False and not path.exists()
    good = {"mcpServers": {"files": {"command": "npx", "args": ["-y", "srv"]},
                           "web": {"url": "http://127.0.0.1:9/mcp"}, "new": {"command": "uvx"}}}
    dlg.set_text(json.dumps(good, indent=2))
    assert dlg.problem.text() == "" and save_button(dlg).isEnabled()
    assert dlg.row("files") == {"Server": "files", "Transport": "stdio", "State": "connected",
                                "Tools": "read_file, write_file", "Problem": ""}
    assert dlg.row("web")["State"] == "failed" and "refused" in dlg.row("web")["Problem"]
    assert dlg.row("new")["State"] == "not started"
    assert dlg.save() is True and dlg.result() == dlg.DialogCode.Accepted
    assert json.loads(path.read_text()) == good and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert list(dlg.config.servers) == ["files", "web", "new"] and dlg.config.path == path


def test_mcp_settings_opens_the_existing_file(qtbot, tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text('{"mcpServers": {"a": {"command": "x"}}}')
    dlg = McpSettingsDialog(None, path=path)
    qtbot.addWidget(dlg)
    assert '"a"' in dlg.text() and dlg.row("a")["State"] == "not started"


# -- choosing a model --------------------------------------------------------------------------------

def ok_button(dlg):
    return dlg.buttons.button(QDialogButtonBox.Ok)


def test_model_dialog_plans_a_found_checkpoint(qtbot, tiny_int4, tmp_path):
    gguf = tmp_path / "k2.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    found = [FoundModel("moonshotai/Kimi-K2-Thinking", "a" * 40, tiny_int4, 123 * GIB, "native"),
             FoundModel("unsloth/Kimi-K2-GGUF", "b" * 40, gguf, 64, "llama.cpp")]
    dlg = ModelDialog(None, Settings(), found=found, ram_bytes=64 * GIB)
    qtbot.addWidget(dlg)
    assert dlg.found_list.count() == 2 and "123.0 GiB" in dlg.found_list.item(0).text()
    assert not ok_button(dlg).isEnabled() and dlg.problem.text() == "pick a checkpoint folder"
    dlg.found_list.setCurrentRow(0)
    assert dlg.kind() == "native" and dlg.folder.text() == str(tiny_int4)
    text = dlg.plan_view.toPlainText()
    assert text == format_plan(plan_model(tiny_int4, ram_bytes=64 * GIB))
    assert "resident weights" in text and "KV cache" in text and "64.00 GiB" in text
    assert ok_button(dlg).isEnabled()
    assert dlg.choice() == {"kind": "native", "path": str(tiny_int4), "expert_cache_gb": None}
    dlg.auto_budget.setChecked(False)
    dlg.budget.setValue(0.0)
    assert "OS page cache" in dlg.plan_view.toPlainText() and dlg.choice()["expert_cache_gb"] == 0.0
    dlg.found_list.setCurrentRow(1)
    assert dlg.kind() == "llama.cpp" and dlg.choice() == {"kind": "llama.cpp", "path": str(gguf)}
    dlg.try_accept()
    assert dlg.result() == dlg.DialogCode.Accepted


def test_model_dialog_names_what_is_wrong(qtbot, tiny_int4, tmp_path):
    dlg = ModelDialog(None, Settings(), found=[], ram_bytes=1 << 20)        # a machine with 1 MiB
    qtbot.addWidget(dlg)
    assert not dlg.found_list.isVisible()
    dlg.folder.setText(str(tmp_path))
    assert "no config.json" in dlg.problem.text() and not ok_button(dlg).isEnabled()
    dlg.try_accept()
    assert dlg.result() != dlg.DialogCode.Accepted
    dlg.folder.setText(str(tiny_int4))
    dlg.auto_budget.setChecked(False)
    dlg.budget.setValue(1.0)                            # far more than 1 MiB: the planner refuses
    assert "cannot plan" in dlg.problem.text() and "does not fit" in dlg.problem.text()
    assert not ok_button(dlg).isEnabled()
    dlg.tabs.setCurrentIndex(1)
    dlg.gguf.setText(str(tmp_path / "missing.gguf"))
    assert "does not exist" in dlg.problem.text()
    dlg.gguf.setText(str(tmp_path / "model.bin"))
    assert "not a .gguf file" in dlg.problem.text()
    dlg.tabs.setCurrentIndex(2)
    dlg.url.setText("ftp://host")
    assert "http:// or https://" in dlg.problem.text() and not ok_button(dlg).isEnabled()


def test_model_dialog_remote_and_restore(qtbot, tiny_int4):
    s = Settings(remote_endpoints=[{"name": "lab", "base_url": "http://10.0.0.2:8000/v1", "api_key": "sk-lab"}],
                 last_model={"kind": "native", "path": str(tiny_int4), "expert_cache_gb": 2.0})
    dlg = ModelDialog(None, s, found=[], ram_bytes=64 * GIB)
    qtbot.addWidget(dlg)
    assert dlg.kind() == "native" and not dlg.auto_budget.isChecked() and dlg.budget.value() == 2.0
    assert dlg.choice()["expert_cache_gb"] == 2.0
    dlg.tabs.setCurrentIndex(2)
    dlg.endpoints.setCurrentIndex(1)
    assert dlg.choice() == {"kind": "remote", "url": "http://10.0.0.2:8000/v1", "api_key": "sk-lab", "name": "lab"}
    assert dlg.api_key.echoMode() == dlg.api_key.EchoMode.Password and ok_button(dlg).isEnabled()
    s.last_model = {"kind": "remote", "url": "https://api.example/v1", "api_key": None}
    again = ModelDialog(None, s, found=[])
    qtbot.addWidget(again)
    assert again.kind() == "remote" and again.choice()["url"] == "https://api.example/v1"


def test_choose_model_returns_the_choice_or_none(qtbot, tmp_path):
    from kimi_desktop.ui.model_dialog import choose_model
    gguf = tmp_path / "k2.gguf"
    gguf.write_bytes(b"GGUF")
    s = Settings(last_model={"kind": "llama.cpp", "path": str(gguf)})

    def press(name):
        def go():
            dlg = QApplication.activeModalWidget()
            getattr(dlg, name)()
        return go
    QTimer.singleShot(50, press("try_accept"))
    assert choose_model(None, s, found=[]) == {"kind": "llama.cpp", "path": str(gguf)}
    QTimer.singleShot(50, press("reject"))
    assert choose_model(None, s, found=[]) is None
