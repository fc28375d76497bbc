"""MCP tools in the chat window: the hub's tools go with every request; when an answer ends in tool
calls, they run on a worker thread (each asked for with `approve`, see ui/tool_approval.Approver),
their results appear as cards and go back to the model, and the turn continues until it answers, at
most `max_rounds` tool rounds per user turn (kimi_desktop.tool_loop.TurnTools). Stop cancels the calls.

    tools = ToolSession(controller, hub, Approver(window, settings), max_rounds=16, timeout_s=30)
"""

from __future__ import annotations

from PySide6.QtCore import QObject, Qt

from kimi_desktop.tool_loop import TurnTools, fill_call_ids, tool_message

from .controller import Controller
from .workers import BackgroundCall

__all__ = ["ToolSession"]


class ToolSession(QObject):
    def __init__(self, controller: Controller, hub, approve, *, max_rounds: int = 16, timeout_s: float = 30.0):
        super().__init__(controller)
        self.c, self.hub, self.approve = controller, hub, approve
        self.max_rounds, self.timeout_s = max_rounds, timeout_s
        self._turn: tuple[int, TurnTools] | None = None
        self.call: BackgroundCall | None = None
        self._calls: list[dict] = []
        controller.tool_provider = self.tools
        controller.on_tool_calls = self._on_tool_calls

    def tools(self) -> list[dict]:
        return self.hub.tools() if self.hub is not None else []

    def _turn_tools(self) -> TurnTools:
        if self._turn is None or self._turn[0] != self.c.user_turn:
            self._turn = (self.c.user_turn, TurnTools(self.hub, self.approve, max_rounds=self.max_rounds,
                                                      timeout_s=self.timeout_s, cancelled=self.c.tools_cancel.is_set))
        return self._turn[1]

    def _on_tool_calls(self, c: Controller, index: int) -> None:
        msg = c.messages[index].chat()
        fill_call_ids(msg, c.store.chat_messages(c.conversation_id, c.messages[:index]))
        calls = msg["tool_calls"]
        stored = c.messages[index]
        if any(not tc.get("id") for tc in stored.tool_calls):     # the results must answer these ids
            for tc, full in zip(stored.tool_calls, calls):
                tc["id"] = full["id"]
            c.store.update_message(stored)
        self._calls = calls
        runner = self._turn_tools()
        c.begin_tools()
        call = BackgroundCall(lambda progress: runner.run_calls(calls), self)
        call.done.connect(self._done, Qt.QueuedConnection)
        call.failed.connect(self._failed, Qt.QueuedConnection)
        self.call = call.start()

    def _done(self, outcome) -> None:
        results, note = outcome
        for tc, res in results:
            self.c.add_tool_result(tc["id"], tool_message(tc["id"], res)["content"], error=res.is_error)
        cancelled = self.c.tools_cancel.is_set()
        self.c.end_tools()
        if note is not None:
            self.c.notice.emit(note.text)
        elif not cancelled:
            self.c.continue_turn()

    def _failed(self, problem: str, details: str) -> None:
        for tc in self._calls:                  # every call gets its answer: the history stays valid
            self.c.add_tool_result(tc["id"], f"Error: not run: {problem}", error=True)
        self.c.end_tools()
        self.c.notice.emit(f"the tool calls failed: {problem}")
