"""One generation: prefill the prompt, then decode one token at a time (mlx-lm's `generate_step`,
gpt-fast's `prefill` / `decode_one_token`). Used by `Model.generate` and by the local engines.

Knows nothing of text, chat formats or streams. A *session* is a KV cache with

    session.tokens          # token ids it holds
    session.truncate(n)     # keep the first n
    session.feed(ids, progress=None, cancelled=None)
                            # append; float32 logits of the last position [vocab]

(runtime's Session; the llama.cpp engine's context wrapper has the same three).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .sampling import Draw, Sampler

# the per-step hook: logits of the last position -> the next token's Draw, or None to end here
NextToken = Callable[[np.ndarray], "Draw | None"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def reuse_prefix(session, prompt: Sequence[int]) -> int:
    """Keep what the session holds of `prompt` (the longest common prefix, but never the last prompt
    token: its logits start the generation) and drop the rest; returns the tokens kept."""
    keep = min(common_prefix(session.tokens, prompt), max(len(prompt) - 1, 0))
    session.truncate(keep)
    return keep


def generate_step(session, prompt: Sequence[int], sampler: Sampler, next_token: NextToken | None = None,
                  progress=None, cancelled=None) -> Iterator[Draw]:
    """Feed `prompt` (the tokens after those the session holds), then yield one Draw per new token.

    Args:
        session: the KV cache (see the module docstring); it holds the context before `prompt`.
        prompt: token ids to prefill (non-empty).
        sampler: draws the tokens (its penalties see every token drawn or forced through it).
        next_token: the per-step hook (a mask, a constraint, a forced token) built on `sampler`;
            None ends the generation. Default: `sampler.sample(logits)`.
        progress, cancelled: passed to the prefill's feed (progress(done, total) after each chunk;
            cancelled() True between chunks raises runtime.session.PrefillCancelled).

    Yields:
        Draw (token, and its logprobs when the hook asks for them). The token is fed back, the next
        forward pass, only when the caller asks for the next Draw: a caller that stops (an end token,
        the budget, a cancel) costs no pass more.
    """
    choose = next_token if next_token is not None else sampler.sample
    # the hooks only when given: a session without them (a test double, an older wrapper) still works
    hooks = {k: v for k, v in (("progress", progress), ("cancelled", cancelled)) if v is not None}
    logits = session.feed(prompt, **hooks)                                       # prefill
    while (draw := choose(logits)) is not None:
        yield draw
        logits = session.feed([draw.token])                 # decode one token
