"""Memory pressure for benchmarks: a child process that fills and mlocks part of RAM."""

from __future__ import annotations

import subprocess
import sys

_CHILD = r"""
import ctypes, mmap, resource, sys
n = int(sys.argv[1])
try:                                           # root may raise the limit; a sandbox may refuse
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
except (ValueError, OSError):
    pass
buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
step = 1 << 20
chunk = b"\x5a" * step
for off in range(0, n, step):                  # touch every page: real, resident memory
    buf[off:off + step] = chunk[: min(step, n - off)]
libc = ctypes.CDLL(None, use_errno=True)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
# without swap, touched anonymous pages stay resident even when mlock is refused
print("locked" if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(n)) == 0 else "resident", flush=True)
sys.stdin.read()                               # hold until the parent closes our stdin
"""


class Balloon:
    """`with Balloon(13 << 30):` holds 13 GiB of RAM for the duration of the block.

    The pages are mlocked where the RLIMIT_MEMLOCK may be raised; otherwise they are only touched,
    which pins them just as well on a machine without swap (`locked` says which).
    """

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.proc: subprocess.Popen | None = None
        self.locked = False

    def __enter__(self) -> Balloon:
        if self.nbytes <= 0:
            return self
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(self.nbytes)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        self.locked = line == "locked"
        if line not in ("locked", "resident"):
            raise RuntimeError("balloon process died before filling memory (out of memory?)")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None
