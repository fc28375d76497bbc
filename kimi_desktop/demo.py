"""The built-in demo model: a tiny random checkpoint made once in the user's cache dir."""

from __future__ import annotations

from pathlib import Path

import platformdirs

DEMO_NAME = "demo-tiny-int4-v1"     # bump when the test-model format changes


def demo_model_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the demo checkpoint, creating it on first use (atomic: concurrent first runs are safe)."""
    from kimi_desktop.testmodel import make_test_model

    root = Path(cache_dir) if cache_dir else Path(platformdirs.user_cache_dir("kimi-desktop"))
    out = root / DEMO_NAME
    if (out / "config.json").exists():
        return out
    try:
        make_test_model(out, preset="tiny", layout="int4", shards=2, seed=0)
    except OSError:
        # another process won the race and renamed its folder into place first
        if not (out / "config.json").exists():
            raise
    return out
