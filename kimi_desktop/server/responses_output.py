"""The Responses API's output: chat-API events -> output items and their stream events, and the
response object around them (responses_api.py has the mapping table).

    out = Output(engine.tokenizer)
    for ev in stream: events = out.feed(ev)     # Responses stream events (dicts without sequence_number)
    out.items, out.status(finish), out.reasoning_tokens()

One item is open at a time: a reasoning item while ReasoningDelta arrives, a message item while
ContentDelta arrives, a function_call item from the ToolCallDelta that names a call; a change of kind
closes the open item (its .done events) and opens the next. The plain answer uses the same items.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from kimi_desktop.chat import ContentDelta, Finish, ReasoningDelta, ToolCallDelta, Usage


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Output:
    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer          # counts reasoning tokens (None: one per reasoning delta)
        self.items: list[dict] = []
        self.finished: str | None = None
        self._open: int | None = None       # index of the open item
        self._calls: dict[int, int] = {}    # the engine's tool-call index -> item index
        self._reasoning_deltas = 0

    # -- events ------------------------------------------------------------------------------------------
    def feed(self, ev) -> list[dict]:
        if isinstance(ev, ReasoningDelta):
            self._reasoning_deltas += 1
            return self._text("reasoning", ev.text)
        if isinstance(ev, ContentDelta):
            return self._text("message", ev.text)
        if isinstance(ev, ToolCallDelta):
            return self._call(ev)
        if isinstance(ev, Finish):
            self.finished = ev.reason
            return self._close("incomplete" if ev.reason == "length" else "completed")
        return []

    def _text(self, kind: str, text: str) -> list[dict]:
        out = []
        if self._open is None or self.items[self._open]["type"] != kind:
            out += self._close("completed")
            out += self._add(kind)
        i = self._open
        item = self.items[i]
        part = item["content"][0]
        part["text"] += text
        delta = {"type": "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta",
                 "item_id": item["id"], "output_index": i, "content_index": 0, "delta": text}
        if kind == "message":
            delta["logprobs"] = []
        return out + [delta]

    def _call(self, ev: ToolCallDelta) -> list[dict]:
        out = []
        if ev.index not in self._calls:
            out += self._close("completed")
            item = {"id": new_id("fc"), "type": "function_call", "call_id": ev.id, "name": ev.name or "",
                    "arguments": "", "status": "in_progress"}
            self.items.append(item)
            self._open = self._calls[ev.index] = len(self.items) - 1
            out.append({"type": "response.output_item.added", "output_index": self._open, "item": dict(item)})
        i = self._calls[ev.index]
        item = self.items[i]
        if ev.id is not None:
            item["call_id"] = ev.id
        if ev.name is not None:
            item["name"] = ev.name
        if ev.arguments_fragment:
            item["arguments"] += ev.arguments_fragment
            out.append({"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": i,
                        "delta": ev.arguments_fragment})
        return out

    def _add(self, kind: str) -> list[dict]:
        if kind == "reasoning":
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": []}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.items.append(item)
        i = self._open = len(self.items) - 1
        added = [{"type": "response.output_item.added", "output_index": i, "item": _copy(item)},
                 {"type": "response.content_part.added", "item_id": item["id"], "output_index": i,
                  "content_index": 0, "part": dict(part)}]
        item["content"].append(part)
        return added

    def _close(self, status: str) -> list[dict]:
        """The .done events of the open item, which gets `status` (message and function_call items)."""
        if self._open is None:
            return []
        i, self._open = self._open, None
        item = self.items[i]
        out = []
        if item["type"] == "function_call":
            item["status"] = status
            out.append({"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": i,
                        "name": item["name"], "arguments": item["arguments"]})
        else:
            part = item["content"][0]
            head = {"item_id": item["id"], "output_index": i, "content_index": 0}
            if item["type"] == "reasoning":
                out.append({"type": "response.reasoning_text.done", **head, "text": part["text"]})
            else:
                item["status"] = status
                out.append({"type": "response.output_text.done", **head, "text": part["text"], "logprobs": []})
            out.append({"type": "response.content_part.done", **head, "part": dict(part)})
        out.append({"type": "response.output_item.done", "output_index": i, "item": _copy(item)})
        return out

    # -- totals --------------------------------------------------------------------------------------------
    def status(self, finish: str | None) -> str:
        return "incomplete" if finish == "length" else "completed"

    def reasoning_tokens(self) -> int:
        text = "".join(it["content"][0]["text"] for it in self.items if it["type"] == "reasoning")
        if not text:
            return 0
        if self.tokenizer is None:
            return self._reasoning_deltas
        return len(self.tokenizer.encode(text))


def _copy(item: dict) -> dict:
    return {**item, "content": [dict(p) for p in item["content"]]} if "content" in item else dict(item)


def usage_object(u: Usage | None, reasoning_tokens: int) -> dict:
    """cached_tokens: the prompt prefix the engine reused; cache_write_tokens (OpenAI's explicit prompt
    caching, which the SDK's model requires) is always 0."""
    u = u or Usage(0, 0, 0)
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_prompt_tokens, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, u.completion_tokens)},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def response_object(rid: str, created: int, model: str, body, status: str, output: list[dict],
                    usage: dict | None) -> dict:
    """The response object, echoing the request's settings as OpenAI does (the SDK's Response needs
    parallel_tool_calls, tool_choice and tools)."""
    tc = body.tool_choice
    tool_choice: Any = tc.model_dump(include={"type", "name"}) if hasattr(tc, "model_dump") else (tc or "auto")
    tools = [t.model_dump(include={"type", "name", "description", "parameters", "strict"})
             for t in body.tools or [] if t.type == "function"]
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    text = {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None else {"type": "text"}}
    reasoning = body.reasoning
    return {
        "id": rid, "object": "response", "created_at": created, "status": status,
        "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": model,
        "output": [_copy(it) for it in output],
        "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        "previous_response_id": None,
        "reasoning": {"effort": reasoning.effort if reasoning else None,
                      "summary": (reasoning.summary or reasoning.generate_summary) if reasoning else None},
        "store": False, "temperature": body.temperature, "top_p": body.top_p, "text": text,
        "tool_choice": tool_choice, "tools": tools, "truncation": body.truncation or "disabled",
        "usage": usage, "user": body.user, "metadata": body.metadata or {}, "background": False,
    }
