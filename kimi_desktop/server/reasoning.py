"""Reasoning budgets: how each API's reasoning setting becomes the engine's cap on thinking tokens
(Sampling.max_reasoning_tokens: after that many tokens inside <think>, the engine closes the block
and the model answers).

    Responses / Chat `reasoning_effort`:  none 0, minimal 256, low 1024, medium 4096, high 16384,
                                          xhigh 32768 tokens; absent: no cap but max_tokens
    Anthropic `thinking`:                 {"type": "enabled", "budget_tokens": N} -> N,
                                          {"type": "disabled"} -> 0; {"type": "adaptive"} or
                                          absent: `output_config.effort` low / medium / high as
                                          above, else (max, none given) no cap but max_tokens

The README's API section documents the same table.
"""

from __future__ import annotations

EFFORT_TOKENS = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768}


def effort_budget(effort: str | None) -> int | None:
    """OpenAI's reasoning effort -> a thinking-token cap (None: not capped)."""
    return None if effort is None else EFFORT_TOKENS[effort]


def thinking_budget(thinking: dict | None, effort: str | None = None) -> int | None:
    """Anthropic's `thinking` object -> a thinking-token cap (None: not capped). When the model decides
    (adaptive or absent), `output_config.effort` low / medium / high caps it as the table says."""
    if thinking is None or thinking["type"] == "adaptive":
        return EFFORT_TOKENS.get(effort) if effort else None
    return 0 if thinking["type"] == "disabled" else int(thinking["budget_tokens"])
