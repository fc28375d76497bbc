"""A real-looking conversation for the screenshots: reasoning, a code block, a tool call and its result,
and status figures as a generation on the 1T model would report them (fed to the status row)."""

from __future__ import annotations

from kimi_desktop.conversations import ConversationStore, Message

QUESTION = "Which of my Python files are the largest? Then show me how to list them sorted by size."
REASONING = ("The user wants the largest Python files. I can call the list_files tool on the project "
             "folder, then sort by size. After that, a short snippet with pathlib will answer the second part.")
ANSWER = """The largest Python files in **~/project** are `engine.py` (48 KB) and `model.py` (31 KB).

To list them yourself, sorted by size:

```python
from pathlib import Path

files = sorted(Path("~/project").expanduser().rglob("*.py"),
               key=lambda p: p.stat().st_size, reverse=True)
for p in files[:5]:
    print(f"{p.stat().st_size / 1024:6.1f} KB  {p}")
```

`rglob` walks every subfolder; drop `[:5]` to see them all."""

STATUS = {"generating": True, "tok_s": 4.8, "ttft_s": 2.31, "hit_rate": 0.87, "disk_mb_s": 912.4,
          "ram_bytes": 41 * 2**30 + 2**29, "context_used": 1874, "context_size": 131072,
          "model_label": "Kimi-K2-Thinking (INT4, experts from NVMe)", "expert_cache_mode": "expert store"}
# 60 samples of one answer: tokens/s ramps up as the expert cache warms, then holds near 4.8
CHART = [(0.0, None)] + [(round(4.8 * min(1.0, 0.45 + i / 14) + 0.25 * ((i * 7) % 5 - 2) / 2, 2),
                          round(min(0.88, 0.55 + i * 0.03) - 0.01 * ((i * 3) % 4), 3)) for i in range(59)]


def fill(store: ConversationStore) -> int:
    store.create("Hello", system_prompt="")
    cid = store.create("Largest Python files", system_prompt="You are a careful coding assistant.")
    store.add_message(cid, Message("user", QUESTION))
    store.add_message(cid, Message("assistant", "", reasoning="I should look at the folder first.",
                                   tool_calls=[{"id": "functions.list_files:0", "name": "list_files",
                                                "arguments": '{"path": "~/project", "pattern": "*.py"}'}],
                                   finish="tool_calls"))
    store.add_message(cid, Message("tool", "engine.py 48213\nmodel.py 31877\ncli.py 9120\n__init__.py 212",
                                   tool_call_id="functions.list_files:0"))
    store.add_message(cid, Message("assistant", ANSWER, reasoning=REASONING, finish="stop"))
    return cid
