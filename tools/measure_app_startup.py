"""Time from launching `kimi-desktop` (no model) to a usable window: the seconds until the app logs
"window ready", over fresh data/config folders, offscreen. Run under the heavy-work lock:

    flock /tmp/kimi-heavy.lock python tools/measure_app_startup.py [RUNS]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def once() -> tuple[float, float]:
    """(seconds from the process start to the window, seconds inside ui.app.run)."""
    d = tempfile.mkdtemp()
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_DATA_HOME": d, "XDG_CONFIG_HOME": d,
           "XDG_CACHE_HOME": d}
    t = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "kimi_desktop"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            if "window ready in" in line:
                return time.monotonic() - t, float(line.split()[-2])
        raise RuntimeError("the app ended before its window was ready")
    finally:
        p.kill()
        p.wait()


def main(runs: int = 5) -> None:
    got = [once() for _ in range(runs)]
    total = [g[0] for g in got]
    print("launch -> window ready (s):", " ".join(f"{x:.2f}" for x in total), f"median {statistics.median(total):.2f}")
    print("of which in ui.app.run (s):", " ".join(f"{g[1]:.2f}" for g in got))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
