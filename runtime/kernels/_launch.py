"""How each kernel launch runs: serially or on numba's threads, and on how many.

Two costs a parallel launch can pay that the work never repays (measured here, 2 vCPUs, numba's
omp layer over GNU libgomp, in the thread study of issue 8):
- a launch itself: ~2 us on spinning workers, ~50 us when they must be woken; a tiny matrix
  (the demo model's are all below 0.5 M multiply-adds, 5-50 us of work) gains nothing from it;
- contention: libgomp's idle workers spin (~300k pause loops, ~12 ms here) before they sleep,
  so with one more CPU-bound process than free cores, every 2-thread launch of any size waited
  a scheduler time slice (12 ms median, even for a 3 us kernel); the demo model decoded at
  450 ms per token against 5 ms with one thread.
So: each parallel kernel has a serial twin (the same body, prange run as range; its rows are
independent, so the bits are the same), taken when the work is below `min_work` or one thread
is in use; and unless the user fixed a thread count, each forward pass uses only as many threads
as there are cores the rest of the machine leaves free (CpuShare).
"""
from __future__ import annotations

import contextlib
import os
import time
import types

import numba
from numba import njit

# multiply-adds (or element updates) below which a launch runs serially. Measured here (idle,
# 2 threads vs the serial twin, GEMV median us): bf16 256x1024 32 vs 27, 512x2048 109 vs 63; INT4
# 256x2048 54 vs 60, 512x2048 131 vs 88. Below 1 M the gain is at most ~40 us a launch, and it keeps
# every matrix of the demo model (lm_head 0.4 M) off the threads, where contention costs 12 ms a launch
PARALLEL_MIN_WORK = 1 << 20


class CpuShare:
    """Cores the rest of the machine keeps busy: /proc/stat busy time of the CPUs this process may
    run on (steal included: another VM), less this process's own CPU time, over windows of at
    least `window` seconds. Without /proc/stat it reports 0 (no contention seen)."""

    def __init__(self, window: float = 0.1):
        self.window = window
        try:
            self.cpus = {f"cpu{c}".encode() for c in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            self.cpus = set()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.other = 0.0
        self._last = self._sample()

    def _sample(self):
        busy = 0
        try:
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if not line.startswith(b"cpu"):
                        break
                    v = line.split()
                    if v[0] in self.cpus:   # user nice system idle iowait irq softirq steal (guest in user)
                        busy += sum(int(x) for x in v[1:9]) - int(v[4]) - int(v[5])
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), busy / self.tick, time.process_time()

    def update(self) -> float:
        """Cores used by others over the last complete window (refreshed when one has passed)."""
        if self._last is None:
            return 0.0
        now = time.monotonic()
        if now - self._last[0] >= self.window:
            s = self._sample()
            if s is not None:
                wall, busy, own = (a - b for a, b in zip(s, self._last))
                self.other = max(0.0, (busy - own) / wall)
                self._last = s
        return self.other

    def free_cores(self) -> float:
        return max(len(self.cpus), 1) - self.update()


class LaunchPolicy:
    """The process-wide launch settings (one instance, `policy`)."""

    def __init__(self):
        self.min_work = PARALLEL_MIN_WORK
        self.fixed_threads: int | None = None      # set_threads(n); None: fit the free cores
        self.share = CpuShare()
        self.launches = {"serial": 0, "parallel": 0}

    @property
    def top(self) -> int:
        return numba.config.NUMBA_NUM_THREADS

    def width(self) -> int:
        """Threads the work is split for (fixed or all cores): partitions that change the bits (MLA
        decode's) follow this, never the load-dependent count actually running them."""
        return self.fixed_threads or self.top

    def threads_now(self) -> int:
        if self.fixed_threads:
            return self.fixed_threads
        return max(1, min(self.top, int(self.share.free_cores() + 0.5)))

    def before_forward(self) -> int:
        """Set numba's thread count for this thread (numba's setting is per calling thread) for the
        next forward pass; returns it."""
        n = self.threads_now()
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)
        return n

    def parallel(self, work: float) -> bool:
        return work >= self.min_work and numba.get_num_threads() > 1

    @contextlib.contextmanager
    def forced(self, min_work: float):
        """Every launch below `min_work` serial for the block (0: all parallel, inf: all serial):
        for warmup (compile both twins) and tests."""
        old, self.min_work = self.min_work, min_work
        try:
            yield self
        finally:
            self.min_work = old


policy = LaunchPolicy()


class Twin:
    """A numba parallel kernel and its serial twin; `k.pick(work)(*args)` runs the right one."""

    def __init__(self, kernel):
        f = kernel.py_func
        g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
        g.__qualname__ = f.__qualname__ + "_serial"   # its own cache file: numba's cache key ignores parallel=
        opts = {k: v for k, v in kernel.targetoptions.items() if k not in ("parallel", "nopython", "boundscheck")}
        self.parallel, self.serial = kernel, njit(cache=True, **opts)(g)
        self.__doc__ = f.__doc__

    def pick(self, work: float):
        if policy.parallel(work):
            policy.launches["parallel"] += 1
            return self.parallel
        policy.launches["serial"] += 1
        return self.serial


def twin(kernel) -> Twin:
    """Decorator over an @njit(parallel=True) kernel: see Twin."""
    return Twin(kernel)
