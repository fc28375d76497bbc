"""Token sampling: logits processors (penalties), a truncation chain, seeded draws, logprobs.

Pure numpy; knows nothing of engines, tokenizers or chat formats.

Order of operations for one step (the vLLM / Hugging Face order):

1. penalties on the raw logits
   - repetition_penalty (HF / llama.cpp): over the distinct tokens of prompt + generated (or only the
     last `repetition_last_n` of them), a positive logit is divided by the penalty, a negative one
     multiplied by it;
   - presence / frequency (OpenAI): over the *generated* tokens only,
     ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``;
2. an allowed-token mask (constraints; `tool_choice`, JSON): disallowed tokens get -inf;
3. temperature (0 = greedy: the highest processed logit wins, ties to the lowest id);
4. top_k, then top_p (nucleus over the tempered distribution, most likely first: tokens are kept up to
   and including the first whose cumulative probability reaches top_p - 1e-12, so a mass that reaches
   top_p exactly but rounds a hair below it keeps no extra token), then min_p (keep p >= min_p * max p).
   Each keeps at least one token.

Logprobs (OpenAI's `logprobs` / `top_logprobs`) are reported from the model's own distribution as the
request shapes it: log-softmax of the logits after step 1 (penalties) at temperature 1, before the
mask, temperature and truncation. That is what OpenAI and vLLM's default report, so a token forced by
a constraint may have a low logprob.

Drawing: with a seed, `np.random.default_rng(seed)`; the same seed, logits and history give the same
tokens. Sampling uses the Gumbel-max trick (argmax of log p + Gumbel noise) so that a lazy acceptance
test (`accept`, for constraints too costly to evaluate over the whole vocabulary) can walk candidates in
key order: the first accepted candidate is an exact draw from the truncated distribution restricted to
the accepted tokens. If no kept token is accepted, the walk continues over the tokens that truncation
removed (a draw from the tempered distribution restricted to accepted tokens), and only then fails.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

NEG_INF = -np.inf


class NoAllowedToken(RuntimeError):
    """Every token is masked or rejected: the constraint leaves nothing to sample."""


class SamplingError(ValueError):
    """An impossible setting; `field` names it (the chat API reports it as the request's `param`)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def check_number(name: str, v, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
    """SamplingError unless v is a finite number in [lo, hi] ((lo, hi] with lo_open)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
        raise SamplingError(f"{name} must be a number, got {v!r}", name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise SamplingError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise SamplingError(f"{name} must be <= {hi}, got {v}", name)


def check_integer(name: str, v, lo: int, hi: int | None = None, optional: bool = True) -> None:
    """SamplingError unless v is an integer in [lo, hi] (or None, when optional)."""
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise SamplingError(f"{name} must be an integer, got {v!r}", name)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise SamplingError(f"{name} must be {rng}, got {v}", name)


@dataclass
class SamplerConfig:
    """The sampler's settings, named as in OpenAI's request (top_k, min_p, repetition_penalty and
    repetition_last_n as in llama.cpp / vLLM); the chat API's `Sampling` extends it."""
    temperature: float = 1.0
    top_p: float = 1.0                  # 1 = off
    top_k: int = 0                      # 0 = off
    min_p: float = 0.0                  # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0     # 1 = off
    repetition_last_n: int = 0          # 0 = the whole prompt + generated history
    seed: int | None = None

    def validate(self) -> None:
        """SamplingError naming the first impossible field."""
        check_number("temperature", self.temperature, 0.0)
        check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_number("min_p", self.min_p, 0.0, 1.0)
        check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        check_number("repetition_penalty", self.repetition_penalty, 0.0, lo_open=True)
        check_integer("top_k", self.top_k, 0, optional=False)
        check_integer("repetition_last_n", self.repetition_last_n, 0, optional=False)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise SamplingError(f"seed must be an integer, got {self.seed!r}", "seed")


# ---------------------------------------------------------------------------------------------
# Logits processors (each returns a new float64 array)

def apply_repetition_penalty(logits: np.ndarray, history: Iterable[int], penalty: float) -> np.ndarray:
    """HF RepetitionPenaltyLogitsProcessor: for each distinct token seen, logit/penalty if > 0 else
    logit*penalty."""
    out = np.array(logits, dtype=np.float64)
    if penalty == 1.0:
        return out
    ids = np.unique(np.fromiter(history, dtype=np.int64))
    if ids.size:
        v = out[ids]
        with np.errstate(over="ignore"):        # a tiny penalty: +inf, the greedy limit (log_softmax)
            out[ids] = np.where(v > 0, v / penalty, v * penalty)
    return out


def apply_presence_frequency(logits: np.ndarray, counts: dict[int, int] | Counter,
                             presence: float, frequency: float) -> np.ndarray:
    """OpenAI: logit[j] -= count[j] * frequency + (count[j] > 0) * presence."""
    out = np.array(logits, dtype=np.float64)
    if (presence == 0 and frequency == 0) or not counts:
        return out
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    c = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
    out[ids] -= c * frequency + (c > 0) * presence
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x)
    if m == np.inf:                 # a tiny temperature or penalty overflowed: the limit, equal shares of the top
        top = x == np.inf
        return np.where(top, -np.log(np.count_nonzero(top)), NEG_INF)
    if not np.isfinite(m):
        raise NoAllowedToken("every token is masked")
    z = x - m
    with np.errstate(divide="ignore", invalid="ignore"):
        return z - np.log(np.sum(np.exp(z)))


def tempered_log_softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    """log_softmax(x / temperature) without overflow at tiny temperatures: the max is taken off first,
    so the top stays finite (the limit is greedy: the rest goes to -inf, not the top to +inf)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x)
    if not np.isfinite(m):          # +inf entries (an overflowed penalty) take it all; -inf / nan: none left
        return log_softmax(x)
    with np.errstate(over="ignore"):
        return log_softmax((x - m) / temperature)


def truncate(logp: np.ndarray, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """Boolean keep-mask over a normalised log-distribution: top_k, then top_p, then min_p (each on
    what the previous kept, renormalised), always keeping at least the most likely token."""
    keep = np.isfinite(logp)
    n_keep = int(keep.sum())
    if n_keep == 0:
        raise NoAllowedToken("every token is masked")
    if top_k and top_k < n_keep:
        # ties at the k-th value: keep the lowest ids (stable order)
        order = np.argsort(-logp, kind="stable")
        k_mask = np.zeros_like(keep)
        k_mask[order[:top_k]] = True
        keep &= k_mask
    if top_p < 1.0:
        idx = np.flatnonzero(keep)
        p = np.exp(logp[idx] - np.max(logp[idx]))
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # keep tokens up to and including the one whose cumulative mass reaches top_p
        n = int(np.searchsorted(cum, top_p - 1e-12, side="left")) + 1
        sel = np.zeros_like(keep)
        sel[idx[order[:max(1, n)]]] = True
        keep &= sel
    if min_p > 0.0:
        idx = np.flatnonzero(keep)
        lp = logp[idx]
        thresh = np.max(lp) + math.log(min_p)
        keep[idx[lp < thresh]] = False
    return keep


def distribution(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, allowed: np.ndarray | None = None) -> np.ndarray:
    """The probabilities the sampler draws from for already-penalised logits (float64, sums to 1).

    Temperature 0 gives a one-hot on the greedy token.
    """
    x = np.array(logits, dtype=np.float64)
    if allowed is not None:
        x[~allowed] = NEG_INF
    if temperature == 0:
        p = np.zeros_like(x)
        p[greedy(x)] = 1.0
        return p
    logp = tempered_log_softmax(x, temperature)
    keep = truncate(logp, top_k, top_p, min_p)
    p = np.where(keep, np.exp(logp), 0.0)
    return p / p.sum()


def greedy(x: np.ndarray) -> int:
    i = int(np.argmax(x))
    if not x[i] > NEG_INF:         # -inf (all masked) or nan; +inf (an overflowed penalty) is a fine greedy pick
        raise NoAllowedToken("every token is masked")
    return i


def top_logprobs(logp: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely (id, logprob), most likely first (ties: lowest id first)."""
    if n <= 0:
        return []
    n = min(n, logp.size)
    part = np.argpartition(-logp, n - 1)[:n]
    part = part[np.lexsort((part, -logp[part]))]
    return [(int(i), float(logp[i])) for i in part]


# ---------------------------------------------------------------------------------------------
# The stateful sampler for one generation

@dataclass(frozen=True)
class Draw:
    token: int
    logprob: float | None = None                      # of `token`, see the module docstring
    top: tuple[tuple[int, float], ...] = ()           # top-N (id, logprob)


class Sampler:
    """One generation's sampler: the history for penalties and a seeded generator.

    >>> s = Sampler(SamplerConfig(temperature=0), prompt_ids=[1, 2])
    >>> d = s.sample(logits)          # a Draw; s.record(d.token) is done by sample()
    """

    def __init__(self, cfg: SamplerConfig | None = None, prompt_ids: Sequence[int] = ()):
        cfg = cfg if cfg is not None else SamplerConfig()
        cfg.validate()
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.history: list[int] = [int(t) for t in prompt_ids]     # prompt + generated
        self.counts: Counter = Counter()                            # generated only

    # -- processing -----------------------------------------------------------------------------
    def process(self, logits: np.ndarray) -> np.ndarray:
        """Raw logits -> logits after penalties (float64)."""
        c = self.cfg
        x = np.asarray(logits, dtype=np.float64)
        if c.repetition_penalty != 1.0:
            hist = self.history[-c.repetition_last_n:] if c.repetition_last_n else self.history
            x = apply_repetition_penalty(x, hist, c.repetition_penalty)
        if c.presence_penalty or c.frequency_penalty:
            x = apply_presence_frequency(x, self.counts, c.presence_penalty, c.frequency_penalty)
        return x if x is not logits else np.array(x)

    def record(self, token: int) -> None:
        """Add a generated (or forced) token to the history."""
        self.history.append(int(token))
        self.counts[int(token)] += 1

    def logprobs(self, processed: np.ndarray, token: int, n: int = 0) -> tuple[float, tuple]:
        lp = log_softmax(processed)
        return float(lp[token]), tuple(top_logprobs(lp, n))

    # -- drawing --------------------------------------------------------------------------------
    def candidates(self, processed: np.ndarray, allowed: np.ndarray | None = None) -> Iterator[int]:
        """Token ids in the order a lazy acceptance test should try them (see the module docstring):
        greedy: descending logit; sampling: descending Gumbel key over the truncated distribution,
        then over the tokens truncation removed."""
        c = self.cfg
        x = processed
        if allowed is not None:
            x = np.where(allowed, x, NEG_INF)
        if c.temperature == 0:
            yield from _descending(x)
            return
        logp = tempered_log_softmax(x, c.temperature)
        keep = truncate(logp, c.top_k, c.top_p, c.min_p)
        kept = np.flatnonzero(keep)
        if kept.size == 1:
            yield int(kept[0])
        else:
            lpk = logp[kept] - np.log(np.sum(np.exp(logp[kept])))
            keys = lpk + self.rng.gumbel(size=kept.size)
            for j in _descending(keys):
                yield int(kept[j])
        rest = np.flatnonzero(~keep & np.isfinite(logp))
        if rest.size:
            keys = logp[rest] + self.rng.gumbel(size=rest.size)
            for j in _descending(keys):
                yield int(rest[j])

    def sample(self, logits: np.ndarray, allowed: np.ndarray | None = None,
               accept: Callable[[int], bool] | None = None, logprobs: int | None = None,
               record: bool = True) -> Draw:
        """Draw one token from raw logits.

        allowed: bool mask [vocab] (False = never); accept: a lazy per-token test applied in candidate
        order; logprobs: None for none, else the number of top alternatives to report (0 = only the
        chosen token's). Raises NoAllowedToken when nothing passes.
        """
        x = self.process(logits)
        if accept is None:
            tok = self._draw(x, allowed)
        else:
            tok = next((t for t in self.candidates(x, allowed) if accept(t)), None)
            if tok is None:
                raise NoAllowedToken("no token satisfies the constraint")
        lp, top = (None, ())
        if logprobs is not None:
            lp, top = self.logprobs(x, tok, logprobs)
        if record:
            self.record(tok)
        return Draw(tok, lp, top)

    def _draw(self, x: np.ndarray, allowed: np.ndarray | None) -> int:
        """A token with no lazy test: greedy (the first candidate), or the inverse CDF at one uniform
        (cheaper than Gumbel keys over the vocabulary)."""
        c = self.cfg
        if c.temperature == 0:
            return greedy(x if allowed is None else np.where(allowed, x, NEG_INF))
        p = distribution(x, c.temperature, c.top_k, c.top_p, c.min_p, allowed)
        cdf = np.cumsum(p)
        u = self.rng.random() * cdf[-1]
        tok = int(min(np.searchsorted(cdf, u, side="right"), p.size - 1))
        while p[tok] == 0:           # float edge: land on a zero-probability slot -> step back
            tok -= 1
        return tok

    def forced(self, logits: np.ndarray, token: int, logprobs: int | None = None) -> Draw:
        """Record a token chosen by a constraint (not drawn); logprobs as for sample()."""
        lp, top = (None, ())
        if logprobs is not None:
            lp, top = self.logprobs(self.process(logits), token, logprobs)
        self.record(token)
        return Draw(int(token), lp, top)


def _descending(x: np.ndarray, first: int = 64) -> Iterator[int]:
    """Indices of the entries of x above -inf, largest first (ties: lowest index first); lazily: a partial
    sort of the best `first`, the full sort only if the caller keeps going."""
    n = x.size
    if n == 0:
        return
    if n > first * 4:
        part = np.argpartition(-x, first - 1)[:first]
        part = part[np.lexsort((part, -x[part]))]
        best = int(np.argmax(x))                    # lowest id among tied maxima, like argmax
        if part[0] != best:
            part = np.concatenate(([best], part[part != best]))
        for i in part:
            if not x[i] > NEG_INF:          # -inf (masked) or nan ends it; +inf leads
                return
            yield int(i)
        # everything not yet yielded, in order
        seen = np.zeros(n, dtype=bool)
        seen[part] = True
        order = np.argsort(-x, kind="stable")
        for i in order:
            if seen[i]:
                continue
            if not x[i] > NEG_INF:
                return
            yield int(i)
        return
    for i in np.argsort(-x, kind="stable"):
        if not x[i] > NEG_INF:
            return
        yield int(i)

