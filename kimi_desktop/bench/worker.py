"""One engine, one measured run, in its own process (so RSS and disk reads are its own).

    python -m kimi_desktop.bench.worker native MODEL_DIR --prompt-len 64 --decode 32
    python -m kimi_desktop.bench.worker llama.cpp MODEL.gguf --prompt-len 64 --decode 32

Prints one JSON object: prefill/decode seconds and tok/s, greedy tokens, bytes read from disk,
peak RSS, and (native) time per stage and expert-cache statistics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time

import numpy as np


def disk_read_bytes() -> int:
    """Bytes this process made the block layer fetch (page-cache misses, mmap faults and preads)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def peak_rss_bytes() -> int:
    """VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    # ordinary (non-special) ids below the BPE vocabulary; the same list for both engines
    return np.random.default_rng(seed).integers(300, vocab - 256, n).tolist()


def decode_read_amplification(before: dict, after: dict, expert_nbytes: int) -> dict:
    """Expert bytes read during decode (demand + prefetch) against the bytes of the experts the
    tokens needed that were not resident when their step began (demand misses, plus prefetched
    experts that were then used). 1.0 = nothing wasted; the issue's bound is 1.25."""
    d = {k: after[k] - before[k] for k in ("misses", "prefetch_used", "prefetch_issued", "prefetch_wasted",
                                           "bytes_read_demand", "bytes_read_prefetch")}
    needed = (d["misses"] + d["prefetch_used"]) * expert_nbytes
    read = d["bytes_read_demand"] + d["bytes_read_prefetch"]
    d.update(needed_bytes=needed, read_bytes=read, ratio=read / needed if needed else None)
    return d


def run_native(args) -> dict:
    from kimi_desktop.runtime import load_model
    from kimi_desktop.runtime.profile import StageTimer

    budget = None if args.expert_budget_gb is None else int(args.expert_budget_gb * (1 << 30))
    choice = None
    if args.auto_expert_cache:          # what the engine does with no cache flag, decided here and now
        from kimi_desktop.planner import choose_expert_cache
        choice = choose_expert_cache(args.model, None)              # as NativeEngine with no flags
        budget, args.direct_io = choice.budget_bytes, choice.direct_io
    timer = StageTimer(enabled=False)           # on for the timed part only
    model = load_model(args.model, expert_cache_bytes=budget, expert_policy=args.policy,
                       direct_io=args.direct_io, timer=timer)
    t = time.perf_counter()
    model.materialize()
    model.warmup()
    load_s = time.perf_counter() - t
    ids = prompt_ids(args.prompt_len, model.cfg.vocab_size)
    timer.enabled = True
    s = model.session()
    r0, t0 = disk_read_bytes(), time.perf_counter()
    logits = s.feed(ids)
    t1, r1 = time.perf_counter(), disk_read_bytes()
    prefill_stages = timer.snapshot()
    timer.reset()
    stats = getattr(model.experts, "stats", None)
    before = stats() if callable(stats) else None
    toks = []
    for _ in range(args.decode):
        with timer.stage("sampling"):
            tok = int(np.argmax(logits))
        toks.append(tok)
        logits = s.feed([tok])
    t2, r2 = time.perf_counter(), disk_read_bytes()
    out = dict(load_s=load_s, prefill_s=t1 - t0, decode_s=t2 - t1, prefill_read=r1 - r0, decode_read=r2 - r1,
               stages_prefill=prefill_stages, stages_decode=timer.snapshot(), tokens=toks)
    if choice is not None:
        out["expert_cache_choice"] = dict(dataclasses.asdict(choice), line=choice.line())
    from kimi_desktop.runtime.model import MoE
    out["prefetch_gates"] = [
        {"layer": m.next_moe.layer, "scored": len(g.scores), "precision": g.precision, "active": g.active}
        for m in (layer.mlp for layer in model.layers)
        if isinstance(m, MoE) and m.next_moe is not None for g in (m.next_moe.prefetch_gate,)]
    if before is not None:
        out["expert_cache"] = after = stats()
        out["decode_expert_reads"] = decode_read_amplification(before, after, model.experts.expert_nbytes)
        if args.direct_io and out["expert_cache"].get("direct_io"):
            # the same bytes again, raw (after the run, so the disk is no colder for it)
            from kimi_desktop.bench.ceilings import replay_gbps
            ext = [x for key in model.experts.resident() for x in model.experts.extents(*key)]
            out["expert_cache"]["raw_replay_gbps"] = replay_gbps(ext)
    return out


def run_llama(args) -> dict:
    from kimi_desktop.engines.llama_cpp import load_llama

    t_load = time.perf_counter()
    llm = load_llama(args.model, n_threads=args.threads, n_ctx=args.prompt_len + args.decode + 16,
                     n_batch=max(args.prompt_len, 32), use_mmap=True)
    ids = prompt_ids(args.prompt_len, llm.n_vocab())
    load_s = time.perf_counter() - t_load
    r0, t0 = disk_read_bytes(), time.perf_counter()
    llm.eval(ids)
    t1, r1 = time.perf_counter(), disk_read_bytes()
    toks = []
    for _ in range(args.decode):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        tok = int(np.argmax(logits))
        toks.append(tok)
        llm.eval([tok])
    t2, r2 = time.perf_counter(), disk_read_bytes()
    return dict(load_s=load_s, prefill_s=t1 - t0, decode_s=t2 - t1, prefill_read=r1 - r0, decode_read=r2 - r1,
                tokens=toks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimi_desktop.bench.worker")
    ap.add_argument("engine", choices=("native", "llama.cpp"))
    ap.add_argument("model")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--expert-budget-gb", type=float, default=None)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--direct-io", action="store_true")
    ap.add_argument("--auto-expert-cache", action="store_true",
                    help="the expert cache the engine chooses with no flag (kimi_desktop.planner)")
    args = ap.parse_args(argv)
    if args.threads:
        from kimi_desktop.runtime.kernels import set_threads
        set_threads(args.threads)
    res = run_native(args) if args.engine == "native" else run_llama(args)
    res.update(engine=args.engine, prompt_len=args.prompt_len, decode=args.decode, peak_rss=peak_rss_bytes(),
               prefill_tok_s=args.prompt_len / res["prefill_s"], decode_tok_s=args.decode / res["decode_s"],
               decode_read_per_token=res["decode_read"] / max(args.decode, 1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
