"""Shared field links: one Modbus client per TCP endpoint or serial line, for all its assets.

Real sites put several devices behind one link: a data manager or cluster controller that
answers for one unit id per inverter on one IP address and port (many accept only one or
two TCP connections), or several inverters on one RS-485 bus (a serial port can be opened
once).  A ``LinkHub`` owns the one pymodbus client of such a link; every asset reaches it
through its own ``ModbusLink`` handle (drivers/sunspec/link.py), so a driver neither knows
nor cares whether it shares its link.

Public API
----------

``hub_for(asset) -> LinkHub``
    The hub of ``asset.link_key`` (drivers/sunspec/config.py: ``("tcp", host, port)`` or ``("rtu",
    device)``) on the running event loop, made on first use.  The registry holds hubs
    weakly: a hub lives while a handle refers to it.

``hubs() -> list[LinkHub]``
    The hubs of the running loop (diagnostics, tests).

``LinkHub``
    ``describe()`` (``tcp:host:port`` or ``rtu:/dev/ttyUSB0@9600 8N1``), ``connected``,
    ``handles`` (the attached ``ModbusLink`` handles), and counters: ``attempts`` (connects
    tried), ``opened`` (connects made), ``losses`` (times the link was lost or given up).
    The handles call ``connect(handle)``, ``detach(handle)`` and ``request(handle, what,
    call)``; nothing else should.

Behaviour
---------

* **One client, one request at a time.**  Requests of all assets queue (first come, first
  served) for the link; each is bounded by its own asset's ``timeout_s`` once it is on the
  wire (time in the queue does not count).  On a serial line, the line is silent for
  ``serial.inter_frame_delay_ms`` (default 3.5 characters) before each request, counted from
  the end of the previous answer or timeout; the line uses the largest value of its assets.
* **Attach, detach.**  A handle attaches on ``connect`` and detaches on ``close``; when the
  last one detaches the client is closed.  A driver closes its handle after any failure, so
  an asset alone on its link reconnects exactly as it did before links were shared.
* **One reconnect.**  Connects are coalesced: a handle that finds a connect under way waits
  for it; one that finds that the last connect failed less than a back-off delay ago (capped
  exponential from 0.1 s to 30 s, with jitter) waits for the next attempt and shares it.  So a
  link is tried at most once per back-off step, however many assets it carries.
* **Unit problem or link problem.**  The link is lost when pymodbus reports the connection
  closed (reset, closed by the peer, a serial port error) or a request finds it unusable;
  and it is given up when every asset attached to it has failed to answer since the link
  last carried an answer, from at least two unit ids (a half-open TCP connection, a hung
  gateway or RS-485 adapter, a cut bus).  Then the client is closed and every attached
  handle's ``on_link_down(reason)`` is called at once, so that all its assets go offline
  together.  Otherwise a timeout is the unit's problem, as are the gateway exceptions 0x0A
  (path unavailable) and 0x0B (target failed to respond): only that request fails
  (``LinkFailure``, ``UnitUnreachable`` for the exceptions) and the link stays up for the
  others.  Two inverters asleep at night behind a data manager therefore do not take the
  meter on the same data manager offline.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException

from edge.runtime.backoff import Backoff
from edge.runtime.logs import fold_pymodbus_chatter, pymodbus_connect_cause

log = logging.getLogger("flexedge.drivers.sunspec.hub")
fold_pymodbus_chatter()  # pymodbus's per-attempt connection warnings: this module reports the link once

GATEWAY_PATH_UNAVAILABLE = 10
GATEWAY_TARGET_FAILED = 11
MODBUS_EXCEPTIONS = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    GATEWAY_PATH_UNAVAILABLE: "gateway path unavailable",
    GATEWAY_TARGET_FAILED: "gateway target failed to respond",
}
# pymodbus' own bound on an answer; every request is bounded by its asset's timeout_s first.
_CLIENT_TIMEOUT_S = 60.0
# pymodbus closes a TCP connection after a few timeouts in a row, whichever units they were
# for; whether the link or a unit is at fault is the hub's call.
_NO_AUTO_DISCONNECT = 1 << 30
# A link is given up when this many unit ids, and all those attached, failed to answer since its last answer.
SILENT_UNITS_FOR_DEAD_LINK = 2


class LinkFailure(Exception):
    """No usable answer: timeout, connection refused or lost, garbled reply, unit unreachable."""


class UnitUnreachable(LinkFailure):
    """A gateway answered for the unit that the unit is unreachable (exception 0x0A or 0x0B).

    A ``LinkFailure`` for the asset (its device did not answer), though the link itself is fine."""

    def __init__(self, what: str, code: int, where: str):
        self.code = code
        super().__init__(f"{what}: {where}: exception {code} ({MODBUS_EXCEPTIONS[code]})")


class DeviceRejected(Exception):
    """The device answered a request with a Modbus exception response."""

    def __init__(self, what: str, code: int):
        self.code = code
        super().__init__(f"{what}: exception {code} ({MODBUS_EXCEPTIONS.get(code, 'unknown')})")


def _reraise_swallowed_cancel() -> None:
    # pymodbus awaits its response with asyncio.wait_for, which on Python 3.11 can return the
    # result and drop a cancellation that arrives in the same loop iteration as the response.
    # The task still counts the cancellation, so honour it.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _close_quietly(client) -> None:
    try:
        client.close()
    except Exception:
        pass


def _line_settings(asset) -> tuple:
    s = asset.serial
    return (s.baudrate, s.bytesize, s.parity, s.stopbits) if s is not None else ()


class LinkHub:
    """The one client of a TCP endpoint or serial line; see the module docstring."""

    def __init__(self, asset, loop: asyncio.AbstractEventLoop):
        self.key = asset.link_key
        self.loop = loop
        self.handles: set[Any] = set()
        self.attempts = 0
        self.opened = 0
        self.losses = 0
        self._configure(asset)
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._lock = asyncio.Lock()
        self._connecting: asyncio.Task | None = None
        self._backoff = Backoff(first_s=0.1, cap_s=30.0)
        self._retry_at = 0.0  # no new connect attempt before this (monotonic)
        self._answered = False  # the connection now open has carried an answer
        self._silent_units: set[int] = set()  # units that timed out since the link last carried an answer
        self._quiet_until = 0.0  # serial: no request before this (monotonic)

    def _configure(self, asset) -> None:
        self.host, self.port, self.serial = asset.host, asset.port, asset.serial
        self.line = _line_settings(asset)
        self.owner = asset.id  # the asset whose settings opened the link

    # ------------------------------------------------------------ state

    def describe(self) -> str:
        if self.serial is not None:
            baudrate, bytesize, parity, stopbits = self.line
            return f"rtu:{self.serial.port}@{baudrate} {bytesize}{parity}{stopbits}"
        return f"tcp:{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    def inter_frame_s(self) -> float:
        if self.serial is None:
            return 0.0
        return max((h.asset.serial.inter_frame_s for h in self.handles), default=self.serial.inter_frame_s)

    # ------------------------------------------------------- attach/detach

    def attach(self, handle) -> None:
        if handle in self.handles:
            return
        if not self.handles and self._connecting is None and self._client is None:
            self._configure(handle.asset)  # nobody on it: the newcomer's settings open it
        elif _line_settings(handle.asset) != self.line:
            raise LinkFailure(
                f"cannot share {self.describe()} (opened for asset {self.owner!r}): asset {handle.asset.id!r} "
                f"asks for {handle.describe()}; the assets of one serial line need the same settings"
            )
        self.handles.add(handle)

    def detach(self, handle) -> None:
        self.handles.discard(handle)
        if self.handles:
            return
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        client, self._client = self._client, None
        if client is not None:
            _close_quietly(client)

    # ------------------------------------------------------------- connect

    async def connect(self, handle) -> None:
        """Attach ``handle`` and return once the link is open: at once if it is, else through
        the one connect under way or the next one.  Raises ``LinkFailure``."""
        self.attach(handle)
        while not self.connected:
            if self._client is not None:  # pymodbus saw it close but told nobody yet
                self._lost(f"connection to {self.describe()} lost")
            task = self._connecting
            if task is None:
                wait_s = self._retry_at - time.monotonic()
                if wait_s > 0:
                    # The last attempt failed moments ago: wait for the next one rather than add one.
                    await asyncio.sleep(wait_s)
                    continue
                task = self._connecting = self.loop.create_task(
                    self._open(handle.timeout_s), name=f"modbus-connect {self.describe()}"
                )
                task.add_done_callback(self._connect_done)
            try:
                await asyncio.shield(task)
            except LinkFailure as error:
                raise LinkFailure(str(error)) from None  # a fresh one per waiter: tracebacks are per task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # this waiter was cancelled
                _reraise_swallowed_cancel()
                raise LinkFailure(f"connect to {self.describe()} abandoned") from None
            if not self.connected:
                # Opened and closed at once (an endpoint over its connection limit does that): one
                # attempt per call, and the next only after the back-off (set by _lost).
                raise LinkFailure(f"{self.describe()} closed the connection as soon as it opened")

    def _connect_done(self, task: asyncio.Task) -> None:
        # Runs before the waiters resume (added before shield's callback).
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved here: each waiter raises its own copy

    async def _open(self, timeout_s: float) -> None:
        self.attempts += 1
        cell: list[Any] = []
        client = self._new_client(lambda up: self._traced(cell[0] if cell else None, up))
        cell.append(client)
        client.set_max_no_responses(_NO_AUTO_DISCONNECT)
        why = ""
        try:
            async with asyncio.timeout(timeout_s + 0.5):
                ok = await client.connect()
        except (TimeoutError, OSError, ModbusException) as error:
            ok, why = False, str(error) or type(error).__name__
        except BaseException:
            _close_quietly(client)
            raise
        if not ok and not why:  # pymodbus logged the cause and returned False: read it now, before any await
            why = pymodbus_connect_cause() or ""
        if ok and not self.handles:  # everyone left meanwhile (a cancellation pymodbus swallowed)
            _close_quietly(client)
            raise LinkFailure(f"connect to {self.describe()} abandoned")
        if not ok:
            _close_quietly(client)
            self._retry_at = time.monotonic() + self._backoff.next_delay()
            raise LinkFailure(f"cannot connect to {self.describe()}" + (f": {why}" if why else ""))
        self._client = client
        self._answered = False  # the back-off is reset by the first answer, not by the connect
        self._silent_units.clear()
        self.opened += 1
        if len(self.handles) > 1 or self.opened > 1:
            log.info("%s: connected (attempt %d), for %s", self.describe(), self.attempts,
                     ", ".join(sorted(h.asset.id for h in self.handles)))

    def _new_client(self, trace_connect: Callable[[bool], None]):
        common = dict(timeout=_CLIENT_TIMEOUT_S, retries=0, reconnect_delay=0, trace_connect=trace_connect)
        if self.serial is not None:
            baudrate, bytesize, parity, stopbits = self.line
            return AsyncModbusSerialClient(
                self.serial.port, baudrate=baudrate, bytesize=bytesize, parity=parity, stopbits=stopbits, **common
            )
        return AsyncModbusTcpClient(self.host, port=self.port, **common)

    def _traced(self, client, up: bool) -> None:
        if not up and client is not None and client is self._client:
            self._lost(f"connection to {self.describe()} lost")

    def _lost(self, reason: str) -> None:
        """The link is unusable: close it and tell every asset on it."""
        client, self._client = self._client, None
        if client is None:
            return
        _close_quietly(client)
        self.losses += 1
        self._silent_units.clear()
        if not self._answered:
            # Lost before any answer: the next connect waits for the back-off, or an endpoint that
            # accepts and drops at once would be reconnected to in a tight loop.
            self._retry_at = time.monotonic() + self._backoff.next_delay()
        log.warning("%s: link down, %d asset(s) on it: %s", self.describe(), len(self.handles), reason)
        # At once (synchronously): the asset whose request found the link dead detaches right after.
        for handle in list(self.handles):
            if handle.on_link_down is None:
                continue
            try:
                handle.on_link_down(reason)
            except Exception:
                log.exception("%s: link-down callback of %s failed", self.describe(), handle.asset.id)

    # ------------------------------------------------------------- request

    async def request(self, handle, what: str, call: Callable[[Any], Awaitable[Any]]):
        """Run ``call(client)`` for ``handle`` when the link is free; the response, or
        ``DeviceRejected`` / ``UnitUnreachable`` / ``LinkFailure``."""
        if handle not in self.handles or not self.connected:
            raise LinkFailure(f"{what}: not connected to {self.describe()}")
        async with self._lock:
            client = self._client
            if handle not in self.handles or client is None or not client.connected:
                raise LinkFailure(f"{what}: not connected to {self.describe()}")
            if (wait_s := self._quiet_until - time.monotonic()) > 0:
                await asyncio.sleep(wait_s)
            try:
                async with asyncio.timeout(handle.timeout_s):
                    response = await call(client)
            except TimeoutError:
                if self._unit_silent(client, handle):
                    raise LinkFailure(f"{what}: connection to {self.describe()} lost") from None
                raise LinkFailure(f"{what}: no answer from {handle.describe()} within {handle.timeout_s:g} s") from None
            except ModbusIOException as error:  # an answer that does not fit the request: the unit's
                self._silent_units.clear()
                raise LinkFailure(f"{what}: {handle.describe()}: {error}") from None
            except (ModbusException, OSError) as error:
                if client is self._client:
                    self._lost(f"{what}: {error}")
                raise LinkFailure(f"{what}: {error}") from None
            finally:
                if (gap_s := self.inter_frame_s()) > 0:
                    self._quiet_until = time.monotonic() + gap_s
            self._silent_units.clear()  # the link carries answers
            if not self._answered:
                self._answered = True
                self._backoff.reset()
                self._retry_at = 0.0
        _reraise_swallowed_cancel()
        if response.isError():
            code = getattr(response, "exception_code", 0)
            if code in (GATEWAY_PATH_UNAVAILABLE, GATEWAY_TARGET_FAILED):
                raise UnitUnreachable(what, code, handle.describe())
            raise DeviceRejected(what, code)
        return response

    def _unit_silent(self, client, handle) -> bool:
        """Note a timeout; True when the connection itself was found lost."""
        if client is not self._client:
            return True  # lost while the request waited
        if not client.connected:
            self._lost(f"connection to {self.describe()} lost")
            return True
        self._silent_units.add(handle.unit_id)
        attached = {h.unit_id for h in self.handles}
        if len(self._silent_units) >= SILENT_UNITS_FOR_DEAD_LINK and attached <= self._silent_units:
            units = ", ".join(map(str, sorted(self._silent_units)))
            self._lost(f"no answer from units {units} since the last answer on {self.describe()}: link given up")
        return False


# ----------------------------------------------------------------- registry

_registries: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakValueDictionary[tuple, LinkHub]] = (
    weakref.WeakKeyDictionary()
)


def hub_for(asset) -> LinkHub:
    """The hub of ``asset``'s link on the running loop (made on first use)."""
    loop = asyncio.get_running_loop()
    hubs_here = _registries.get(loop)
    if hubs_here is None:
        hubs_here = _registries[loop] = weakref.WeakValueDictionary()
    key = asset.link_key
    hub = hubs_here.get(key)
    if hub is None:
        hub = hubs_here[key] = LinkHub(asset, loop)
    return hub


def hubs() -> list[LinkHub]:
    """The hubs alive on the running loop."""
    return list(_registries.get(asyncio.get_running_loop(), {}).values())
