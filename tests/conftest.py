"""Session-scoped fixtures: random checkpoints written by the project's own make-test-model."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# the engines save conversations' KV caches in the user cache folder: never the user's own, never
# carried from one run to the next
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="kimi-test-cache-")


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(layout=..., n_group=..., ...) -> folder; each distinct request is built once per session."""
    from kimi_desktop.testmodel import make_test_model

    built = {}

    def make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in built:
            name = "-".join(f"{k}{v}" for k, v in key) or "default"
            built[key] = make_test_model(tmp_path_factory.mktemp("ckpt") / name, **kw)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_int4(make_ckpt):
    return make_ckpt(layout="int4", shards=2)


@pytest.fixture(scope="session")
def k2_full(tmp_path_factory):
    """The full Kimi-K2-Thinking config: 62 shards with real headers and no data (sparse files)."""
    from kimi_desktop.sparse_model import make_sparse_model

    return make_sparse_model(tmp_path_factory.mktemp("k2full") / "Kimi-K2-Thinking", "k2-full", shards=62)
