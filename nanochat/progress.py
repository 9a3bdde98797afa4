"""Progress lines for long evaluations: `what: done/total (pct), rate, ETA`, at most one every few seconds.

Validation passes, base_eval's bits-per-byte pass and each CORE task report through it, so nothing a
README command runs stays silent for more than ~10 s. Printed by rank 0 only (`enabled`); a pass that
ends before the first interval prints nothing but its caller's summary line.
"""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Call `update(n)` after each unit of work; a line is printed when `every` seconds have passed since the
    last one. `unit` names what is counted ("batches", "examples")."""

    def __init__(self, what: str, total: int, unit: str = "batches", every: float = 5.0, enabled: bool = True,
                 stream=None, clock=time.monotonic):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.enabled, self.stream, self.clock = enabled, stream, clock
        self.done = 0
        self.t0 = self.last = clock()
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = self.clock()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            self.lines += 1
            print(self.line(now), file=self.stream or sys.stdout, flush=True)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_text = _duration(eta) if eta != float("inf") else "?"
        return (f"  {self.what}: {int(self.done):,}/{self.total:,} {self.unit} ({pct:.0f}%), {rate:,.2f} {self.unit}/s, "
                f"elapsed {_duration(elapsed)}, ETA {eta_text}")
