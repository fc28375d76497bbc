"""`n` choices for one request (Chat Completions and Completions): n engine streams queued back to
back in the engine's FIFO (so they run one after another and the repeated prompt comes from the
prefix cache), seen by the server as one stream that the admission limit counts once.

    group = Choices([lambda: engine.chat(..., sampling=s0), lambda: engine.chat(..., sampling=s1)])
    for ev in group: ...        # Indexed(i, event) per choice (its Usage and Finish included),
                                # then the group's Usage and Finish

Usage: prompt_tokens and cached_tokens of the first choice (one prompt, as OpenAI bills it),
completion_tokens summed over the choices. The closing Finish is "cancelled" if any choice was
cancelled, else the last choice's reason. cancel() cancels every choice (the waiting ones leave the
queue).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kimi_desktop.chat import Finish, Sampling, Usage

__all__ = ["Choices", "Indexed", "seeded"]


@dataclass(frozen=True)
class Indexed:
    """An event of choice `index`."""
    index: int
    event: Any


def seeded(sampling: Sampling, n: int) -> list[Sampling]:
    """n copies of sampling; with a seed, choice i gets seed + i (mod 2**64)."""
    if sampling.seed is None:
        return [replace(sampling) for _ in range(n)]
    return [replace(sampling, seed=(sampling.seed + i) % 2 ** 64) for i in range(n)]


class Choices:
    """n ChatStreams as one (see the module docstring); the starts run at once, in order."""

    def __init__(self, starts: Sequence[Callable[[], Any]]):
        self.streams: list = []
        try:
            for begin in starts:
                self.streams.append(begin())
        except BaseException:
            for s in self.streams:
                s.cancel()
            raise
        self.finished = threading.Event()
        self._watch = threading.Thread(target=self._wait_all, name="kimi-choices", daemon=True)
        self._watch.start()
        self.finish_reasons: list[str | None] = [None] * len(self.streams)
        self.error: BaseException | None = None

    def _wait_all(self) -> None:
        for s in self.streams:
            s.finished.wait()
        self.finished.set()

    # what Turn reads for timings: the group runs from the first choice's start to the last one's end
    @property
    def queued_at(self) -> float:
        return self.streams[0].queued_at

    @property
    def started_at(self) -> float | None:
        return self.streams[0].started_at

    @property
    def first_token_at(self) -> float | None:
        return self.streams[0].first_token_at

    @property
    def cancelled(self) -> bool:
        return any(s.cancelled for s in self.streams)

    def cancel(self) -> None:
        for s in reversed(self.streams):        # the waiting ones first: none of them starts meanwhile
            s.cancel()

    def __iter__(self) -> Iterator:
        usages: list[Usage] = []
        try:
            for i, s in enumerate(self.streams):
                for ev in s:
                    self._note(i, ev, usages)
                    yield Indexed(i, ev)
        except BaseException:
            self.cancel()
            raise
        yield from self._closing(usages)

    def relay(self, callback) -> None:
        """ChatStream.relay for the group: each choice's items as Indexed, one choice after another,
        then the group's Usage and Finish, then None."""
        usages: list[Usage] = []

        def attach(i: int) -> None:
            s = self.streams[i]

            def on(item) -> None:
                if item is not None:
                    self._note(i, item, usages)
                    callback(Indexed(i, item))
                elif s.error is not None:
                    self.error = s.error
                    self.cancel()
                    callback(None)
                elif i + 1 < len(self.streams):
                    attach(i + 1)
                else:
                    for ev in self._closing(usages):
                        callback(ev)
                    callback(None)
            s.relay(on)
        attach(0)

    def _note(self, i: int, ev, usages: list[Usage]) -> None:
        if isinstance(ev, Usage):
            usages.append(ev)
        elif isinstance(ev, Finish):
            self.finish_reasons[i] = ev.reason

    def _closing(self, usages: list[Usage]) -> list:
        first = usages[0] if usages else Usage(0, 0, 0)
        reasons = self.finish_reasons
        return [Usage(first.prompt_tokens, sum(u.completion_tokens for u in usages), first.cached_prompt_tokens),
                Finish("cancelled" if "cancelled" in reasons or None in reasons else reasons[-1])]
