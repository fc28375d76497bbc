"""`kimi-desktop bench --longctx`: long-context prefill/decode, this engine and llama.cpp side by side.

Each engine runs in its own worker process (`python -m kimi_desktop.bench.longctx ENGINE MODEL ...`),
both with the same n_ctx and threads and the same random token ids. Reported: prefill tok/s at 1K
and 8K (engines alternating, medians) and one 32K run (skipped above --max-ctx), decode tok/s at
those contexts, KV bytes per token, time to first token of a 50-token follow-up in a 16K
conversation (cached vs cold), and the absorbed-attention kernel's GFLOP/s at 32K against the GEMM
ceiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from .worker import prompt_ids

DECODE = 8           # tokens decoded after each prefill: decode tok/s at that context
FOLLOW_CTX, FOLLOW_NEW = 16384, 50


def attention_gflops(n: int = 32768, t: int = 64, h: int = 64, r: int = 512, p: int = 64, repeats: int = 3) -> dict:
    """mla_absorbed_chunk at K2's shapes: T queries at positions n-T..n-1 over an n-row bf16 cache.
    FLOPs: per query and head, scores over (R+P) and the value sum over R, causal."""
    from kimi_desktop.runtime.kernels import mla_absorbed_chunk

    rng = np.random.default_rng(0)
    q_lat = rng.standard_normal((t, h, r), np.float32)
    q_pe = rng.standard_normal((t, h, p), np.float32)
    kv = (rng.standard_normal((n, r), np.float32).view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits
    pe = (rng.standard_normal((n, p), np.float32).view(np.uint32) >> 16).astype(np.uint16)
    start = n - t
    keys = sum(start + i + 1 for i in range(t))
    flop = 2.0 * h * keys * (r + p + r)
    mla_absorbed_chunk(q_lat, q_pe, kv, pe, start, 0.1)              # compile / cache load
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mla_absorbed_chunk(q_lat, q_pe, kv, pe, start, 0.1)
        runs.append(flop / (time.perf_counter() - t0) / 1e9)
    return {"n": n, "t": t, "gflops": statistics.median(runs), "runs": runs}


class _Native:
    def __init__(self, model_path: str):
        from kimi_desktop.runtime import load_model

        self.model = load_model(model_path)
        self.model.materialize()
        self.model.warmup()
        self.vocab = self.model.cfg.vocab_size
        self.s = None

    def reset(self) -> None:
        self.s = self.model.session()

    def feed(self, ids: list[int]) -> int:
        return int(np.argmax(self.s.feed(ids)))

    def kv_bytes_per_token(self) -> tuple[float, str]:
        c = self.s.cache
        return float(c.bytes_per_token), "session.cache.bytes_per_token"


class _Llama:
    def __init__(self, model_path: str, n_ctx: int, threads: int | None):
        from kimi_desktop.engines.llama_cpp import load_llama

        self.llm = load_llama(model_path, n_threads=threads, n_ctx=n_ctx, n_batch=512)
        self.vocab, self.n_ctx = self.llm.n_vocab(), n_ctx

    def reset(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear() if hasattr(self.llm._ctx, "kv_cache_clear") else None

    def feed(self, ids: list[int]) -> int:
        self.llm.eval(ids)
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))))

    def kv_bytes_per_token(self) -> tuple[float, str]:
        # the state blob holds the KV of the filled tokens (plus logits/embeddings: an upper bound)
        n = self.llm.n_tokens
        size = self.llm.save_state().llama_state_size
        return size / max(n, 1), f"llama_state_size / n_tokens ({size} B / {n})"


def prefill_decode(eng, ctx: int, seed: int) -> dict:
    ids = prompt_ids(ctx, eng.vocab, seed)
    eng.reset()
    t0 = time.perf_counter()
    tok = eng.feed(ids)
    t1 = time.perf_counter()
    for _ in range(DECODE):
        tok = eng.feed([tok])
    t2 = time.perf_counter()
    kv, how = eng.kv_bytes_per_token()
    return {"ctx": ctx, "prefill_tok_s": ctx / (t1 - t0), "decode_tok_s": DECODE / (t2 - t1),
            "kv_bytes_per_token": kv, "kv_how": how}


def follow_up(eng, seed: int) -> dict:
    """TTFT of FOLLOW_NEW new tokens after a FOLLOW_CTX conversation: held in the session vs from nothing."""
    conv = prompt_ids(FOLLOW_CTX, eng.vocab, seed)
    new = prompt_ids(FOLLOW_NEW, eng.vocab, seed + 1)
    eng.reset()
    eng.feed(conv)
    t0 = time.perf_counter()
    eng.feed(new)
    cached = time.perf_counter() - t0
    eng.reset()
    t0 = time.perf_counter()
    eng.feed(conv + new)
    return {"cached_ttft_s": cached, "cold_ttft_s": time.perf_counter() - t0}


def worker_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimi_desktop.bench.longctx")
    ap.add_argument("engine", choices=("native", "llama.cpp"))
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, required=True)
    ap.add_argument("--n-ctx", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--follow-up", action="store_true")
    a = ap.parse_args(argv)
    if a.threads and a.engine == "native":
        from kimi_desktop.runtime.kernels import set_threads
        set_threads(a.threads)
    eng = _Native(a.model) if a.engine == "native" else _Llama(a.model, a.n_ctx, a.threads)
    res = follow_up(eng, a.seed) if a.follow_up else prefill_decode(eng, a.ctx, a.seed)
    print(json.dumps(dict(res, engine=a.engine)))
    return 0


def _run(engine: str, model: str, ctx: int, args, seed: int, extra=()) -> dict:
    n_ctx = max(args.max_ctx, FOLLOW_CTX + FOLLOW_NEW) + DECODE + 16
    cmd = [sys.executable, "-m", "kimi_desktop.bench.longctx", engine, model, "--ctx", str(ctx),
           "--n-ctx", str(n_ctx), "--seed", str(seed), *(["--threads", str(args.threads)] if args.threads else []),
           *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"engine": engine, "ctx": ctx, "error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def contexts(max_ctx: int) -> list[tuple[int, int]]:
    """(context, repeats): 1K and 8K repeated, 32K once; those above max_ctx are skipped."""
    return [(c, r) for c, r in ((1024, 3), (8192, 3), (32768, 1)) if c <= max_ctx]


def ratio(nat: dict, ll: dict, key: str) -> float | None:
    return nat[key] / ll[key] if key in nat and key in ll and ll[key] else None


def run(args) -> int:
    from . import ceilings

    engines = [("native", args.model)] + ([("llama.cpp", args.gguf)] if args.gguf else [])
    out = {"gemm_gflops": ceilings.gemm_gflops(), "contexts": {}}
    for ctx, reps in contexts(args.max_ctx):
        runs = {e: [] for e, _ in engines}
        for i in range(reps):                          # alternating, fresh ids per repeat
            for e, m in engines:
                runs[e].append(_run(e, m, ctx, args, seed=i))
        med = {}
        for e, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            med[e] = ({k: statistics.median(r[k] for r in ok) for k in ("prefill_tok_s", "decode_tok_s")}
                      | {"kv_bytes_per_token": ok[0]["kv_bytes_per_token"], "kv_how": ok[0]["kv_how"]}
                      if ok else {"error": rs[-1]["error"]})
        out["contexts"][ctx] = {"runs": med, "ratio_prefill": ratio(med.get("native", {}), med.get("llama.cpp", {}),
                                                                    "prefill_tok_s"),
                                "ratio_decode": ratio(med.get("native", {}), med.get("llama.cpp", {}),
                                                      "decode_tok_s")}
        print(json.dumps({ctx: out["contexts"][ctx]}), flush=True)
    if args.follow_up:
        out["follow_up"] = {e: _run(e, m, FOLLOW_CTX, args, 7, ["--follow-up"]) for e, m in engines}
        print(json.dumps(out["follow_up"]), flush=True)
    try:
        att = attention_gflops()
        out["attention_32k"] = dict(att, fraction_of_gemm=att["gflops"] / out["gemm_gflops"])
    except ImportError as e:
        out["attention_32k"] = {"error": str(e)}
    print(json.dumps(out, indent=2))
    if args.out:
        from pathlib import Path
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
