"""CPU contention for benchmarks: child processes that keep cores busy, and thread-count variants.

A desktop machine is rarely idle (a browser, a build, another model). With every core's worth of
threads, a parallel kernel launch waits for its slowest thread, and a thread that lost its core
to another process holds the whole launch up for a scheduler time slice: the thread study in
`kimi-desktop bench --compete N --thread-variants default,1,2` measures what that costs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

_SPIN = "while True: pass"          # one core's worth of pure CPU work, no memory traffic to speak of


class Competitors:
    """`with Competitors(2):` keeps 2 busy CPU-bound processes running for the block."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Competitors:
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if self.procs:
            time.sleep(0.2)          # past the interpreter start: spinning when the measured run starts
            dead = [p.returncode for p in self.procs if p.poll() is not None]
            if dead:
                self.__exit__()
                raise RuntimeError(f"a competing process exited at once (status {dead[0]})")
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(timeout=30)
        self.procs = []


def thread_variants(text: str) -> list[str]:
    """--thread-variants: comma-separated `default` (no --threads: the engine's own choice) or counts."""
    out = []
    for v in (t.strip() for t in text.split(",") if t.strip()):
        if not (v == "default" or (v.isdigit() and int(v) >= 1)):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of default or thread counts >= 1, "
                                             f"got {v!r}")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("expected at least one entry (default or a thread count)")
    return out


def with_thread_variants(engines: list[tuple], variants: list[str] | None) -> list[tuple]:
    """Each native (label, engine, path, flags) once per variant: `default` keeps the label and
    passes no --threads; a count N runs with --threads N, labelled `label-tN`."""
    if not variants:
        return engines
    out = []
    for label, engine, path, extra in engines:
        if engine != "native":
            out.append((label, engine, path, extra))
            continue
        for v in variants:
            out.append((label, engine, path, list(extra)) if v == "default" else
                       (f"{label}-t{v}", engine, path, [*extra, "--threads", v]))
    return out


def ms_per_token_table(results: dict) -> str:
    """Per-token milliseconds of every run (the thread study's unit: lower is better)."""
    rows = [f"Per-token times, {results.get('compete', 0)} competing CPU-bound process(es):",
            "| regime | engine | prefill ms/token | decode ms/token |", "|---|---|---:|---:|"]
    for regime, r in results["regimes"].items():
        for label, run in r["runs"].items():
            if "error" in run:
                continue
            pre = [1000 / v for v in run.get("prefill_tok_s_runs") or [run["prefill_tok_s"]]]
            dec = [1000 / v for v in run.get("decode_tok_s_runs") or [run["decode_tok_s"]]]
            rows.append(f"| {regime} | {label} | {_spread(pre)} | {_spread(dec)} |")
    return "\n".join(rows)


def _spread(ms: list[float]) -> str:
    """median (min-max)."""
    text = f"{statistics.median(ms):.2f}"
    return text if len(ms) < 2 else f"{text} ({min(ms):.2f}-{max(ms):.2f})"
