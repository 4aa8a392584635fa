"""The bridge between c104's threads and the event loop, shared by every IEC 104 driver.

``SendThread``: one thread that makes short c104 calls in turn.
``LoopInbox``: hands work from c104's threads to the loop, one wake-up per batch.

SendThread
----------

The drivers' clients have no wait in them (``command_timeout_ms=0``), so a
``Point.transmit`` or ``read`` only frames and sends: tens of microseconds.
Still it cannot run on the event loop (it takes c104's locks and writes to a
socket), and a thread per call was the bottleneck: when a setpoint moves 50
units at once, 50 pool threads each have to wake and take the GIL in turn, and
the last command left 20-30 ms after the first.  One thread that drains the
queue sends all 50 in a few milliseconds and wakes the loop once per batch.

c104 still waits for an answer with a deadline of "now" (a condition variable
timed wait), and Linux lets such a wait overrun by the thread's timer slack,
50 µs by default: about half of each call.  The send thread sets its own
slack to 1 ns (``PR_SET_TIMERSLACK``), which halves the time per call.

A call that does not return within ``stuck_after_s`` (a c104 lock held by a
connect or disconnect elsewhere) must not hold up the other drivers: the next
``submit`` starts a fresh thread that takes over the queue, and the stuck one
ends after its call returns.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger("flexedge.drivers.iec104")

_PR_SET_TIMERSLACK = 29


def _tighten_timer_slack() -> None:
    """Let this thread's timed waits end on time (Linux; elsewhere nothing happens)."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class SendThread:
    def __init__(self, name: str = "iec104-send", stuck_after_s: float = 0.25):
        self.name = name
        self.stuck_after_s = stuck_after_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._busy_since: dict[threading.Thread, float] = {}
        self._pending: dict[asyncio.AbstractEventLoop, list] = {}  # submitted in this loop iteration
        self.replaced = 0  # workers given up on as stuck, for tests and diagnostics

    def submit(self, call: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Queue ``call(*args)``; the returned future (of the running loop) gets its result or exception.

        The call is handed to the thread when the loop has run the callbacks now ready: a setpoint
        wakes every driver's command task in the same loop iteration, and the thread then takes
        the whole burst at once instead of fighting the loop for the GIL while the loop still
        prepares the rest.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._hand_over, loop)
        pending.append((loop, future, call, args))
        return future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        for item in self._pending.pop(loop, ()):
            self._queue.put(item)
        with self._lock:
            worker = self._worker
            busy_since = self._busy_since.get(worker) if worker is not None else None
            if worker is None or not worker.is_alive() or \
                    (busy_since is not None and time.monotonic() - busy_since > self.stuck_after_s):
                if worker is not None and worker.is_alive():
                    self.replaced += 1
                    log.warning("%s: a c104 call has been running for %.2f s; sending on a new thread",
                                self.name, time.monotonic() - busy_since)
                self._worker = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._worker.start()

    def _run(self) -> None:
        me = threading.current_thread()
        _tighten_timer_slack()
        settled: dict[asyncio.AbstractEventLoop, list] = {}
        while self._worker is me:
            try:
                # Block only with nothing left to hand back: a burst is settled in one loop wake-up.
                item = self._queue.get(block=not settled)
            except queue.Empty:
                _hand_back(settled)
                continue
            loop, future, call, args = item
            self._busy_since[me] = time.monotonic()
            try:
                outcome = (True, call(*args))
            except BaseException as error:  # the caller decides; nothing may kill the thread
                outcome = (False, error)
            finally:
                del self._busy_since[me]
            settled.setdefault(loop, []).append((future, outcome))
        _hand_back(settled)


def _hand_back(settled: dict) -> None:
    for loop, items in settled.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass
    settled.clear()


def _settle(items: list) -> None:
    for future, (ok, value) in items:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)


class LoopInbox:
    """Calls posted from any thread run on ``loop`` in order, with one wake-up for all that are waiting.

    When a setpoint moves 50 units, 50 confirmations arrive within a few
    milliseconds on 50 c104 threads.  ``call_soon_threadsafe`` for each would
    wake the loop 50 times, and every wake-up takes the GIL from the send
    thread that is still sending the rest of the burst.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake_pending = False

    def post(self, callback: Callable[..., Any], *args: Any) -> None:
        self._items.append((callback, args))
        with self._lock:
            if self._wake_pending:
                return  # the drain already scheduled will take it
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed while the library was still delivering
            pass

    def _drain(self) -> None:
        with self._lock:
            self._wake_pending = False
        items = self._items
        while items:
            callback, args = items.popleft()
            try:
                callback(*args)
            except Exception:
                log.exception("callback from a c104 thread failed")

    _by_loop: "dict[asyncio.AbstractEventLoop, LoopInbox]" = {}

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "LoopInbox":
        """The inbox of ``loop``, made on first use (one per loop, so that tests with their own loops work)."""
        inbox = cls._by_loop.get(loop)
        if inbox is None:
            for old in [old for old in cls._by_loop if old.is_closed()]:
                del cls._by_loop[old]
            inbox = cls._by_loop[loop] = cls(loop)
        return inbox
