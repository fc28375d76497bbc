"""Conversations and stream helpers shared by the engine tests (native, llama.cpp, remote)."""

import threading
import time

from kimi_desktop.chat import ContentDelta, ReasoningDelta


MSGS = [{"role": "user", "content": "Hi"}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}},
]
# one earlier tool call in the history -> the next call's IDX is 1
TOOL_HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    {"role": "user", "content": "And 2+3?"},
]


def cancel_after(stream, n: int, kinds=(ReasoningDelta, ContentDelta), at_cancel=lambda: None):
    """Read the stream to its end, cancelling it from another thread after the n-th event of `kinds`.
    Returns (monotonic time of the cancel or None, what at_cancel() returned right after it)."""
    seen, t_cancel, mark = 0, None, None
    for ev in stream:
        if isinstance(ev, kinds):
            seen += 1
            if seen == n:
                th = threading.Thread(target=stream.cancel)
                th.start()
                th.join()
                t_cancel = time.monotonic()
                mark = at_cancel()
    return t_cancel, mark
