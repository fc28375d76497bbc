"""ExpertStore: same weights as the checkpoint, exact cache accounting, budget, pins, prefetch."""

from __future__ import annotations

import gc
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kimi_desktop.offload.experts import ExpertGeometry, ExpertStore, ExpertStoreFull
from kimi_desktop.offload.formats import load_linear
from kimi_desktop.offload.safetensors import Checkpoint, CheckpointError

MODULES = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=["int4", "fp8", "bf16"])
def ckpt_path(request, make_ckpt):
    return make_ckpt(layout=request.param, shards=2)


def reference(path):
    """(layer, e) -> triple read straight from the checkpoint (the CheckpointExperts way)."""
    geom, qcfg = ExpertGeometry.from_folder(path)
    ck = Checkpoint(path)

    def get(layer, e):
        p = f"model.layers.{layer}.mlp.experts.{e}."
        return tuple(load_linear(ck, p + m, qcfg, geom.shape(m)) for m in MODULES)
    return geom, get


def assert_same(triple, ref, x):
    for got, want in zip(triple, ref):
        assert type(got) is type(want)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got.dequantize(), want.dequantize())
        np.testing.assert_array_equal(got.matmul(x[: got.shape[1]] if x.ndim == 1 else x[:, : got.shape[1]]),
                                      want.matmul(x[: want.shape[1]] if x.ndim == 1 else x[:, : want.shape[1]]))


def all_keys(geom):
    return list(geom.keys())


@pytest.mark.parametrize("mode", ["get", "get_many"])
def test_store_serves_checkpoint_bytes(ckpt_path, mode):
    geom, ref = reference(ckpt_path)
    x = np.random.default_rng(0).standard_normal((3, max(geom.hidden, geom.moe_inter))).astype(np.float32)
    keys = all_keys(geom)
    order = keys + random.Random(1).sample(keys, len(keys))     # misses, then hits and re-misses
    with ExpertStore.open(ckpt_path, n_slots=5, policy="lru") as store:
        if mode == "get":
            for layer, e in order:
                assert_same(store.get(layer, e), ref(layer, e), x)
        else:
            for layer in geom.layers:
                ids = [e for (L, e) in order if L == layer]
                seen = []
                for e, triple in store.get_many(layer, ids):
                    assert_same(triple, ref(layer, e), x)
                    seen.append(e)
                    del triple
                assert sorted(seen) == sorted(set(ids))
        s = store.stats()
        assert s["evictions"] > 0 and s["hits"] + s["misses"] == s["gets"]
        assert s["max_resident_bytes"] <= s["budget_bytes"]


@pytest.mark.parametrize("none_io", ["mmap", "pread"])
def test_none_mode_same_weights(tiny_int4, none_io):
    geom, ref = reference(tiny_int4)
    x = np.ones(geom.hidden, np.float32)
    with ExpertStore.open(tiny_int4, policy="none", none_io=none_io) as store:
        for layer, e in all_keys(geom):
            assert_same(store.get(layer, e), ref(layer, e), x)
        assert store.prefetch(1, [0, 1]) == 2                       # posix_fadvise, no cache
        s = store.stats()
        assert s["mode"] == "none" and s["resident_bytes"] == 0 and s["gets"] == len(all_keys(geom))


def run_script(store, layer, seq):
    for e in seq:
        store.get(layer, e)   # triple dropped at once: unpinned
    return store.stats()


def test_lru_accounting_scripted(tiny_int4):
    with ExpertStore.open(tiny_int4, n_slots=3, policy="lru", prefetch=False) as store:
        assert store.n_slots == 3 and store.stats()["budget_bytes"] == 3 * store.slot_bytes
        s = run_script(store, 1, [0, 1, 2, 0, 3, 1, 4, 0, 3])
        # 0m 1m 2m 0h 3m(-1) 1m(-2) 4m(-0) 0m(-3) 3m(-1)
        assert (s["hits"], s["misses"], s["evictions"]) == (1, 8, 5)
        assert sorted(store.resident()) == [(1, 0), (1, 3), (1, 4)]


@pytest.mark.parametrize("policy, resident", [
    ("lru", [(1, 0), (1, 3), (1, 4)]),
    ("lfu", [(1, 0), (1, 1), (1, 3)]),          # the 4x-used expert 0 and twice-used 1 survive
])
def test_frequency_policy_scripted(tiny_int4, policy, resident):
    seq = [0, 0, 0, 1, 2, 3, 1, 4, 0, 3]
    with ExpertStore.open(tiny_int4, n_slots=3, policy=policy, prefetch=False) as store:
        s = run_script(store, 1, seq)
        if policy == "lru":
            # 0m 0h 0h 1m 2m 3m(-0) 1h 4m(-2) 0m(-3) 3m(-1)
            assert (s["hits"], s["misses"], s["evictions"]) == (3, 7, 4)
        else:
            # 0m 0h 0h 1m 2m 3m(-1) 1m(-2, count 2 from history) 4m(-3) 0h 3m(-4)
            assert (s["hits"], s["misses"], s["evictions"]) == (3, 7, 4)
        assert sorted(store.resident()) == resident


def test_pinned_slots_are_never_evicted(tiny_int4):
    geom, ref = reference(tiny_int4)
    x = np.ones(geom.hidden, np.float32)
    with ExpertStore.open(tiny_int4, n_slots=3, policy="lru", pin_wait_s=0.2) as store:
        held = store.get(1, 0)                      # a lease: pinned while `held` lives
        kept = store.get(1, 1)                      # a second lease, held as a hot expert would be
        for e in range(2, 16):
            store.get(1, e)                         # everything else squeezes through one slot
        assert {(1, 0), (1, 1)} <= set(store.resident())
        assert_same(held, ref(1, 0), x)             # bytes untouched
        assert_same(kept, ref(1, 1), x)
        other = store.get(2, 5)                     # the third slot, now held too
        with pytest.raises(ExpertStoreFull, match="pinned"):
            store.get(2, 6)
        del other
        gc.collect()
        store.get(2, 6)                             # the lease was released
        assert store.prefetch(2, [7]) == 0          # prefetch never takes a pinned slot
        assert store.stats()["pinned_slots"] == 2
        del kept                                    # dropping the lease unpins its slot
        for _, (g, u, d) in store.get_many(2, [8]):   # ... which the next miss may now take
            assert_same((g, u, d), ref(2, 8), x)
        assert (1, 1) not in store.resident()
        del g, u, d
        assert store.stats()["pinned_slots"] == 1   # `held` only
        del held


def settle(store, timeout=5.0):
    """Wait (through stats) until no expert read is in flight."""
    deadline = time.monotonic() + timeout
    while store.stats()["loading_experts"]:
        assert time.monotonic() < deadline, "expert reads still in flight"
        time.sleep(0.005)


def test_prefetch_recall_and_coverage(tiny_int4):
    with ExpertStore.open(tiny_int4, n_slots=4, policy="lru") as store:
        assert store.prefetch(1, [0, 1]) == 2
        assert store.prefetch(1, [0]) == 0          # already resident / in flight
        settle(store)
        store.get(1, 0)                             # prefetched -> hit, used
        store.get(1, 5)                             # miss
        s = store.stats()
        assert (s["hits"], s["misses"]) == (1, 1)
        assert (s["prefetch_issued"], s["prefetch_used"], s["prefetch_redundant"]) == (2, 1, 1)
        assert s["prefetch_recall"] == 0.5 and s["prefetch_coverage"] == 0.5
        assert s["bytes_read_prefetch"] > 0 and s["bytes_read_demand"] > 0


def test_prefetch_never_evicts_just_demanded(tiny_int4):
    with ExpertStore.open(tiny_int4, n_slots=2, policy="lru") as store:
        store.get(1, 0)
        store.get(1, 1)
        assert store.prefetch(1, [2]) == 0          # both slots demanded in this layer step
        assert store.stats()["prefetch_dropped"] == 1
        store.get(2, 0)                             # next step: (1, 1) demanded last step, protected
        assert store.prefetch(2, [3]) == 0
        store.get(1, 1)
        store.get(2, 0)
        store.get(1, 1)                             # (2, 0) was demanded one step ago
        assert store.prefetch(2, [3]) == 0
        store.get(1, 1)                             # same layer: no new step
        store.get(2, 0)
        assert store.prefetch(1, [9]) == 0          # (1, 1) is one step old, (2, 0) current
        assert sorted(store.resident()) == [(1, 1), (2, 0)]
    with ExpertStore.open(tiny_int4, n_slots=3, policy="lru") as store:
        store.get(1, 0)                             # step 1
        store.get(2, 0)                             # step 2
        store.get(1, 1)                             # step 3: (1, 0) is two steps old
        assert store.prefetch(2, [5]) == 1          # may evict (1, 0), nothing else
        settle(store)
        assert sorted(store.resident()) == [(1, 1), (2, 0), (2, 5)]


def test_prefetch_uses_spare_slots_and_counts_waste(tiny_int4):
    with ExpertStore.open(tiny_int4, n_slots=3, policy="lru", max_prefetch_inflight=8) as store:
        store.get(1, 0)
        assert store.prefetch(2, [4, 5]) == 2       # two free slots
        settle(store)
        store.get(1, 0)
        store.get(2, 4)                             # used
        store.get(1, 7)                             # demand evicts the least recent: unused (2, 5)
        s = store.stats()
        assert s["prefetch_used"] == 1 and s["prefetch_wasted"] == 1


def test_budget_never_exceeded_under_concurrency(tiny_int4):
    geom, ref = reference(tiny_int4)
    x = np.ones(geom.hidden, np.float32)
    errors, samples = [], []
    with ExpertStore.open(tiny_int4, n_slots=3, policy="lfu", io_threads=4, prefetch_threads=2) as store:
        budget = store.budget_bytes
        stop = threading.Event()

        def monitor():
            while not stop.is_set():
                samples.append(store.stats()["resident_bytes"])

        def compute(seed):
            rng = random.Random(seed)
            try:
                for _ in range(150):
                    layer, e = rng.choice(geom.layers), rng.randrange(16)
                    assert_same(store.get(layer, e), ref(layer, e), x)
            except BaseException as exc:
                errors.append(exc)

        def prefetcher():
            rng = random.Random(7)
            while not stop.is_set():
                store.prefetch(rng.choice(geom.layers), rng.sample(range(16), 4))

        threads = [threading.Thread(target=monitor), threading.Thread(target=prefetcher)]
        workers = [threading.Thread(target=compute, args=(s,)) for s in range(2)]
        for t in threads + workers:
            t.start()
        for t in workers:
            t.join()
        stop.set()
        for t in threads:
            t.join()
        s = store.stats()
    assert not errors, errors[0]
    assert samples and max(samples) <= budget
    assert s["max_resident_bytes"] <= budget and s["pool_bytes"] <= budget
    assert s["prefetch_issued"] > 0


def test_budget_too_small_and_unknown_experts(tiny_int4):
    with pytest.raises(ValueError, match=r"expert cache of 0\.0000 GiB \(0\.0 MiB\) holds no expert: one expert needs"):
        ExpertStore.open(tiny_int4, budget_bytes=4096)
    with ExpertStore.open(tiny_int4, n_slots=2) as store:
        with pytest.raises(KeyError, match="not a MoE layer"):
            store.get(0, 0)
        with pytest.raises(KeyError, match="experts 0..15"):
            store.get(1, 16)
        with pytest.raises(ValueError, match="unknown policy"):
            ExpertStore.from_checkpoint(store.ckpt, store.qcfg, [1, 2], 192, 64, 1 << 20, policy="mru")


def serve_every_expert(path, **kw) -> dict:
    """Open a store on path, check every expert it serves against the checkpoint; its stats()."""
    geom, ref = reference(path)
    x = np.ones(geom.hidden, np.float32)
    with ExpertStore.open(path, **kw) as store:
        for layer, e in all_keys(geom):
            assert_same(store.get(layer, e), ref(layer, e), x)
        return store.stats()


def _direct_ok_dir(src: Path, tmp_path: Path) -> Path | None:
    """The checkpoint itself, or a copy on a file system that accepts O_DIRECT."""
    import os
    for base in (src.parent, tmp_path, Path("/var/tmp"), Path(__file__).resolve().parents[2]):
        probe = base / ".odirect-probe"
        try:
            probe.write_bytes(b"\0" * 8192)
            fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
            os.close(fd)
        except (OSError, AttributeError):
            continue
        finally:
            probe.unlink(missing_ok=True)
        if base == src.parent:
            return src
        dst = Path(base) / f".kd-odirect-{os.getpid()}"
        shutil.copytree(src, dst)
        return dst
    return None


def test_direct_io_identical(tiny_int4, tmp_path):
    path = _direct_ok_dir(Path(tiny_int4), tmp_path)
    if path is None:
        pytest.skip("no file system here accepts O_DIRECT (tried the tmp dir, /var/tmp and the repo)")
    try:
        s = serve_every_expert(path, n_slots=4, direct_io=True)
        if not s["direct_io"]:
            pytest.skip(f"O_DIRECT fell back: {s['direct_io_note']}")
        assert s["bytes_read_demand"] > 0
    finally:
        if path != Path(tiny_int4):
            shutil.rmtree(path, ignore_errors=True)


def test_load_model_with_store_same_logits(tiny_int4):
    from kimi_desktop.runtime import load_model

    ids = [5, 17, 99, 3, 250, 7, 1000, 42]
    want = load_model(tiny_int4).logits(ids)
    store = ExpertStore.open(tiny_int4, n_slots=3, policy="least-stale")
    try:
        got = load_model(tiny_int4, experts=store).logits(ids)
        np.testing.assert_array_equal(got, want)
        assert store.stats()["evictions"] > 0
    finally:
        store.close()


@pytest.mark.parametrize("where", ["open", "read"])
def test_direct_io_refused_falls_back(tiny_int4, monkeypatch, where):
    import errno
    import os

    real_open, real_preadv = os.open, os.preadv
    direct_fds = set()

    def fake_open(path, flags, *a, **k):
        if flags & getattr(os, "O_DIRECT", 0):
            if where == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags & ~os.O_DIRECT, *a, **k)
            direct_fds.add(fd)
            return fd
        return real_open(path, flags, *a, **k)

    def fake_preadv(fd, bufs, off, *a):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, off, *a)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "preadv", fake_preadv)
    s = serve_every_expert(tiny_int4, n_slots=3, direct_io=True)
    assert not s["direct_io"] and "O_DIRECT" in s["direct_io_note"]


def test_get_many_closed_early_releases_pins(tiny_int4):
    with ExpertStore.open(tiny_int4, n_slots=4) as store:
        it = store.get_many(1, [0, 1, 2, 3])
        e, triple = next(it)
        assert store.stats()["pinned_slots"] == 4          # all four claimed and in flight
        it.close()
        del triple
        assert store.stats()["pinned_slots"] == 0
        settle(store)
        assert len(store.resident()) == 4


def test_wrong_weight_shape_value_fails_that_expert_only(tiny_int4, tmp_path):
    """weight_shape values are checked while the slot is read (in flight, not after): a wrong one
    fails that expert's get with the tensor named, and the store keeps serving the others."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_int4, folder)
    geom, ref = reference(folder)
    layer = geom.layers[0]
    name = f"model.layers.{layer}.mlp.experts.3.up_proj.weight_shape"
    with Checkpoint(folder) as ck:
        info = ck.info(name)
    with open(info.path, "r+b") as f:
        f.seek(info.start)
        f.write(np.array([7, 9], np.int64).tobytes())
    with ExpertStore.open(folder, n_slots=4) as store:
        with pytest.raises(CheckpointError, match=rf"'{name}'"):
            store.get(layer, 3)
        x = np.random.default_rng(0).standard_normal(geom.hidden).astype(np.float32)
        assert_same(store.get(layer, 4), ref(layer, 4), x)
        with pytest.raises(CheckpointError, match=rf"'{name}'"):   # not cached as good
            store.get(layer, 3)


def test_slot_pool_is_faulted_in_at_open(make_ckpt):
    """Reads go into memory whose pages already exist (a fault inside a read costs ~20x its copy)."""
    import psutil

    folder = make_ckpt(layout="int4", moe_layers=24)          # 384 experts: a pool of ~28 MiB
    proc = psutil.Process()
    before = proc.memory_info().rss
    with ExpertStore.open(folder, budget_bytes=64 << 20) as store:
        pool = store.n_slots * store.slot_bytes
        assert store.n_slots == 24 * 16 and pool > 20 << 20    # capped at the model's experts
        assert proc.memory_info().rss - before >= 0.9 * pool


def stored_bytes(triple) -> list[tuple[str, bytes]]:
    """Every array a triple's Linears hold, as raw bytes (what the slot received)."""
    return [(name, a.view(np.uint8).tobytes()) for lin in triple
            for name, a in sorted(vars(lin).items()) if isinstance(a, np.ndarray)]


ACCOUNTING = ("gets", "hits", "misses", "evictions", "bytes_read_demand", "read_ops")


@pytest.mark.parametrize("kw", [dict(n_slots=5, policy="lru"), dict(policy="none", none_io="pread")],
                         ids=["slots", "none-pread"])
def test_portable_reads_same_bytes_and_accounting(ckpt_path, kw):
    """reads="portable" (seek + readinto: the fallback where os.preadv is missing), forced here on
    Linux: every expert's bytes and the store's byte and read counts equal the preadv path's."""
    geom, ref = reference(ckpt_path)
    x = np.ones(max(geom.hidden, geom.moe_inter), np.float32)
    order = all_keys(geom) + random.Random(2).sample(all_keys(geom), len(all_keys(geom)))
    got, stats = {}, {}
    for reads in ("preadv", "portable"):
        with ExpertStore.open(ckpt_path, reads=reads, prefetch=False, **kw) as store:
            got[reads] = [stored_bytes(store.get(layer, e)) for layer, e in order]
            s = store.stats()
            assert s["reads"] == reads
            stats[reads] = {k: s[k] for k in ACCOUNTING}
    assert got["portable"] == got["preadv"]
    assert stats["portable"] == stats["preadv"] and stats["portable"]["bytes_read_demand"] > 0
    with ExpertStore.open(ckpt_path, reads="portable", **kw) as store:
        for layer, e in all_keys(geom)[:4]:
            assert_same(store.get(layer, e), ref(layer, e), x)


def test_portable_reads_are_the_automatic_choice_without_preadv(tiny_int4, monkeypatch):
    import os

    geom, ref = reference(tiny_int4)
    x = np.ones(geom.hidden, np.float32)
    monkeypatch.delattr(os, "preadv")               # a platform without it (Windows)
    with ExpertStore.open(tiny_int4, n_slots=3, direct_io=True) as store:
        for layer, e in all_keys(geom)[:6]:
            assert_same(store.get(layer, e), ref(layer, e), x)
        s = store.stats()
        assert s["reads"] == "portable" and not s["direct_io"] and "portable" in s["direct_io_note"]
    with pytest.raises(ValueError, match="os.preadv is not available"):
        ExpertStore.open(tiny_int4, n_slots=3, reads="preadv")


def test_store_options_are_checked_before_anything_is_opened(tiny_int4):
    from kimi_desktop.offload.experts import StoreOptions

    with pytest.raises(ValueError, match="reads must be one of auto, preadv, portable, got 'mmap'"):
        ExpertStore.open(tiny_int4, reads="mmap")
    with pytest.raises(ValueError, match="chunk_bytes must be a positive multiple of 4096"):
        StoreOptions(chunk_bytes=1000)
    with pytest.raises(ValueError, match="none_io must be 'mmap' or 'pread'"):
        ExpertStore.open(tiny_int4, policy="none", none_io="direct")
    opts = StoreOptions(n_slots=2, policy="least-stale", reads="portable")
    with ExpertStore.open(tiny_int4, options=opts) as store:      # the same store, options as one value
        assert (store.n_slots, store.policy_name, store.stats()["reads"]) == (2, "least-stale", "portable")
