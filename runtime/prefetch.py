"""When a MoE layer reads the next layer's likely experts ahead of time (decode only)."""

from __future__ import annotations

from collections import deque


class PrefetchGate:
    """Whether a MoE layer reads its guess of the next layer's experts ahead of time.

    The guess (the next layer's router on this layer's hidden state) is good on some models and
    near chance on others, and a wasted read costs disk time and a slot. So guesses are scored in
    the shadow: when the next layer routes, each guessed expert that was not resident at guess time
    counts as used or not. Reads are issued only while the share used over the last `window` scored
    guesses is at least `min_precision` (at 0.75, at most one wasted read per three used ones).
    While off, a guess is made (and scored) every `probe_every` steps only: it costs a router GEMV.
    """

    def __init__(self, min_precision: float = 0.75, window: int = 32, min_samples: int = 8,
                 probe_every: int = 4):
        self.min_precision, self.min_samples, self.probe_every = min_precision, min_samples, probe_every
        self.scores: deque[bool] = deque(maxlen=window)
        self.pending: list[int] | None = None
        self.steps = 0

    @property
    def precision(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None

    @property
    def active(self) -> bool:
        n = len(self.scores)
        return n >= self.min_samples and (n == 0 or sum(self.scores) >= self.min_precision * n)

    def wants_guess(self) -> bool:
        self.steps += 1
        return self.active or self.steps % self.probe_every == 0

    def guessed(self, missing: list[int]) -> None:
        self.pending = missing

    def observe(self, routed) -> None:
        """The experts the layer actually routes to (this step)."""
        if self.pending is not None:
            routed = set(int(e) for e in routed)
            self.scores.extend(e in routed for e in self.pending)
            self.pending = None
