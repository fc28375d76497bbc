"""`kimi-desktop bench --api`: what the local HTTP server costs on top of the engine.

Two numbers, on one model, in one run:
- per streamed token: the time between the first and the last generated token of a greedy answer,
  divided by the tokens in between, once through direct engine calls (`engine.chat` in this process)
  and once through `POST /v1/chat/completions` with `stream: true` read by a client in another process
  (raw http.client, so the client's own Python does not share this process's GIL); the two alternate
  `--repeats` times and medians are compared. Prefill and connection set-up are outside the window,
  so the difference is what HTTP adds per token.
- launch to healthy: seconds from starting `kimi-desktop serve` as a new process to a 200 from /health.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROMPT = [{"role": "user", "content": "Tell me a long story about a cat who learns to sail."}]

# The client process: for each line on stdin, one streamed request; prints the first-to-last
# token window in seconds and the number of content chunks inside it.
CLIENT = r'''
import http.client, json, sys, time
port, body = int(sys.argv[1]), sys.argv[2]
for _ in sys.stdin:
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    first = last = None
    n = 0
    buf = b""
    while True:
        part = r.read1(65536)
        if not part:
            break
        buf += part
        *events, buf = buf.split(b"\n\n")
        now = time.perf_counter()
        for ev in events:
            if not ev.startswith(b"data: {"):
                continue
            d = json.loads(ev[6:])["choices"]
            delta = d[0]["delta"] if d else {}
            if delta.get("content") or delta.get("reasoning_content"):
                first = now if first is None else first
                last = now
                n += 1
    c.close()
    print(json.dumps({"window_s": (last or 0) - (first or 0), "tokens": n}), flush=True)
'''


def direct_window(engine, sampling) -> tuple[float, int]:
    from kimi_desktop.chat import ContentDelta, ReasoningDelta

    first = last = None
    n = 0
    for ev in engine.chat(PROMPT, sampling=sampling):
        if isinstance(ev, (ContentDelta, ReasoningDelta)) and ev.text:
            now = time.perf_counter()
            first = now if first is None else first
            last = now
            n += 1
    return (last or 0) - (first or 0), n


def per_token_ms(window_s: float, n: int) -> float | None:
    return 1e3 * window_s / (n - 1) if n > 1 else None


def streaming_overhead(model: Path, decode: int, repeats: int) -> dict:
    from kimi_desktop.chat import Sampling
    from kimi_desktop.engines.native import NativeEngine
    from kimi_desktop.server import LocalServer, create_app

    engine = NativeEngine(model)
    server = LocalServer(create_app(engine, "bench"), port=0, logs=False).start_in_thread()
    body = json.dumps({"messages": PROMPT, "max_tokens": decode, "temperature": 0, "stream": True})
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(server.port), body], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    sampling = Sampling(temperature=0, max_tokens=decode)

    def http() -> tuple[float, int]:
        client.stdin.write("go\n")
        client.stdin.flush()
        r = json.loads(client.stdout.readline())
        return r["window_s"], r["tokens"]

    try:
        direct_window(engine, sampling)            # warm-up: JIT, caches, the connection path
        http()
        runs = {"direct": [], "http": []}
        for _ in range(repeats):
            for name, f in (("direct", lambda: direct_window(engine, sampling)), ("http", http)):
                ms = per_token_ms(*f())
                if ms is not None:
                    runs[name].append(ms)
    finally:
        client.stdin.close()
        client.wait(10)
        server.stop()
        engine.close()
    med = {k: statistics.median(v) if v else None for k, v in runs.items()}
    over = med["http"] - med["direct"] if None not in med.values() else None
    return {"runs_ms_per_token": runs, "direct_ms_per_token": med["direct"], "http_ms_per_token": med["http"],
            "overhead_ms_per_token": over}


def launch_to_healthy(model_args: list[str], repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-m", "kimi_desktop", "serve", *model_args, "--port", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = p.stdout.readline().strip().removesuffix("/v1")
            if not url:
                return {"error": f"serve exited with status {p.wait(30)} before printing its URL"}
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.02)
            times.append(time.monotonic() - t0)
        finally:
            p.terminate()
            p.wait(30)
    return {"runs_s": times, "median_s": statistics.median(times)}


def run(args) -> int:
    if args.demo:
        from kimi_desktop.demo import demo_model_path
        model, model_args = demo_model_path(), ["--demo"]
    else:
        model, model_args = Path(args.model), ["--model", args.model]
    print(f"streaming: {args.decode} tokens x {args.repeats} runs each way ...", flush=True)
    res = {"model": str(model), "decode": args.decode, "repeats": args.repeats,
           "streaming": streaming_overhead(model, args.decode, args.repeats)}
    print("launch to healthy ...", flush=True)
    res["launch"] = launch_to_healthy(model_args, min(args.repeats, 5))
    s, la = res["streaming"], res["launch"]
    if s["overhead_ms_per_token"] is None:
        print("streaming: too few tokens to time (the model ended its answer at once)")
    else:
        print(f"per streamed token: direct {s['direct_ms_per_token']:.3f} ms, HTTP {s['http_ms_per_token']:.3f} ms, "
              f"HTTP adds {s['overhead_ms_per_token']:+.3f} ms (medians of {args.repeats})")
    print(f"launch to healthy /health: median {la['median_s']:.2f} s" if "median_s" in la else f"launch: {la['error']}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"results: {args.out}")
    return 0
