"""What a generation stream yields: small frozen events, the same for every engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PrefillProgress:
    done: int                   # prompt tokens of this prefill computed so far
    total: int                  # prompt tokens this prefill computes (cached ones excluded)


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int                  # 0-based position of the call within this response
    id: str | None              # set once, on the call's first delta (as the model wrote it)
    name: str | None            # set once, with the id
    arguments_fragment: str     # the next piece of the arguments JSON text ("" on the first delta)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str                 # stop | length | tool_calls | cancelled
    stop_sequence: str | None = None    # with "stop": the stop string that ended the text, if one did


Event = PrefillProgress | ReasoningDelta | ContentDelta | ToolCallDelta | TokenLogprobs | Usage | Finish
