"""CPU threads that follow the machine's load: `--threads auto` (NANOCHAT_THREADS), the default on CPU.

PyTorch runs one OpenMP thread per core. When another job shares the cores, every parallel op ends
at a barrier that waits for whichever thread was descheduled, and the step slows far more than the
lost share of the machine: on the 2-core Xeon of benchmarks/results/cpu_dtype.md, with one busy
process beside it, depth-4 training ran at 583 tok/s on two threads and 1,256 on one (2,695 idle).

The governor measures, every `every_s` seconds, how many cores other processes kept busy: the
machine's busy time (/proc/stat) minus this process's own CPU time, over the wall time. It then uses
`max_threads - round(others)` threads (at least 1), changing only when two measurements in a row
agree, so a short burst does not make it flap. `tick()` is called from the loops that do the work
(training steps, evaluation batches, decoding steps); it costs a clock read between measurements.

`torch.set_num_threads` acts on the calling thread's OpenMP pool, so `tick()` must run on the thread
that does the compute, which is why there is no background thread; it acts only on the thread that
configured it (calls from other threads, e.g. a web server's workers, change nothing). Off where
/proc/stat is missing (macOS, Windows), and when the thread count is given (`--threads N`,
OMP_NUM_THREADS, torchrun's 1).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch

ENV = "NANOCHAT_THREADS"


def read_cpu_times(path: str = "/proc/stat") -> tuple[float, float] | None:
    """(busy seconds, total seconds) summed over all CPUs since boot, or None where /proc/stat is absent."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (total - idle) / hz, total / hz


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ThreadGovernor:
    """Keeps torch's intra-op threads at `max_threads` minus the cores other processes use."""

    def __init__(self, max_threads: int, every_s: float = 10.0, say: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, cpu_times: Callable[[], tuple | None] = read_cpu_times,
                 own_time: Callable[[], float] = time.process_time,
                 set_threads: Callable[[int], None] = torch.set_num_threads):
        self.max_threads = max(1, int(max_threads))
        self.every_s = every_s
        self.say = say
        self._clock, self._cpu_times, self._own, self._set = clock, cpu_times, own_time, set_threads
        self.threads = self.max_threads
        self.others = 0.0  # cores other processes used over the last interval
        self.changes = 0
        self._pending: int | None = None
        self._last = self._sample()

    def _sample(self):
        times = self._cpu_times()
        return None if times is None else (self._clock(), times[0], self._own())

    def measure(self) -> float | None:
        """Cores other processes kept busy since the last measurement (None: not measurable here)."""
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        wall = now[0] - last[0]
        others = ((now[1] - last[1]) - (now[2] - last[2])) / wall
        return max(0.0, others)

    def target(self, others: float) -> int:
        return max(1, min(self.max_threads, self.max_threads - int(others + 0.5)))

    def tick(self) -> int:
        """Re-measure if `every_s` has passed; returns the thread count in use."""
        if self._last is None or self._clock() - self._last[0] < self.every_s:
            return self.threads
        others = self.measure()
        if others is None:
            return self.threads
        self.others = others
        want = self.target(others)
        if want == self.threads:
            self._pending = None
        elif want == self._pending:  # seen twice in a row: act
            self._set(want)
            if self.say is not None:
                self.say(f"threads {self.threads} -> {want} (other processes are using {others:.1f} of "
                         f"{usable_cores()} cores)")
            self.threads, self._pending = want, None
            self.changes += 1
        else:
            self._pending = want
        return self.threads


_GOVERNOR: ThreadGovernor | None = None
_OWNER: int | None = None  # the thread that configured the governor, the only one tick() acts on


def parse_threads(value: str | int | None) -> int | None:
    """None for auto, else a positive int; a clear error otherwise."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"threads must be 'auto' or a number >= 1, got {value!r}")
    return n


def configure(threads: str | int | None = None, device_type: str = "cpu",
              say: Callable[[str], None] | None = None) -> str:
    """Set up the threads of this process; returns a line for the sizing table.

    `threads`: a number fixes the count. auto (the flags' default) leaves it to OMP_NUM_THREADS when that is
    set (torchrun sets it to 1 per process), else to NANOCHAT_THREADS, else starts the governor on CPU."""
    global _GOVERNOR, _OWNER
    _GOVERNOR, _OWNER = None, threading.get_ident()
    if threads is None or str(threads).strip().lower() == "auto":  # the flags' default: a variable may fix it
        if os.environ.get("OMP_NUM_THREADS") and device_type == "cpu":
            return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
        threads = os.environ.get(ENV) or threads
    try:
        n = parse_threads(threads)
    except ValueError as e:
        raise ValueError(f"{e} (from {ENV})" if threads == os.environ.get(ENV) else str(e)) from None
    if n is not None:
        torch.set_num_threads(n)
        return f"{n} (fixed)"
    if device_type != "cpu":
        return f"{torch.get_num_threads()}"
    gov = ThreadGovernor(torch.get_num_threads(), say=say)
    if gov._last is None:
        return f"{torch.get_num_threads()} (no /proc/stat: not following the load)"
    _GOVERNOR = gov
    return f"auto: up to {gov.max_threads}, fewer while other processes use the cores"


def tick() -> None:
    """Let the governor (if any) adapt the thread count; cheap enough to call every step."""
    if _GOVERNOR is not None and threading.get_ident() == _OWNER:
        _GOVERNOR.tick()


def governor() -> ThreadGovernor | None:
    return _GOVERNOR
