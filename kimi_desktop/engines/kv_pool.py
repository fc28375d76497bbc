"""The native engine's prefix cache: several conversations' latent caches held within a RAM budget.

A request continues from the held session with the longest common token prefix (vLLM's prefix
caching, llama-server's slot selection), or from the disk store's (kimi_desktop/kv_store.py) when that
one reaches further. When the best session goes on past the shared prefix with another conversation's
tokens, the prefix is copied into a new session (fork) so that the other conversation stays cached;
sessions are dropped least recently used first when the budget is spent. After a finished turn the
session is written to the disk store, so a restart continues where it ended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kimi_desktop.notices import log
from kimi_desktop.runtime.generate import common_prefix

__all__ = ["SessionPool"]


class SessionPool:
    """new_session() -> an empty Session; budget_bytes: RAM for every held cache together (at least
    the session in use is kept); store: a KVStore or None."""

    def __init__(self, new_session: Callable[[], object], budget_bytes: int, store=None, max_sessions: int = 16):
        self.new_session, self.budget, self.store = new_session, int(budget_bytes), store
        self.max_sessions = max(1, int(max_sessions))
        self.sessions: list = [new_session()]          # least recently used first

    @property
    def ram_bytes(self) -> int:
        return sum(s.cache.nbytes for s in self.sessions)

    def acquire(self, prompt: Sequence[int]) -> tuple[object, int]:
        """The session to run `prompt` on, holding its longest cached prefix (never its last token:
        that token's logits start the generation), and how many prompt tokens it holds."""
        cap = max(len(prompt) - 1, 0)
        best, n = max(((s, min(common_prefix(s.tokens, prompt), cap)) for s in self.sessions),
                      key=lambda sn: sn[1])
        if self.store is not None:
            best, n = self._from_disk(prompt, cap, best, n)
        if n == 0:
            best = self._fresh(best)
        elif len(best.tokens) > n and self._room_for(n):
            best = self._add(best.fork(n))              # keep the other conversation's tail cached
        best.truncate(n)
        self._use(best)
        return best, n

    def finished(self, session) -> None:
        """A turn ended normally: write its cache to the disk store (failures are logged, not raised)."""
        if self.store is None or not session.tokens:
            return
        try:
            self.store.save(*session.state())
        except OSError as e:
            log.warning(f"could not save the conversation's KV cache: {e}")

    def reset(self) -> None:
        for s in self.sessions:
            s.truncate(0)

    # -- choosing --------------------------------------------------------------------------------
    def _from_disk(self, prompt, cap: int, best, n: int):
        d, entry = self.store.best(prompt)
        if entry is None or min(d, cap) <= n:
            return best, n
        state = self.store.load(entry)
        if state is None:                               # rejected (and logged) by the store
            return best, n
        s = next((s for s in self.sessions if not s.tokens), None) or self._add(self.new_session())
        tokens, kv, pe = state
        s.restore(list(tokens), kv, pe)
        n = min(common_prefix(s.tokens, prompt), cap)
        s.truncate(n)                                   # the file keeps the rest: no fork needed
        return s, n

    def _fresh(self, best):
        """No held prefix: a new session when there is room, else the least recently used, emptied."""
        if not best.tokens:
            return best
        empty = next((s for s in self.sessions if not s.tokens), None)
        if empty is not None:
            return empty
        return self._add(self.new_session()) if self._room_for(0) else self.sessions[0]

    def _room_for(self, n_tokens: int) -> bool:
        s = self.sessions[-1]
        need = n_tokens * s.cache.bytes_per_token
        return len(self.sessions) < self.max_sessions and self.ram_bytes + need <= self.budget

    def _add(self, session):
        self.sessions.append(session)
        return session

    def _use(self, session) -> None:
        """Most recently used last; drop the least recently used past the budget (never this one)."""
        self.sessions.remove(session)
        self.sessions.append(session)
        while len(self.sessions) > 1 and (self.ram_bytes > self.budget or len(self.sessions) > self.max_sessions):
            self.sessions.pop(0)
