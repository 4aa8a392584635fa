"""A work budget per event-loop iteration, shared by all the chargers of one central system.

With hundreds of chargers, work arrives in bursts: a setpoint moves every
charger's limit at once (one SetChargingProfile each), and stations whose
meter clocks are aligned send their MeterValues together.  Done as it comes,
a burst of 500 is one event-loop iteration of 100-250 ms, during which no
timer fires and no other socket is read: the control cycle starts late.

``LoopPacer`` admits work in *slices*: a slice opens with the first unit of
work admitted, takes more units while it is younger than ``budget_s`` and has
had fewer than ``max_units``, and closes one loop iteration later (a
``call_soon`` callback), so timers and I/O run between slices.  Work that does
not fit waits in FIFO queues, highest priority first, and the closing callback
hands out turns for the next iteration.  A unit of work is one incoming
message (``take``) or one charger's turn to send its command (``submit``,
then ``admit`` when the command task runs).  A slice is measured when a unit
starts, so the unit that crosses the budget finishes: one iteration holds at
most the end of one slice and one whole slice, about 2 x ``budget_s`` plus
one unit.

Priorities (lower first): ``RESPONSE`` (answers to our CALLs: cheap, and they
complete commands in flight), ``COMMAND`` (a charger sends its newest limit),
``REQUEST`` (a charger's CALL: MeterValues and the like, validated against the
OCPP schema on the loop, the dearest unit).  Commands never wait behind a
burst of meter values, and none of them starves: each charger has at most one
command queued and one message in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable, Hashable

RESPONSE, COMMAND, REQUEST = 0, 1, 2
BUDGET_S = 0.002
MAX_UNITS = 32


def message_priority(raw: str | bytes) -> int:
    """RESPONSE for a CALLRESULT / CALLERROR frame, REQUEST for anything else (from its message type id)."""
    head = raw[:12]
    if isinstance(head, bytes):
        head = head.decode("ascii", "replace")
    for char in head:
        if char.isdigit():
            return RESPONSE if char in "34" else REQUEST
    return REQUEST


class LoopPacer:
    def __init__(self, budget_s: float = BUDGET_S, max_units: int = MAX_UNITS):
        self.budget_s = budget_s
        self.max_units = max_units
        self._queues: tuple[deque[Callable[[], None]], ...] = (deque(), deque(), deque())
        self._front: tuple[list[Callable[[], None]], ...] = ([], [], [])  # refused after their turn: first next time
        self._queued_keys: set[Hashable] = set()
        self._slice_start: float | None = None
        self._units = 0
        self._refused = 0
        self._batch = max_units  # turns handed out per iteration, adapted to what fitted last time
        self._tick_pending = False
        # Diagnostics (tests, benchmarks): slices opened, units admitted, turns queued.
        self.slices = 0
        self.admitted = 0
        self.deferred = 0

    # ------------------------------------------------------------ admission

    def admit(self) -> bool:
        """Whether a unit of work may run now; opens a slice if none is open.  Never waits."""
        now = time.perf_counter()
        if self._slice_start is None:
            self._slice_start = now
            self._units = 0
            self.slices += 1
            self._schedule_tick()
        elif self._units >= self.max_units or now - self._slice_start >= self.budget_s:
            self._refused += 1
            return False
        self._units += 1
        self.admitted += 1
        return True

    def _waiting_before(self, priority: int) -> bool:
        return any(self._queues[p] or self._front[p] for p in range(priority + 1))

    async def take(self, priority: int = REQUEST) -> None:
        """Wait for a turn for one unit of work: at once if the slice has room and nobody of this
        or a higher priority waits, else in FIFO order in a later iteration."""
        if not self._waiting_before(priority) and self.admit():
            return
        self.deferred += 1
        front = False
        loop = asyncio.get_running_loop()
        while True:
            turn = loop.create_future()
            (self._front if front else self._queues)[priority].append(_resolver(turn))
            self._schedule_tick()
            await turn
            if self.admit():
                return
            front = True  # the slice filled up before this turn came: first in line next time

    def submit(self, key: Hashable, grant: Callable[[], None], priority: int = COMMAND, front: bool = False) -> None:
        """Queue ``grant`` (it wakes the task that will do the work, which then calls ``admit``).

        At most one entry per ``key``: a charger whose turn is already queued keeps its place,
        and sends whatever its newest target is when the turn comes.
        """
        if key in self._queued_keys:
            return
        self._queued_keys.add(key)
        (self._front if front else self._queues)[priority].append(_keyed(self._queued_keys, key, grant))
        self.deferred += 1
        self._schedule_tick()

    def pending(self) -> int:
        return sum(len(q) + len(f) for q, f in zip(self._queues, self._front))

    # --------------------------------------------------------------- slices

    def _schedule_tick(self) -> None:
        if not self._tick_pending:
            self._tick_pending = True
            asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        """One iteration after a slice opened: close it and hand out turns for the next iteration."""
        self._tick_pending = False
        # Turns that were refused for want of room show what fits; else hand out more.
        self._batch = max(1, self._units) if self._refused else min(self.max_units, self._batch * 2)
        self._slice_start = None
        self._units = self._refused = 0
        granted = 0
        for queue, front in zip(self._queues, self._front):
            if front:
                queue.extendleft(reversed(front))
                front.clear()
            while queue and granted < self._batch:
                queue.popleft()()
                granted += 1
        if granted or self.pending():
            self._schedule_tick()


def _resolver(turn: asyncio.Future) -> Callable[[], None]:
    def grant() -> None:
        if not turn.done():  # the waiter may have been cancelled
            turn.set_result(None)
    return grant


def _keyed(keys: set, key: Hashable, grant: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        keys.discard(key)
        grant()
    return run
