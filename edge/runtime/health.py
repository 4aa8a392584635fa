"""Self-measurement: cycle duration and lateness, event-loop lag.

Figures are kept in small rolling windows (no unbounded growth) and exposed in
every telemetry message under `gateway`, so an operator sees a struggling
gateway before it misses a delivery, and benchmarks read the same numbers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

WINDOW = 300  # samples kept for percentiles: 10 min at 2 s


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..100; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


class CycleStats:
    def __init__(self, window: int = WINDOW):
        self.durations_s: deque[float] = deque(maxlen=window)
        self.lateness_s: deque[float] = deque(maxlen=window)
        self.allocation_s: deque[float] = deque(maxlen=window)  # every allocation, cycles and setpoints
        self.cycles = 0
        self.missed_cycles = 0
        self.messages_repaired = 0  # outbound messages that had to be repaired to encode
        self.loop_lag = LoopLagMonitor()

    def record(self, duration_s: float, lateness_s: float) -> None:
        self.cycles += 1
        self.durations_s.append(duration_s)
        self.lateness_s.append(max(0.0, lateness_s))

    def record_allocation(self, duration_s: float) -> None:
        self.allocation_s.append(duration_s)

    def snapshot(self) -> dict[str, float | int]:
        durations = list(self.durations_s)
        lateness = list(self.lateness_s)
        allocations = list(self.allocation_s)
        return {
            "cycles": self.cycles,
            "missed_cycles": self.missed_cycles,
            "cycle_duration_ms_last": round(durations[-1] * 1000, 3) if durations else None,
            "cycle_duration_ms_p99": round(percentile(durations, 99) * 1000, 3),
            "cycle_lateness_ms_last": round(lateness[-1] * 1000, 3) if lateness else None,
            "cycle_lateness_ms_p99": round(percentile(lateness, 99) * 1000, 3),
            "loop_lag_ms_p99": round(self.loop_lag.p99_s() * 1000, 3),
            "loop_lag_ms_max": round(self.loop_lag.max_s() * 1000, 3),
            "loop_lag_ms_max_since_last": round(self.loop_lag.take_max_since_last_s() * 1000, 3),
            "allocation_ms_last": round(allocations[-1] * 1000, 3) if allocations else None,
            "allocation_ms_p99": round(percentile(allocations, 99) * 1000, 3),
            "messages_repaired": self.messages_repaired,
        }

    def count_repaired(self) -> None:
        self.messages_repaired += 1


class LoopLagMonitor:
    """Measures how late a short sleep wakes up: the event loop's responsiveness."""

    def __init__(self, interval_s: float = 0.1, window: int = 3000):
        self.interval_s = interval_s
        self.samples_s: deque[float] = deque(maxlen=window)
        self._max_since_last_s = 0.0

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(self.interval_s)
            lag_s = max(0.0, time.monotonic() - started - self.interval_s)
            self.samples_s.append(lag_s)
            self._max_since_last_s = max(self._max_since_last_s, lag_s)

    def take_max_since_last_s(self) -> float:
        """The largest lag since the previous call (one telemetry message to the next)."""
        value, self._max_since_last_s = self._max_since_last_s, 0.0
        return value

    def p99_s(self) -> float:
        return percentile(list(self.samples_s), 99)

    def max_s(self) -> float:
        return max(self.samples_s, default=0.0)
