"""The native engine's KV cache across conversations, cancels and restarts, through the chat API."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from kimi_desktop.chat import Finish, PrefillProgress, Sampling, Usage
from kimi_desktop.engines.native import NativeEngine

GREEDY1 = Sampling(temperature=0, max_tokens=1)


def _ids(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(300, 1700, n)]


def _turn(engine, conv: list[int], new: list[int]) -> Usage:
    """Append `new` to the conversation and generate; the conversation becomes what the session
    holds after the turn (the prompt and the reply's tokens that were fed back)."""
    r = engine.complete(conv + new, Sampling(temperature=0, max_tokens=3)).result()
    conv[:] = engine.session.tokens
    return r.usage


def test_two_conversations_alternating_prefill_only_new_tokens(tiny_int4, tmp_path):
    e = NativeEngine(tiny_int4, kv_dir=tmp_path)
    try:
        convs = {"editor": _ids(1, 120), "chat": _ids(2, 90)}
        for turn in range(4):
            for k, conv in convs.items():
                new = _ids(10 * turn + len(k), 7)
                held = len(conv)
                u = _turn(e, conv, new)
                if turn:
                    assert (u.cached_prompt_tokens, u.prompt_tokens - u.cached_prompt_tokens) == (held, len(new)), \
                        (turn, k, u)
                    assert e.stats()["last_prefill_tokens"] == len(new)
        st = e.stats()
        assert st["kv_sessions"] >= 2 and st["kv_disk_bytes"] > 0
    finally:
        e.close()


_RESTART = r"""
import json, sys
import numpy as np
from kimi_desktop.chat import Sampling
from kimi_desktop.engines.native import NativeEngine
model, kv_dir, out, phase = sys.argv[1:5]
ids = [int(t) for t in np.random.default_rng(7).integers(300, 1700, 2020)]
first, new = ids[:2000], ids[2000:]
e = NativeEngine(model, kv_dir=kv_dir)
if phase == "first":
    r = e.complete(first, Sampling(temperature=0, max_tokens=1)).result()
    s = e.model.session()                               # the uninterrupted session, same chunks
    s.feed(first)
    np.save(out, s.feed(new, all_logits=True))
    print(json.dumps({"cached": r.usage.cached_prompt_tokens}))
else:
    r = e.complete(ids, Sampling(temperature=0, max_tokens=1)).result()
    s = e.session
    s.truncate(2000)                                    # the restored rows, then the new tokens again
    np.save(out, s.feed(new, all_logits=True))
    print(json.dumps({"cached": r.usage.cached_prompt_tokens, "prompt": r.usage.prompt_tokens,
                      "prefilled": e.stats()["last_prefill_tokens"]}))
e.close()
"""


def test_a_restarted_engine_continues_a_2000_token_conversation(tiny_int4, tmp_path):
    def run(phase):
        out = tmp_path / f"{phase}.npy"
        p = subprocess.run([sys.executable, "-c", _RESTART, str(tiny_int4), str(tmp_path / "kv"), str(out), phase],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1]), np.load(out)

    first, want = run("first")
    assert first["cached"] == 0
    second, got = run("second")
    assert second["cached"] == 2000 and second["prefilled"] == 20 == second["prompt"] - 2000
    np.testing.assert_array_equal(got, want)


def test_long_prefill_reports_progress_in_order_and_cancels_within_a_chunk(tiny_int4, tmp_path):
    e = NativeEngine(tiny_int4, kv_dir=tmp_path, kv_disk_gb=0)
    try:
        chunk = e.session.chunk
        ids = _ids(3, 3 * chunk + 5)
        evs = list(e.complete(ids, GREEDY1))
        prog = [ev for ev in evs if isinstance(ev, PrefillProgress)]
        assert [p.done for p in prog] == [chunk, 2 * chunk, 3 * chunk, len(ids)]
        assert all(p.total == len(ids) for p in prog) and isinstance(evs[-1], Finish)

        stream = e.complete(_ids(4, 3 * chunk + 5), GREEDY1)
        seen = []
        for ev in stream:
            seen.append(ev)
            if isinstance(ev, PrefillProgress) and ev.done == chunk:
                threading.Thread(target=stream.cancel).start()
        prog = [ev for ev in seen if isinstance(ev, PrefillProgress)]
        assert prog[-1].done <= 2 * chunk                     # stopped within one chunk of the cancel
        assert isinstance(seen[-1], Finish) and seen[-1].reason == "cancelled"
        assert e.stats()["prefill_total"] == 0
    finally:
        e.close()


@pytest.mark.parametrize("bad", [-1, "8", float("nan")])
def test_kv_budgets_are_checked(tiny_int4, bad):
    with pytest.raises(ValueError, match="kv_disk_gb"):
        NativeEngine(tiny_int4, kv_disk_gb=bad)
