"""The site's one cycle clock: when the control cycle ticks, and when polled drivers read for it.

The controller ticks at ``t0 + k * cycle_s`` on the monotonic clock.  A polled driver
(SunSpec) reads its device for tick k in a short window just before that tick, so that at
the tick every asset's reading is fresh: the controller takes them all at once (the process
image), decides, writes, and reports from that one snapshot.

The window holds a few phase groups (a site's devices are spread over them as they join),
woken one after another by this clock's single timer: no burst of every poll at one
instant, which would delay a setpoint arriving then, and no timer per device.  The last
group is woken ``guard_s`` before the tick, the others ``spacing_s`` apart before it.
``guard_s`` follows how long the polls take (the worst of the last few cycles, with a
margin), so the readings are as fresh as the devices allow and still in by the tick.

The clock is also the site's one liveness watchdog: eight times a cycle it asks every
member whether its device has been silent too long, so no driver needs a timer of its own
for that.  See docs/architecture.md, "Timing of a cycle".
"""

from __future__ import annotations

import asyncio
import math
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("flexedge.clock")

POLL_GROUPS = 4
SPACING_MAX_S = 0.025  # between two groups' wake-ups (less at short cycles: cycle_s / 40)
GUARD_MIN_S = 0.015  # the last group polls at least this long before the tick
GUARD_MARGIN = 1.5  # guard = margin x the slowest recent poll (+ GUARD_SLACK_S)
GUARD_SLACK_S = 0.005
GUARD_HISTORY_CYCLES = 8
WATCHDOG_PER_CYCLE = 8


@dataclass(eq=False, slots=True)
class PollSlot:
    """A member of the clock: told when to poll, and asked whether its device went silent."""

    group: int
    on_poll: Callable[[int], None]  # called with the tick index the poll is for
    check_liveness: Callable[[], None] | None = None
    polled_tick: int | None = field(default=None)  # the tick its newest completed poll was for


class CycleClock:
    def __init__(self, cycle_s: float, *, t0: float | None = None, groups: int = POLL_GROUPS):
        if not (math.isfinite(cycle_s) and cycle_s > 0):
            raise ValueError(f"cycle_s must be a positive number of seconds, got {cycle_s!r}")
        self.cycle_s = float(cycle_s)
        self.t0 = time.monotonic() if t0 is None else t0
        self.spacing_s = min(SPACING_MAX_S, self.cycle_s / 40)
        self._groups: list[list[PollSlot]] = [[] for _ in range(max(1, groups))]
        self._joined = 0
        self._watched: list[Callable[[], None]] = []  # liveness checks of drivers that are not polled
        self._worst_by_cycle: deque[float] = deque(maxlen=GUARD_HISTORY_CYCLES)
        self._worst_this_cycle = 0.0
        self.guard_s = self._clamp_guard(self.cycle_s / 10)
        self.running = False

    # ------------------------------------------------------------- ticks

    def tick_at(self, k: int) -> float:
        return self.t0 + k * self.cycle_s

    def upcoming_tick(self, now: float | None = None) -> int:
        """The index of the first tick strictly after ``now``."""
        now = time.monotonic() if now is None else now
        return max(1, math.floor((now - self.t0) / self.cycle_s) + 1)

    @property
    def offline_after_s(self) -> float:
        """Silence after which a device is offline: the watchdog, checking eight times a cycle,
        then says so at most two cycles after the last answer."""
        return 2.0 * self.cycle_s - self.cycle_s / WATCHDOG_PER_CYCLE

    def lead_s(self, group: int) -> float:
        """How long before a tick ``group`` is woken to poll for it."""
        return self.guard_s + (len(self._groups) - 1 - group) * self.spacing_s

    # ----------------------------------------------------------- members

    def join(self, on_poll: Callable[[int], None], check_liveness: Callable[[], None] | None = None) -> PollSlot:
        slot = PollSlot(self._joined % len(self._groups), on_poll, check_liveness)
        self._joined += 1
        self._groups[slot.group].append(slot)
        return slot

    def watch(self, check_liveness: Callable[[], None]) -> None:
        """Have the watchdog call ``check_liveness`` eight times a cycle (a driver whose device reports by itself)."""
        self._watched.append(check_liveness)

    def unwatch(self, check_liveness: Callable[[], None]) -> None:
        if check_liveness in self._watched:
            self._watched.remove(check_liveness)

    def leave(self, slot: PollSlot) -> None:
        members = self._groups[slot.group]
        if slot in members:
            members.remove(slot)

    def poll_done(self, slot: PollSlot, tick: int, took_s: float) -> None:
        """A member finished its poll for ``tick``, ``took_s`` after it was woken."""
        slot.polled_tick = tick
        if math.isfinite(took_s) and took_s > self._worst_this_cycle:
            self._worst_this_cycle = took_s

    def polled_for_upcoming(self, slot: PollSlot) -> bool:
        """Whether the member's newest poll already was the one for the coming tick."""
        return slot.polled_tick is not None and slot.polled_tick >= self.upcoming_tick()

    # --------------------------------------------------------------- run

    async def run(self) -> None:
        """Wake each group in turn before every tick, and watch liveness.  Runs until cancelled."""
        self.running = True
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._watchdog(), name="cycle-clock-watchdog")
                await self._wake_groups()
        finally:
            self.running = False

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.cycle_s / WATCHDOG_PER_CYCLE)
            for members in self._groups:
                for slot in tuple(members):
                    if slot.check_liveness is not None:
                        _call(slot.check_liveness)
            for check in tuple(self._watched):
                _call(check)

    async def _wake_groups(self) -> None:
        k = self.upcoming_tick()
        while True:
            tick = self.tick_at(k)
            for group, members in enumerate(self._groups):
                delay = tick - self.lead_s(group) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                # Behind (a stalled loop): the groups not yet woken still poll, late; a skipped
                # poll would leave a healthy device two cycles silent, and offline.
                self._wake(members, k)
            self._end_cycle()
            k = max(k + 1, self.upcoming_tick())

    @staticmethod
    def _wake(members: list[PollSlot], k: int) -> None:
        for slot in tuple(members):
            _call(slot.on_poll, k)

    def _end_cycle(self) -> None:
        self._worst_by_cycle.append(self._worst_this_cycle)
        self._worst_this_cycle = 0.0
        worst = max(self._worst_by_cycle)
        if worst > 0:
            self.guard_s = self._clamp_guard(GUARD_MARGIN * worst + GUARD_SLACK_S)

    def _clamp_guard(self, guard_s: float) -> float:
        return min(self.cycle_s / 4, max(min(GUARD_MIN_S, self.cycle_s / 20), guard_s))


def _call(callback: Callable[..., None], *args) -> None:
    # One member's bug must not stop the clock, and with it every other member's polls.
    try:
        callback(*args)
    except Exception:
        log.exception("cycle clock: %r failed", callback)
