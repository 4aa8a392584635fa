"""What /health answers: the control cycle runs and the spool takes writes (docs/local.md)."""

from __future__ import annotations

import time
from dataclasses import dataclass

CYCLES_BEFORE_STALE = 3  # no cycle for this many periods: the control loop has stopped
SPOOL_WRITE_STALL_MIN_S = 5.0  # a spool write waiting this long (or 3 cycles, if longer) is a stuck spool


class SpoolWrites:
    """The daemon's publisher reports each spool write here: whether the spool takes them."""

    def __init__(self) -> None:
        self.started_mono: float | None = None  # the write in progress, if any
        self.last_ok_mono: float | None = None
        self.error: str | None = None  # why the last write failed; None once one succeeds
        self.failures = 0

    def started(self) -> None:
        self.started_mono = time.monotonic()

    def succeeded(self) -> None:
        self.started_mono = None
        self.last_ok_mono = time.monotonic()
        self.error = None

    def failed(self, error: BaseException) -> None:
        self.started_mono = None
        self.failures += 1
        self.error = str(error)[:300] or type(error).__name__

    def problem(self, stall_s: float, now_mono: float | None = None) -> str | None:
        """Why the spool does not take writes now, or None."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        if self.started_mono is not None and now_mono - self.started_mono >= stall_s:
            return f"a spool write has been waiting {now_mono - self.started_mono:.1f} s"
        if self.error is not None:
            return f"the last spool write failed: {self.error}"
        return None


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    reasons: list[str]
    last_cycle_age_s: float | None
    cycles: int

    def body(self) -> dict:
        return {"status": "ok" if self.ok else "unhealthy", "reasons": self.reasons,
                "last_cycle_age_s": None if self.last_cycle_age_s is None else round(self.last_cycle_age_s, 3),
                "cycles": self.cycles}


def judge(cycle_s: float, last_cycle_mono: float | None, cycles: int, spool_writes: SpoolWrites | None,
          now_mono: float | None = None) -> Health:
    """Healthy while the last cycle is at most 3 periods old and the spool takes writes."""
    now_mono = time.monotonic() if now_mono is None else now_mono
    reasons = []
    age_s = None if last_cycle_mono is None else max(0.0, now_mono - last_cycle_mono)
    if age_s is None:
        reasons.append("no control cycle has run yet")
    elif age_s > CYCLES_BEFORE_STALE * cycle_s:
        reasons.append(f"no control cycle for {age_s:.1f} s (cycle {cycle_s:g} s)")
    problem = spool_problem(cycle_s, spool_writes, now_mono)
    if problem:
        reasons.append(problem)
    return Health(not reasons, reasons, age_s, cycles)


def spool_problem(cycle_s: float, spool_writes: SpoolWrites | None, now_mono: float | None = None) -> str | None:
    """Why the spool does not take writes now (a write failed, or has waited 3 cycles or 5 s), or None."""
    if spool_writes is None:
        return None
    return spool_writes.problem(max(SPOOL_WRITE_STALL_MIN_S, CYCLES_BEFORE_STALE * cycle_s), now_mono)
