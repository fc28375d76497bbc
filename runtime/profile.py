"""Time per stage of the forward pass, for `kimi-desktop bench`: pass a StageTimer to load_model."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

_NOTHING = nullcontext()


class StageTimer:
    """Seconds and calls per named stage; a disabled timer (the model's default) costs one branch."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def stage(self, name: str):
        return self._timed(name) if self.enabled else _NOTHING

    @contextmanager
    def _timed(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t
            self.calls[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)
