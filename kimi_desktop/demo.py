"""The built-in demo models.

demo_model_path(): the trained demo checkpoint shipped inside the package (kimi_desktop/demo_model/,
an official K2-Thinking-layout folder made by tools/demo_model/): what `--demo` opens everywhere.
random_demo_model_path(): a tiny random checkpoint made once in the user's cache dir (atomically),
for tests and measurements that want make-test-model's weights.
"""

from __future__ import annotations

from pathlib import Path

import platformdirs

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_NAME = "demo-tiny-int4-v1"     # the random one's folder; bump when the test-model format changes


def demo_model_path() -> Path:
    """Path of the shipped, trained demo checkpoint."""
    if not (DEMO_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{DEMO_DIR}: the demo model is missing from this installation "
                                f"(expected config.json there; reinstall the package)")
    return DEMO_DIR


def random_demo_model_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the random tiny checkpoint, creating it on first use (concurrent first runs are safe)."""
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
