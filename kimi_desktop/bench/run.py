"""`kimi-desktop bench`: this engine and llama.cpp side by side, in one run, on the same model.

Each engine runs in its own worker process (kimi_desktop.bench.worker) so that its peak RSS and
its disk reads are its own. Regimes:
- ram: the engine's files are read into the page cache first (experts fit in memory);
- pressure: the page cache is dropped for the model files and a balloon process holds part of RAM,
  so the model no longer fits (the native engine then streams experts into its budgeted cache).
The machine's ceilings (DRAM read, O_DIRECT disk read, fp32 GEMM, kernel GB/s) are measured in the
same run, so every number comes with the bound it should be read against.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from kimi_desktop.cli_options import cpu_count, float_in, int_at_least, threads

from . import ceilings
from .balloon import Balloon
from .compete import Competitors, ms_per_token_table, thread_variants, with_thread_variants


def model_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.kdpack"))


def run_worker(engine: str, model: Path, args, extra: list[str] = ()) -> dict:
    # no --threads: the native engine picks its own (llama.cpp gets every core, as it always had)
    n = args.threads or (cpu_count() if engine == "llama.cpp" else None)
    cmd = [sys.executable, "-m", "kimi_desktop.bench.worker", engine, str(model), "--prompt-len",
           str(args.prompt_len), "--decode", str(args.decode), *(["--threads", str(n)] if n else []), *extra]
    t = time.perf_counter()
    with Competitors(getattr(args, "compete", 0)):
        p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"engine": engine, "error": p.stderr.strip().splitlines()[-1:] or ["failed"],
                "wall_s": time.perf_counter() - t}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    return res


def measure_ceilings(model_dir: Path, args) -> dict:
    out = {"dram_read_gbps": ceilings.dram_read_gbps(), "fp32_gemm_gflops": ceilings.gemm_gflops()}
    shards = model_files(model_dir)
    if shards:
        # one request at a time from one file, and 8 in flight over all the shards (as the expert
        # store reads); the ceiling is the better of the two. The passes read different bytes.
        ceilings.drop_page_cache(shards)
        size = min(f.stat().st_size for f in shards)
        qd1 = ceilings.odirect_read_gbps(shards[0], max_bytes=min(size // 2, 1 << 30))
        qd8 = ceilings.odirect_read_gbps(shards, max_bytes=2 << 30, inflight=8, start=size // 2)
        out["odirect_read_gbps_qd1"], out["odirect_read_gbps_qd8"] = qd1, qd8
        out["odirect_read_gbps"] = max((g for g in (qd1, qd8) if g), default=None)
    if args.kernels:
        from kimi_desktop.runtime.kernels.microbench import run_microbench
        out["kernels"] = run_microbench(threads=args.threads, seconds=0.5, quick=True)
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median decode speed (its stages and stats stay consistent), with every
    run's prefill and decode tok/s listed and their medians as the headline numbers."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    pick = dict(sorted(ok, key=lambda r: r["decode_tok_s"])[(len(ok) - 1) // 2])
    for k in ("prefill_tok_s", "decode_tok_s"):
        pick[k + "_runs"] = [r[k] for r in ok]
        pick[k] = statistics.median(pick[k + "_runs"])
    return pick


def cache_variant(v: str, model_dir: Path, args) -> tuple:
    """(label, engine, path, worker flags) of one --cache-variants entry: auto (the engine's own
    choice, no flag: labelled "native"), 0 (the page cache) or a store of that many GiB."""
    if v == "auto":
        return ("native", "native", model_dir, ["--auto-expert-cache"])
    if float(v) == 0:
        return ("native-pagecache", "native", model_dir, [])
    extra = ["--expert-budget-gb", v, "--policy", args.policy] + (["--direct-io"] if args.direct_io else [])
    return (f"native-{float(v):g}gib", "native", model_dir, extra)


def _cache_variants(text: str) -> list[str]:
    out = []
    for v in (t.strip() for t in text.split(",") if t.strip()):
        try:
            ok = v == "auto" or float(v) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of auto, 0 or GiB, got {v!r}")
        out.append(v)
    return out


def one_regime(name: str, model_dir: Path, gguf: Path | None, args) -> dict:
    native_extra = []
    if name == "pressure" and args.expert_cache_gb is None:
        native_extra.append("--auto-expert-cache")            # what a user gets with no flag
    elif name == "pressure":
        native_extra += ["--expert-budget-gb", str(args.expert_cache_gb), "--policy", args.policy]
        if args.direct_io:
            native_extra.append("--direct-io")
    # (label, engine, model path, worker flags); under pressure the native engine runs twice:
    # with its own expert-cache choice (or --expert-cache-gb), and with none at all (the OS page cache)
    engines = [("native", "native", model_dir, native_extra)]
    if name == "pressure" and args.compare_page_cache:
        engines.append(("native-pagecache", "native", model_dir, []))
    if name == "pressure" and args.cache_variants:
        engines = [cache_variant(v, model_dir, args) for v in args.cache_variants]
    if gguf is not None:
        engines.append(("llama.cpp", "llama.cpp", gguf, []))
    engines = with_thread_variants(engines, args.thread_variants)
    all_runs: dict[str, list[dict]] = {label: [] for label, *_ in engines}
    for _ in range(max(1, args.repeats)):         # engines alternate, so drift hits all of them alike
        for label, engine, path, extra in engines:
            files = model_files(model_dir) if engine == "native" else [gguf]
            for f in model_files(model_dir) + ([gguf] if gguf else []):
                ceilings.drop_page_cache([f])
            if name == "ram":
                ceilings.warm_page_cache(files)
                res = run_worker(engine, path, args, extra)
            else:
                avail = psutil.virtual_memory().available
                hold = min(int(args.balloon_gb * (1 << 30)), max(avail - (6 << 30), 0))
                with Balloon(hold) as b:
                    res = run_worker(engine, path, args, extra)
                    res["balloon_bytes"], res["balloon_locked"] = hold, b.locked
                    res["available_under_balloon"] = psutil.virtual_memory().available
            all_runs[label].append(res)
    runs = {label: median_run(rs) for label, rs in all_runs.items()}
    nat, ll = runs.get("native", {}), runs.get("llama.cpp", {})
    ratios = {}
    for k in ("prefill_tok_s", "decode_tok_s"):
        if k in nat and k in ll:
            ratios[k] = nat[k] / ll[k]
    if "tokens" in nat and "tokens" in ll:
        same = 0
        for a, b in zip(nat["tokens"], ll["tokens"]):
            if a != b:
                break
            same += 1
        ratios["greedy_tokens_agree"] = same
    return {"runs": runs, "ratios": ratios}


def policy_tables(model_dir: Path, args) -> dict:
    """Hit rate per cache policy at 16/32/64/128 slots per layer: (a) on routing recorded from the
    model's own router (the k2-slice with --routing-skew), (b) on synthetic DeepSeek-class traces."""
    import numpy as np

    from kimi_desktop.offload.traces import TraceRecorder, policy_table, synthetic_trace, trace_stats
    from kimi_desktop.runtime import load_config, load_model

    rec = TraceRecorder(load_config(model_dir).n_routed_experts, {"source": str(model_dir)})
    model = load_model(model_dir, recorder=rec)
    s = model.session()
    logits = s.feed(np.random.default_rng(1).integers(300, model.cfg.vocab_size - 256, args.trace_prompt).tolist())
    for _ in range(args.trace_decode):                   # greedy decode: the model's own next tokens
        logits = s.feed([int(np.argmax(logits))])
    recorded = rec.to_trace()
    slots = (16, 32, 64, 128)
    out = {"recorded": {"stats": trace_stats(recorded), "hit_rate": policy_table(recorded, slots)}}
    for name, kw in {"synthetic": {}, "synthetic-pessimistic": dict(reuse=0.7, lag_mean=12.0, window=256)}.items():
        tr = synthetic_trace(4000, 4, n_experts=model.cfg.n_routed_experts, top_k=model.cfg.num_experts_per_tok,
                             seed=0, **kw)
        out[name] = {"stats": trace_stats(tr), "hit_rate": policy_table(tr, slots)}
    return out


def policy_text(tables: dict) -> str:
    lines = []
    for name, t in tables.items():
        st = t["stats"]
        lines.append(f"{name}: next-token reuse {st.get('reuse_next', float('nan')):.2f}, "
                     f"reuse within 8 {st.get('reuse_within_8', float('nan')):.2f}, "
                     f"gini {st.get('gini', float('nan')):.2f}")
        lines.append("| policy | " + " | ".join(f"{k} slots" for k in next(iter(t["hit_rate"].values()))) + " |")
        lines.append("|---|" + "---:|" * len(next(iter(t["hit_rate"].values()))))
        for pol, row in t["hit_rate"].items():
            lines.append(f"| {pol} | " + " | ".join(f"{v:.1%}" for v in row.values()) + " |")
    return "\n".join(lines)


def prefill_gflop(model_dir: Path, T: int) -> float:
    """Multiply-adds x 2 of a T-token prefill from position 0: every weight product each token makes
    (routed experts: top-k of them), causal attention over the latent expanded by kv_b, and lm_head
    for the last token. The yardstick for 'prefill GFLOP/s vs the machine's fp32 GEMM rate'."""
    from kimi_desktop.runtime.config import load_config

    c = load_config(model_dir)
    D, H = c.hidden_size, c.num_attention_heads
    R, P, C, V = c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
    q = (D * c.q_lora_rank + c.q_lora_rank * H * (C + P)) if c.q_lora_rank else D * H * (C + P)
    attn = q + D * (R + P) + R * H * (C + V) + H * V * D
    per_token = 0
    for i in range(c.num_hidden_layers):
        per_token += attn
        if c.is_moe_layer(i):
            expert = 3 * D * c.moe_intermediate_size
            per_token += D * c.n_routed_experts + expert * (c.num_experts_per_tok + c.n_shared_experts)
        else:
            per_token += 3 * D * c.intermediate_size
    core = c.num_hidden_layers * H * (C + P + V) * T * (T + 1) // 2     # causal score + value products
    return 2 * (per_token * T + core + D * c.vocab_size) / 1e9


def model_bytes(model_dir: Path) -> dict:
    from kimi_desktop.offload.safetensors import Checkpoint

    ck = Checkpoint(model_dir)
    experts = sum(ck.info(n).nbytes for n in ck.names() if ".mlp.experts." in n)
    total = sum(ck.info(n).nbytes for n in ck.names())
    ck.close()
    return {"total": total, "routed_experts": experts, "resident": total - experts}


def _spread(run: dict, key: str, digits: int) -> str:
    """median (min-max over the repeats)."""
    runs = run.get(key + "_runs") or [run[key]]
    text = f"{run[key]:.{digits}f}"
    return text if len(runs) < 2 else f"{text} ({min(runs):.{digits}f}-{max(runs):.{digits}f})"


def table(results: dict) -> str:
    rows = ["| regime | engine | prefill tok/s | decode tok/s | read/token (decode) | hit rate | peak RSS |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for regime, r in results["regimes"].items():
        for engine, run in r["runs"].items():
            if "error" in run:
                rows.append(f"| {regime} | {engine} | error: {run['error']} | | | | |")
                continue
            hit = run.get("expert_cache", {}).get("hit_rate")
            rows.append(f"| {regime} | {engine} | {_spread(run, 'prefill_tok_s', 1)} | "
                        f"{_spread(run, 'decode_tok_s', 2)} | "
                        f"{run['decode_read_per_token'] / 1e9:.2f} GB | "
                        f"{'' if hit is None else f'{hit:.0%}'} | {run['peak_rss'] / 2**30:.1f} GiB |")
        ratio = r["ratios"]
        if ratio:
            rows.append(f"| {regime} | native / llama.cpp | {ratio.get('prefill_tok_s', float('nan')):.2f}x | "
                        f"{ratio.get('decode_tok_s', float('nan')):.2f}x | | | |")
    c = results["ceilings"]
    rows.append("")
    nat = results["regimes"].get("ram", {}).get("runs", {}).get("native", {})
    if "prefill_s" in nat and results.get("prefill_gflop"):
        rate = results["prefill_gflop"] / (results["prompt_len"] / nat["prefill_tok_s"])
        rows.append(f"Prefill (ram, native): {rate:.0f} GFLOP/s = {rate / c['fp32_gemm_gflops']:.0%} of the fp32 "
                    f"GEMM ceiling ({results['prefill_gflop']:.0f} GFLOP for {results['prompt_len']} tokens).")
    ec = results["regimes"].get("pressure", {}).get("runs", {}).get("native", {}).get("expert_cache", {})
    if ec.get("read_gbps") and c.get("odirect_read_gbps"):
        line = (f"Expert reads (pressure, native): {ec['read_gbps']:.2f} GB/s while reads were in flight = "
                f"{ec['read_gbps'] / c['odirect_read_gbps']:.0%} of the O_DIRECT ceiling")
        if ec.get("raw_replay_gbps"):
            line += (f"; the same extents re-read raw (O_DIRECT, 8 in flight) right after: "
                     f"{ec['raw_replay_gbps']:.2f} GB/s (store = {ec['read_gbps'] / ec['raw_replay_gbps']:.0%} of it)")
        rows.append(line + ".")
    for regime, r in results["regimes"].items():
        choice = r.get("runs", {}).get("native", {}).get("expert_cache_choice")
        if choice:
            rows.append(f"Native default ({regime}): {choice['line']}.")
    for regime, r in results["regimes"].items():
        amp = r.get("runs", {}).get("native", {}).get("decode_expert_reads")
        if amp and amp.get("ratio") is not None:
            rows.append(f"Decode expert reads ({regime}, native): {amp['read_bytes'] / 1e9:.2f} GB read for "
                        f"{amp['needed_bytes'] / 1e9:.2f} GB of experts needed and not resident = "
                        f"{amp['ratio']:.2f}x ({amp['misses']} misses, "
                        f"{amp['prefetch_used']} of {amp['prefetch_issued']} prefetches used).")
    rows.append(f"Ceilings: DRAM read {c['dram_read_gbps']:.1f} GB/s (numpy, 1 thread), O_DIRECT disk read "
                f"{(c.get('odirect_read_gbps') or float('nan')):.2f} GB/s, fp32 GEMM "
                f"{c['fp32_gemm_gflops']:.0f} GFLOP/s.")
    return "\n".join(rows)


def stage_table(results: dict) -> str:
    lines = []
    for regime, r in results["regimes"].items():
        run = r["runs"].get("native", {})
        st = run.get("stages_decode")
        if not st:
            continue
        n = max(run.get("decode", 1), 1)
        parts = ", ".join(f"{k} {1000 * v / n:.1f} ms" for k, v in sorted(st.items(), key=lambda kv: -kv[1]))
        lines.append(f"{regime}: per decoded token: {parts}")
    return "\n".join(lines)


def main(args) -> int:
    if args.api:
        from .api import run
        return run(args)
    if args.longctx:
        from .longctx import run as run_longctx
        return run_longctx(args)
    if args.demo:
        from kimi_desktop.demo import demo_model_path
        args.model = str(demo_model_path())
    model_dir = Path(args.model)
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is not None and not gguf.exists():
        from kimi_desktop.gguf_export import export_gguf
        print(f"exporting {gguf} ...", flush=True)
        export_gguf(model_dir, gguf)
    results = {"model": str(model_dir), "gguf": str(gguf) if gguf else None, "threads": args.threads,
               "compete": args.compete, "prompt_len": args.prompt_len, "decode": args.decode,
               "bytes": model_bytes(model_dir),
               "machine": {"cpus": psutil.cpu_count(), "ram": psutil.virtual_memory().total},
               "prefill_gflop": prefill_gflop(model_dir, args.prompt_len),
               "ceilings": measure_ceilings(model_dir, args), "regimes": {}}
    for regime in args.regimes.split(","):
        print(f"regime {regime} ...", flush=True)
        results["regimes"][regime] = one_regime(regime, model_dir, gguf, args)
    if args.traces:
        print("routing traces ...", flush=True)
        results["policies"] = policy_tables(model_dir, args)
    text = table(results) + "\n\n" + stage_table(results)
    if "policies" in results:
        text += "\n\n" + policy_text(results["policies"])
    if args.compete or args.thread_variants:
        text += "\n\n" + ms_per_token_table(results)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"results: {args.out}")
    cells = [run for r in results["regimes"].values() for run in r["runs"].values()]
    if cells and all("error" in run for run in cells):
        print(f"error: every run failed; the first: {cells[0]['error']}", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure this engine against llama.cpp side by side")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder (e.g. made with make-test-model --preset k2-slice)")
    src.add_argument("--demo", action="store_true", help="the built-in tiny demo model (made on first use)")
    p.add_argument("--gguf", default=None, help="the same model as GGUF (exported if missing); omit to skip llama.cpp")
    p.add_argument("--prompt-len", type=int_at_least(1), default=64, metavar="N", help="prompt tokens (default 64)")
    p.add_argument("--decode", type=int_at_least(1), default=32, metavar="N", help="greedy tokens decoded (default 32)")
    p.add_argument("--threads", type=threads, default=None, metavar="N",
                   help="compute threads for both engines (default: the native engine's own choice; "
                        "llama.cpp all cores)")
    p.add_argument("--compete", type=int_at_least(0), default=0, metavar="N",
                   help="N busy CPU-bound processes run beside every measured run (default 0: an idle machine)")
    p.add_argument("--thread-variants", type=thread_variants, default=None, metavar="LIST",
                   help="the native engine once per entry, alternating: default (no --threads) or a thread "
                        "count; e.g. default,1,2 (the thread study)")
    p.add_argument("--regimes", default="ram,pressure",
                   help="comma-separated: ram (model files in the page cache), pressure (page cache dropped, "
                        "a balloon holds RAM); default both")
    p.add_argument("--repeats", type=int_at_least(1), default=3,
                   help="runs per engine and regime, engines alternating; medians are reported")
    p.add_argument("--balloon-gb", type=float_in(0.0), default=13.0, metavar="G",
                   help="RAM in GiB held during the pressure regime (default 13)")
    p.add_argument("--expert-cache-gb", type=float_in(0.0, lo_open=True), default=None, metavar="G",
                   help="native expert cache in GiB in the pressure regime (default: the engine's own choice)")
    p.add_argument("--policy", default="lru", help="expert cache eviction policy: lru, lfu, least-stale, random")
    p.add_argument("--no-direct-io", dest="direct_io", action="store_false",
                   help="native expert reads through the page cache under pressure (default: O_DIRECT, "
                        "which skips the copy into a page cache the balloon leaves little room for)")
    p.add_argument("--cache-variants", type=_cache_variants, default=None, metavar="LIST",
                   help="pressure regime: the native engine once per entry, alternating: auto (no cache flag: "
                        "the engine's own choice), 0 (the OS page cache) or GiB of expert store; e.g. auto,0,3,6 "
                        "(replaces --expert-cache-gb and the page-cache run)")
    p.add_argument("--no-page-cache-run", dest="compare_page_cache", action="store_false",
                   help="skip the pressure run of the native engine without its expert cache")
    p.add_argument("--kernels", action="store_true", help="also run the kernel micro-bench")
    p.add_argument("--traces", action="store_true",
                   help="also record the model's routing and report hit rate per cache policy")
    p.add_argument("--trace-prompt", type=int_at_least(1), default=256, metavar="N", help="--traces: prompt tokens")
    p.add_argument("--trace-decode", type=int_at_least(0), default=256, metavar="N", help="--traces: decoded tokens")
    p.add_argument("--api", action="store_true",
                   help="instead: what the local HTTP server adds per streamed token (against direct engine "
                        "calls) and the time from launching `serve` to a healthy /health")
    p.add_argument("--longctx", action="store_true",
                   help="instead: long-context prefill/decode at 1K/8K/32K, KV bytes per token, a cached "
                        "follow-up's time to first token and the absorbed attention kernel at 32K")
    p.add_argument("--max-ctx", type=int_at_least(1024), default=32768, metavar="N",
                   help="--longctx: skip contexts above N (default 32768)")
    p.add_argument("--no-follow-up", dest="follow_up", action="store_false",
                   help="--longctx: skip the 16K-conversation follow-up")
    p.add_argument("--out", default=None, help="write all results as JSON")
    p.set_defaults(func=main)
