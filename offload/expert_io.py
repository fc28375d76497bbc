"""The expert store's I/O layer: source files, aligned reads into slot memory, reader pools, the meter.

Reads. Each plan chunk (offload/expert_layout.py) is one request into the slot's memory:
  * reads="preadv" (Linux, BSD, macOS): os.preadv, which releases the GIL and shares no file
    position, so any number of reader threads read one file at once; direct_io=True opens a second
    fd with O_DIRECT (offsets, lengths and buffers are 4 KiB-aligned by the layout); a file system
    that refuses it (open or first read fails with EINVAL) falls back to buffered reads for that
    file, and SourceFile.note says why.
  * reads="portable" (everywhere, Windows included): seek + readinto on an unbuffered binary file,
    one per reader thread (a file position is per handle), no O_DIRECT, no posix_fadvise. Same
    bytes, same requests, same accounting.
  * reads="auto": preadv where the platform has it, else portable.
Demand reads run on one thread pool, prefetch reads on a separate, smaller one (ReaderPools), so a
demand read never queues behind a prefetch.
"""
from __future__ import annotations

import errno
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .safetensors import CheckpointError

__all__ = ["READS", "resolve_reads", "SourceFile", "IoMeter", "ReaderPools", "read_into", "read_exact"]

READS = ("auto", "preadv", "portable")
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.EFAULT)     # O_DIRECT not possible for this request


def resolve_reads(reads: str) -> str:
    """'preadv' or 'portable' for a reads= option ('auto': preadv where the platform has it)."""
    if reads not in READS:
        raise ValueError(f"reads must be one of {', '.join(READS)}, got {reads!r}")
    if reads == "auto":
        return "preadv" if hasattr(os, "preadv") else "portable"
    if reads == "preadv" and not hasattr(os, "preadv"):
        raise ValueError("reads='preadv': os.preadv is not available on this platform (use 'portable')")
    return reads


class SourceFile:
    """One source file: a buffered fd, and an O_DIRECT fd while the file system accepts it;
    with reads='portable' an unbuffered binary file per reading thread instead."""

    def __init__(self, path: Path, direct: bool, reads: str = "auto"):
        self.path = path
        self.reads = resolve_reads(reads)
        self.fd = self.dfd = -1
        self.note: str | None = None
        self._local = threading.local()          # portable: this thread's handle
        self._handles: list = []                  # portable: every thread's, closed by close()
        self._lock = threading.Lock()
        try:
            self.size = os.stat(path).st_size
            if self.reads == "portable":
                self._handle()                    # fails here, not in a reader thread
            else:
                self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open: {e.strerror}") from None
        if direct:
            self._open_direct()

    def _open_direct(self) -> None:
        if self.reads == "portable":
            self.note = "O_DIRECT is not used with portable reads"
        elif not hasattr(os, "O_DIRECT"):
            self.note = "O_DIRECT is not available on this platform"
        else:
            try:
                self.dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                self.note = f"{self.path}: O_DIRECT refused by the file system ({e.strerror}); buffered reads"

    @property
    def direct(self) -> bool:
        return self.dfd >= 0 and self.note is None

    @property
    def can_advise(self) -> bool:
        """posix_fadvise applies (preadv reads on a platform that has it)."""
        return self.fd >= 0 and hasattr(os, "posix_fadvise")

    def refuse_direct(self, why: str) -> None:
        # the O_DIRECT fd stays open until close(): another thread may be reading from it
        if self.note is None:
            self.note = f"{self.path}: O_DIRECT read failed ({why}); buffered reads"

    def _handle(self):
        f = getattr(self._local, "file", None)
        if f is None:
            f = self._local.file = open(self.path, "rb", buffering=0)
            with self._lock:
                self._handles.append(f)
        return f

    def read_at(self, mv: memoryview, off: int) -> int:
        """One read request of up to len(mv) bytes at off; 0 at EOF. OSError on failure."""
        if self.reads == "portable":
            f = self._handle()
            f.seek(off)
            return f.readinto(mv) or 0
        while True:
            direct = self.direct
            try:
                return os.preadv(self.dfd if direct else self.fd, [mv], off)
            except OSError as e:
                if not (direct and e.errno in _REFUSED):
                    raise
                self.refuse_direct(e.strerror or str(e))

    def close(self) -> None:
        with self._lock:
            for f in self._handles:
                f.close()
            self._handles.clear()
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.dfd = -1


class IoMeter:
    """Bytes, requests, and the wall time during which at least one read was in flight."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inflight = 0
        self.t0 = 0.0
        self.busy = 0.0
        self.bytes = {"demand": 0, "prefetch": 0}
        self.ops = 0

    def begin(self) -> None:
        with self.lock:
            if self.inflight == 0:
                self.t0 = time.perf_counter()
            self.inflight += 1

    def end(self, nbytes: int, kind: str) -> None:
        with self.lock:
            self.inflight -= 1
            if self.inflight == 0:
                self.busy += time.perf_counter() - self.t0
            self.bytes[kind] += nbytes
            self.ops += 1

    def snapshot(self) -> tuple[float, int, int, int]:
        """(busy seconds so far, demand bytes, prefetch bytes, requests)."""
        with self.lock:
            busy = self.busy + (time.perf_counter() - self.t0 if self.inflight else 0.0)
            return busy, self.bytes["demand"], self.bytes["prefetch"], self.ops

    def reset(self) -> None:
        with self.lock:
            self.busy, self.ops = 0.0, 0
            self.bytes = {"demand": 0, "prefetch": 0}
            if self.inflight:
                self.t0 = time.perf_counter()


def read_into(f: SourceFile, mv: memoryview, off: int, meter: IoMeter, kind: str) -> int:
    """Fill mv with the file's bytes at off (an aligned superset; stops at EOF). Returns bytes read."""
    need = min(len(mv), f.size - off)
    got = 0
    meter.begin()
    try:
        while got < need:
            try:
                n = f.read_at(mv[got:], off + got)
            except OSError as e:
                raise CheckpointError(f"{f.path}: read of bytes [{off + got}, {off + len(mv)}) failed: "
                                      f"{e.strerror}") from None
            if n == 0:
                break
            got += n
    finally:
        meter.end(got, kind)
    if got < need:
        raise CheckpointError(f"{f.path}: file is truncated: wanted bytes up to {off + need}, "
                              f"got {off + got}")
    return got


def read_exact(f: SourceFile, mv: memoryview, off: int) -> None:
    """Fill all of mv from off (no meter); CheckpointError at a premature EOF."""
    got = 0
    while got < len(mv):
        n = f.read_at(mv[got:], off + got)
        if n == 0:
            raise CheckpointError(f"{f.path}: file is truncated at byte {off + got}")
        got += n


class ReaderPools:
    """Demand reads on io_threads workers; prefetch reads on their own, smaller pool."""

    def __init__(self, io_threads: int, prefetch_threads: int | None = None):
        io_threads = max(1, int(io_threads))
        self.demand = ThreadPoolExecutor(io_threads, thread_name_prefix="expert-read")
        self.prefetch = ThreadPoolExecutor(
            max(1, prefetch_threads if prefetch_threads is not None else io_threads // 4),
            thread_name_prefix="expert-prefetch")

    def shutdown(self) -> None:
        for pool in (self.demand, self.prefetch):
            pool.shutdown(wait=True, cancel_futures=True)
