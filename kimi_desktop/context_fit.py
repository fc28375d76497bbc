"""Does a conversation fit the engine's context, and what to leave out when the user says so.
Qt-free; the app asks before sending (never truncates silently), as LM Studio does.

    n = prompt_tokens(engine, messages, tools)        # None when the engine cannot count (remote)
    fit = fit_context(engine, messages, tools, reserve=256)
    fit.fits, fit.prompt_tokens, fit.context
    kept, dropped = drop_oldest_turns(engine, messages, tools, reserve=256)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kimi_desktop.chat import ChatRequestError

__all__ = ["ContextFit", "prompt_tokens", "context_size", "fit_context", "drop_oldest_turns", "DEFAULT_RESERVE"]

DEFAULT_RESERVE = 256          # tokens the answer needs at least, beyond the prompt


@dataclass(frozen=True)
class ContextFit:
    fits: bool
    prompt_tokens: int | None
    context: int | None
    reserve: int


def prompt_tokens(engine, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> int | None:
    """Tokens the rendered conversation takes (engine.prompt_tokens: its own chat template and tokenizer);
    None when the engine cannot count (remote) or refuses the conversation (chat() then says why)."""
    count = getattr(engine, "prompt_tokens", None)
    if not callable(count):
        return None
    try:
        return count(messages, tools)
    except ChatRequestError:
        return None


def context_size(engine) -> int | None:
    ctx = getattr(engine, "ctx", None)
    if isinstance(ctx, int) and ctx > 0:
        return ctx
    try:
        v = engine.stats().get("context_size")
    except Exception:
        return None
    return int(v) if isinstance(v, int) and v > 0 else None


def fit_context(engine, messages: Sequence[dict], tools: Sequence[dict] | None = None, reserve: int | None = None,
                max_tokens: int | None = None) -> ContextFit:
    ctx = context_size(engine)
    n = prompt_tokens(engine, messages, tools)
    r = reserve if reserve is not None else min(max_tokens or DEFAULT_RESERVE, DEFAULT_RESERVE)
    if ctx is not None:
        r = min(r, max(ctx // 8, 1))
    fits = ctx is None or n is None or n + r <= ctx
    return ContextFit(fits, n, ctx, r)


def _turn_starts(messages: Sequence[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m.get("role") == "user"]


def drop_oldest_turns(engine, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                      reserve: int | None = None, max_tokens: int | None = None
                      ) -> tuple[list[dict] | None, int]:
    """(messages without their oldest turns, turns dropped): whole turns (a user message and what
    answers it) go, oldest first, until the rest fits; system messages stay. (None, n) when even the
    last turn alone does not fit."""
    msgs: list[Any] = list(messages)
    system = [m for m in msgs if m.get("role") in ("system", "developer")]
    rest = [m for m in msgs if m.get("role") not in ("system", "developer")]
    starts = _turn_starts(rest)
    for dropped in range(0, len(starts)):
        kept = system + rest[starts[dropped]:]
        if fit_context(engine, kept, tools, reserve, max_tokens).fits:
            return kept, dropped
    return None, len(starts)
