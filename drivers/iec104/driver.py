"""The IEC 104 driver task: the gateway as controlling station (c104.Client) of one unit.

See the package docstring (``drivers/iec104/__init__.py``) for the public API.
c104 runs its own C++ threads and calls back on them, holding the GIL, for every
frame received.  The driver takes one callback per frame, the raw-frame one,
and does as little there as it can: it notes when the unit was last heard,
decodes monitored values itself (``apdu.monitored_values``) into the
latest-values table (a lock guards it; ``reading()`` copies it), and wakes
the event loop only for confirmations (ACT_CON, ACT_TERM), with
``call_soon_threadsafe``.  With 50 units sending every 100 ms, one loop
wake-up per frame, or a second callback per frame for the point, cost the
loop its responsiveness and delayed the commands.  All other driver state is
touched on the loop only.

Direct-mode clients are built with ``command_timeout_ms=0``: ``transmit`` and
``read`` then only send, and the answer is read from the raw frames.  Those
calls run on the process's one send thread (``bridge.SendThread``), which
sends a burst of 50 commands in a few milliseconds; with a pool thread per
call, waking 50 threads that each need the GIL spread the same burst over 20-30
ms.  Select-and-execute needs c104 to wait for the select's confirmation
before it sends the execute: those drivers keep the command timeout and their
calls run in the driver pool (``_blocking``), as do a client's build, start and
stop.

Every connection attempt gets a fresh client, stopped when the attempt fails or
the link is lost.  c104 2.2.1 retries a failed connection by itself about once a
second, and ``Connection.disconnect()`` does not stop a connection that waits to
reconnect: with one long-lived client, each later ``connect()`` added another
such loop and the attempts to a dead unit grew instead of backing off.  A stopped
client makes no attempts, so the driver's ``Backoff`` alone paces them.
"""

# No "from __future__ import annotations": c104 checks callback annotations as objects, not strings.
import asyncio
import concurrent.futures
import functools
import logging
import math
import threading
import time
from typing import Any

import c104

from edge.asset import AssetDriver, AssetReading, DeviceRating, EventSink
from edge.runtime.backoff import Backoff  # noqa: F401  (re-exported: tests and callers use drivers.*.Backoff)
from edge.runtime.cycle_clock import CycleClock

from drivers.iec104 import apdu
from drivers.iec104.config import Iec104Asset, PointSpec
from drivers.iec104.bridge import LoopInbox, SendThread
from drivers.iec104.reading import available_peaks, blocking_reason, build_reading, feasible_target_kw

log = logging.getLogger("flexedge.drivers.iec104")
# One DEBUG line per confirmed command with its round trip; a logger of its own so that a
# benchmark can switch it on without the rest of the daemon's debug output.
command_log = logging.getLogger("flexedge.drivers.iec104.commands")

TYPE_ID_C_IC_NA_1 = 100

# Longest pause between connection attempts to a dead unit (the delay is drawn from [cap/2, cap]).
# A battery or boiler back from an outage is found again within this; 10 s keeps that to a
# third of aFRR's 30 s activation delay, where 30 s would spend all of it, and one TCP connection
# attempt every 5 to 10 s per dead unit costs the unit and the site network nothing.
RECONNECT_CAP_S = 10.0

# c104's blocking calls (start, stop, and a select-and-execute transmit that waits for
# its ACT_CON) wait with the GIL released, several at once after a site restart or a setpoint.
# They get a pool of their own so that they neither queue in the loop's default executor
# (min(32, cores + 4) threads) nor behind the spool's SQLite commits there.
# Threads are started only as calls overlap, and reused.
_C104_CALLS = concurrent.futures.ThreadPoolExecutor(max_workers=256, thread_name_prefix="iec104-call")
# Calls that do not wait (direct-mode transmit and read): one thread for the whole process.
_SENDER = SendThread()


async def _blocking(call, /, *args, **kwargs):
    """Run a blocking c104 call in the driver's thread pool."""
    return await asyncio.get_running_loop().run_in_executor(_C104_CALLS, functools.partial(call, *args, **kwargs))

class LinkDown(Exception):
    """The connection to the unit is not usable; the message says why."""

def _raw_command_value(spec: PointSpec, raw: float):
    if spec.type in ("C_SE_NB_1", "C_SE_TB_1"):
        counts = round(raw)
        if not -32768 <= counts <= 32767:
            raise ValueError(f"{raw:g} counts does not fit the 16-bit scaled value of {spec.type} (IOA {spec.ioa})")
        return c104.Int16(counts)
    if spec.type in ("C_SE_NA_1", "C_SE_TA_1"):
        if not -1.0 <= raw < 1.0:
            raise ValueError(f"{raw:g} is outside the normalized range -1..<1 of {spec.type} (IOA {spec.ioa})")
        return c104.NormalizedFloat(raw)
    return float(raw)

def _pass_transmit_error(confirmation: asyncio.Future, transmit: asyncio.Future) -> None:
    """A transmit() that raised (a bug, or c104 refusing a second command) ends the wait for its answer."""
    if not transmit.cancelled() and transmit.exception() is not None and not confirmation.done():
        confirmation.set_exception(transmit.exception())


class Iec104Driver(AssetDriver):
    def __init__(self, asset: Iec104Asset, cycle_s: float, emit_event: EventSink, *, backoff: Backoff | None = None,
                 clock: CycleClock | None = None):
        super().__init__(asset.id, cycle_s, emit_event)
        self.asset = asset
        # Liveness is checked by the site clock's watchdog; a driver made on its own runs a clock of its own.
        self.clock = clock if clock is not None else CycleClock(cycle_s)
        self._own_clock = clock is None
        self.points = asset.point_map()
        self.endpoint = f"{asset.host}:{asset.port}/CA{asset.common_address}"
        self.backoff = backoff or Backoff(first_s=min(0.1, cycle_s), cap_s=RECONNECT_CAP_S)
        self.offline_after_s = self.clock.offline_after_s  # checked by the clock's watchdog
        self.probe_after_s = cycle_s / 2
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: LoopInbox | None = None
        self._client: c104.Client | None = None
        self._connection: c104.Connection | None = None
        self._remote_points: dict[str, c104.Point] = {}
        # Monitored points by IOA, for the raw-frame callback's own decoding.
        self._monitored_by_ioa = {spec.ioa: (name, spec) for name, spec in self.points.items()
                                  if not spec.type.startswith("C_")}
        # Without a wait in c104 a call only sends (see the module docstring).
        self._direct = asset.command_mode != "select_and_execute"
        # Latest values, written by c104's threads: only under _values_lock.
        self._values_lock = threading.Lock()
        self._values: dict[str, Any] = {}
        self._bad_quality: set[str] = set()
        self._value_at: float | None = None
        self._state = c104.ConnectionState.CLOSED
        self._state_changed = asyncio.Event()
        self._gi_done = asyncio.Event()
        self._link_dead: str | None = None
        self._last_heard: float | None = None
        self._watch_started = time.monotonic()
        self._last_probe = 0.0
        self._online: bool | None = None
        self._last_error = "not connected yet"
        self._command_problem: str | None = None
        # AssetReading.command_refused: set by a failed setpoint (not by a lost link), cleared by a confirmed one.
        self._command_refused = False
        self._degraded_reported = False
        self._target: float | None = None
        self._target_pending = False
        self._confirmed_target: float | None = None
        self._wake = asyncio.Event()
        self._waiters: dict[tuple[int, int], asyncio.Future] = {}
        self._transmit: asyncio.Future | None = None
        # Read probes in flight, by signal: c104 can miss an answer that arrives before
        # its calling thread waits, leaving a read blocked until its timeout; a stuck read
        # on one point must not keep the next probe (on another point) from going out.
        self._probes: dict[str, asyncio.Future] = {}
        # Every call into the current client still running in a worker thread (start, reads,
        # commands, interrogation, unmute): the client is stopped only once they have ended.
        self._in_c104: set[asyncio.Future] = set()
        self._stopping: asyncio.Future | None = None  # the last client's stop, waited for by run()
        self.commands_sent = 0
        self.commands_failed = 0
        self.last_command_s: float | None = None  # round trip of the last confirmed command
        self._available_peaks: dict[str, DeviceRating] = {}  # see device_ratings

    # ------------------------------------------------------------ public API

    def reading(self) -> AssetReading:
        if not self._online:
            return AssetReading(online=False, detail=self._last_error, read_at=time.time())
        values, bad_quality, value_at = self._latest_values()
        problems = [f"bad quality on {name}" for name in sorted(bad_quality)]
        if self._command_problem:
            problems.append(self._command_problem)
        reading = build_reading(self.asset, values, problems, read_at=value_at, command_refused=self._command_refused)
        if reading.degraded and not self._degraded_reported:
            self._degraded_reported = True
            self._emit("asset_degraded", {"reason": reading.detail})
        elif not reading.degraded:
            self._degraded_reported = False
        return reading

    def device_ratings(self) -> dict[str, DeviceRating]:
        """Battery: the highest available charge and discharge power (``p_charge_available``,
        ``p_discharge_available``) the unit has reported since the gateway started, as
        ``max_charge_kw`` / ``max_discharge_kw``; it can do at least that (docs/drivers/iec104.md)."""
        values, bad_quality, _ = self._latest_values()
        self._available_peaks = available_peaks(self.asset, self.points, values, bad_quality, self._available_peaks)
        return self._available_peaks

    def set_target_kw(self, target_kw: float | None) -> None:
        if target_kw is not None:
            if isinstance(target_kw, bool) or not isinstance(target_kw, (int, float)) or not math.isfinite(target_kw):
                raise ValueError(f"{self.asset_id}: target_kw must be a finite number of kW or None, got {target_kw!r}")
            if not self.asset.controllable:
                self._emit("command_failed", {"target_kw": target_kw, "reason": "asset is not controllable"})
                return
            target_kw = float(target_kw)
        if target_kw == self._target and not self._target_pending and self._command_problem is None \
                and self._confirmed_target == target_kw:
            return  # already confirmed by the unit; IEC 104 setpoints stay in force
        self._target = target_kw
        self._target_pending = True
        self._wake.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._inbox = LoopInbox.of(self._loop)
        self._watch_started = time.monotonic()
        self.clock.watch(self._check_liveness)
        try:
            async with asyncio.TaskGroup() as group:
                if self._own_clock:
                    group.create_task(self.clock.run(), name=f"iec104-{self.asset_id}-clock")
                group.create_task(self._command_loop(), name=f"iec104-{self.asset_id}-commands")
                await self._connection_loop()
        finally:
            self.clock.unwatch(self._check_liveness)
            for probe in self._probes.values():
                probe.cancel()
            await self._close_client()
            if self._stopping is not None and not self._stopping.done():
                # Cancelled while a client was being stopped: a running client would go on
                # reconnecting by itself after this driver is gone.
                await asyncio.shield(self._stopping)

    # ------------------------------------------------- c104 thread callbacks

    def _post(self, callback, *args) -> None:
        self._inbox.post(callback, *args)

    def _on_raw(self, connection: c104.Connection, data: bytes) -> None:
        if connection is not self._connection:
            return  # a frame of a client being stopped: its attempt is over
        self._last_heard = time.monotonic()  # a float attribute: one atomic store, read on the loop
        values = apdu.monitored_values(data, self.asset.common_address)
        if values:
            self._store(values)
            return
        head = apdu.parse(data)
        if head is not None and head.cot in (apdu.COT_ACT_CON, apdu.COT_ACT_TERM) \
                and head.common_address == self.asset.common_address:
            self._post(self._confirmation, connection, head)

    def _store(self, values: list[apdu.MonitoredValue]) -> None:
        known = [(self._monitored_by_ioa[v.ioa], v) for v in values if v.ioa in self._monitored_by_ioa]
        if not known:
            return
        with self._values_lock:
            for (signal, spec), monitored in known:
                value = monitored.value
                if isinstance(value, float):
                    value = spec.to_flexedge(value) if math.isfinite(value) else None
                self._values[signal] = value
                (self._bad_quality.discard if monitored.good else self._bad_quality.add)(signal)
            self._value_at = time.time()

    def _on_state(self, connection: c104.Connection, state: c104.ConnectionState) -> None:
        self._post(self._state_is, connection, state)

    # ------------------------------------------------------ on-loop handlers

    def _latest_values(self) -> tuple[dict[str, Any], frozenset[str], float | None]:
        with self._values_lock:
            return dict(self._values), frozenset(self._bad_quality), self._value_at

    def _confirmation(self, connection: c104.Connection, head: apdu.AsduHead) -> None:
        if connection is not self._connection:
            return  # queued before its client was stopped
        if head.type_id == TYPE_ID_C_IC_NA_1 and head.cot == apdu.COT_ACT_TERM:
            self._gi_done.set()
            self._state_changed.set()  # wakes _await_open, which waits for this or a closed link
        waiter = self._waiters.get((head.ioa, head.cot))
        if waiter is not None and not waiter.done():
            waiter.set_result(not head.negative)

    def _state_is(self, connection: c104.Connection, state: c104.ConnectionState) -> None:
        if connection is not self._connection:
            return  # an earlier attempt's client (a stopped client reports CLOSED)
        self._state = state
        self._state_changed.set()

    # ------------------------------------------------------------ connection

    def _build_client(self) -> tuple[c104.Client, c104.Connection, dict[str, c104.Point]]:
        security = None
        if self.asset.tls is not None:
            tls = self.asset.tls
            security = c104.TransportSecurity(validate=True, only_known=False)
            security.set_ca_certificate(cert=str(tls.ca_file))
            security.set_certificate(cert=str(tls.cert_file), key=str(tls.key_file))
        client = c104.Client(
            tick_rate_ms=max(50, min(100, int(self.cycle_s * 1000 / 10))),
            command_timeout_ms=0 if self._direct else int(self.asset.command_timeout_s * 1000),
            transport_security=security,
        )
        # Init.ALL: on connecting c104 sends STARTDT, a general interrogation and a clock sync.
        connection = client.add_connection(ip=self.asset.host, port=self.asset.port, init=c104.Init.ALL)
        connection.on_receive_raw(callable=self._on_raw)
        connection.on_state_change(callable=self._on_state)
        station = connection.add_station(common_address=self.asset.common_address)
        mode = c104.CommandMode.SELECT_AND_EXECUTE if self.asset.command_mode == "select_and_execute" else c104.CommandMode.DIRECT
        points = {}
        for signal, spec in self.points.items():
            ptype = getattr(c104.Type, spec.type)
            if spec.type.startswith("C_"):
                points[signal] = station.add_point(io_address=spec.ioa, type=ptype, command_mode=mode)
            else:  # no on_receive: _on_raw decodes the values
                points[signal] = station.add_point(io_address=spec.ioa, type=ptype)
        return client, connection, points

    async def _connection_loop(self) -> None:
        while True:
            opened_at = None
            try:
                await self._open()
                opened_at = time.monotonic()
                self._set_online(True, "connected and interrogated")
                if self._target is not None or self._confirmed_target is not None:
                    self._target_pending = True  # a restarted unit may have lost its setpoint
                    self._wake.set()
                await self._serve()
            except LinkDown as error:
                self._note_failure(str(error))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug must not kill the driver task
                log.exception("%s: unexpected error", self.asset_id)
                self._note_failure(f"internal error: {error!r}")
            # The attempt is over: its client goes, so that c104 makes no attempt of its own and
            # the backoff alone paces the next one.
            await self._close_client()
            # Only a link that stayed up counts as a success: a unit that hangs up soon after the
            # interrogation, again and again, is retried at the backoff's pace, not at once each time.
            if opened_at is not None and time.monotonic() - opened_at >= self.backoff.cap_s:
                self.backoff.reset()
            await asyncio.sleep(self.backoff.next_delay())

    async def _open(self) -> None:
        """One connection attempt, on a fresh client: TCP, STARTDT and the general interrogation."""
        client, connection, points = await _blocking(self._build_client)
        self._gi_done.clear()
        self._link_dead = None
        # Until c104 says otherwise; CLOSED or CLOSED_AWAIT_RECONNECT from here on mean the attempt failed.
        self._state = c104.ConnectionState.CLOSED_AWAIT_OPEN
        self._client, self._connection, self._remote_points = client, connection, points
        await self._c104_call(client.start, pool=True)  # starts the client's thread, which connects
        await self._await_open()

    async def _await_open(self) -> None:
        deadline = time.monotonic() + self.asset.connect_timeout_s
        unmute_at = time.monotonic() + self.asset.connect_timeout_s / 2
        while self._state != c104.ConnectionState.OPEN:
            if self._state in (c104.ConnectionState.CLOSED, c104.ConnectionState.CLOSED_AWAIT_RECONNECT):
                # Refused, or closed by the unit before STARTDT; waiting on would only see c104's own retry.
                raise LinkDown(f"connection to {self.endpoint} refused or closed ({self._state.name})")
            self._state_changed.clear()
            if self._state == c104.ConnectionState.OPEN_MUTED and time.monotonic() > unmute_at:
                # Seen with c104 2.2.1: now and then a fresh connection stays muted (no STARTDT).
                unmute_at = deadline
                await self._c104_call(self._connection.unmute, pool=True)
            remaining = min(deadline, unmute_at) - time.monotonic()
            if time.monotonic() >= deadline:
                raise LinkDown(f"no connection to {self.endpoint} within {self.asset.connect_timeout_s:g} s")
            try:
                await asyncio.wait_for(self._state_changed.wait(), max(0.01, remaining))
            except TimeoutError:
                pass
        self._last_heard = time.monotonic()
        if not await self._interrogated(max(deadline, time.monotonic() + 0.05)):
            # c104's own interrogation did not finish (or was skipped after an unmute): ask again.
            await self._c104_call(self._connection.interrogation, common_address=self.asset.common_address,
                                  wait_for_response=False)
            if not await self._interrogated(time.monotonic() + self.asset.command_timeout_s):
                log.warning("%s: general interrogation not confirmed", self.asset_id)

    async def _interrogated(self, deadline: float) -> bool:
        """Whether the general interrogation's ACT_TERM comes by ``deadline`` (monotonic); LinkDown if the link closes first."""
        while not self._gi_done.is_set():
            if self._state != c104.ConnectionState.OPEN:
                raise LinkDown(f"connection to {self.endpoint} closed ({self._state.name}) during the interrogation")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._state_changed.clear()
            try:
                await asyncio.wait_for(self._state_changed.wait(), remaining)
            except TimeoutError:
                pass
        return True

    async def _close_client(self) -> None:
        """Stop the current client, once every call still inside it has returned."""
        client, self._client = self._client, None
        if client is None:
            return
        # From here no call reaches this client and its late callbacks are dropped.
        self._connection, self._remote_points = None, {}
        self._state = c104.ConnectionState.CLOSED
        in_c104 = {call for call in self._in_c104 if not call.done()}
        self._stopping = asyncio.ensure_future(self._stop_client(client, in_c104))
        await asyncio.shield(self._stopping)

    async def _stop_client(self, client: c104.Client, in_c104: set[asyncio.Future]) -> None:
        if in_c104:
            # Stopping a client under a thread that is inside it can crash the process.
            _, stuck = await asyncio.wait(in_c104, timeout=self.asset.command_timeout_s + 0.5)
            if stuck:
                log.warning("%s: stopping the client with %d c104 call(s) still running", self.asset_id, len(stuck))
        try:
            await _blocking(client.stop)
        except Exception:  # nothing more to do with this client; the next attempt has its own
            log.exception("%s: stopping the c104 client failed", self.asset_id)

    async def _serve(self) -> None:
        while True:
            if self._state != c104.ConnectionState.OPEN:
                raise LinkDown(f"connection to {self.endpoint} closed ({self._state.name})")
            if self._link_dead:
                raise LinkDown(self._link_dead)
            self._state_changed.clear()
            # A state change and a dead link (from _check_liveness) both set the event: the timeout
            # is only a safety net, long so that 50 idle drivers do not wake the loop 400 times a second.
            try:
                await asyncio.wait_for(self._state_changed.wait(), self.offline_after_s)
            except TimeoutError:
                pass

    def _check_liveness(self) -> None:
        """Called by the site clock's watchdog, eight times a cycle."""
        now = time.monotonic()
        started = self._watch_started
        if self._online:
            silent_s = now - (self._last_heard or started)
            if silent_s > self.offline_after_s:
                if not self._link_dead:
                    self._link_dead = f"no frame from {self.endpoint} for {silent_s:.2f} s"
                    self._note_failure(self._link_dead)
                self._state_changed.set()
            elif silent_s > self.probe_after_s and now - self._last_probe > self.probe_after_s:
                # A quiet unit is not a dead one: a read command draws an answer.
                signal = self._probe_signal()
                if signal is not None:
                    self._last_probe = now
                    self._probes[signal] = asyncio.ensure_future(self._read_probe(signal))
        elif self._online is None and now - started > self.offline_after_s:
            self._set_online(False, self._last_error)

    def _probe_signal(self) -> str | None:
        """A monitored signal with no read in flight, the measured power first."""
        for signal in sorted(self.points, key=lambda name: name != "p_measured"):
            if self.points[signal].type.startswith("C_") or signal not in self._remote_points:
                continue
            probe = self._probes.get(signal)
            if probe is None or probe.done():
                return signal
        return None

    async def _read_probe(self, signal: str = "p_measured") -> None:
        """Read a monitored point (C_RD_NA_1): the answer is a frame, which ``_on_raw`` notes as heard.

        Any answer will do: the value (COT 5) or, from a unit without reads, a negative
        confirmation.  Not a test command (C_TS_TA_1): c104 2.2.1 prints "Unsupported type
        C_TS_TA_1" to stderr for every answer to one.  With select-and-execute ``read()``
        blocks until the answer (or c104's command timeout), in a pool thread.
        """
        point = self._remote_points.get(signal)
        if point is None:
            return  # the client was stopped before this probe started
        try:
            await self._c104_call(point.read)
        except Exception as error:  # e.g. c104 refusing a second read in flight: the next check tries again
            log.debug("%s: read probe not sent: %r", self.asset_id, error)

    def _note_failure(self, reason: str) -> None:
        self._last_error = reason
        if self._online is not False:
            log.warning("%s: %s", self.asset_id, reason)
        self._set_online(False, reason)

    def _set_online(self, online: bool, reason: str) -> None:
        if online == self._online:
            return
        self._online = online
        if not online:
            with self._values_lock:
                self._values.clear()
                self._bad_quality.clear()
            self._fail_waiters()
        self._emit("asset_online" if online else "asset_offline", {"reason": reason, "endpoint": self.endpoint})

    def _emit(self, kind: str, detail: dict[str, Any]) -> None:
        try:
            self.emit_event(kind, self.asset_id, detail)
        except Exception:
            log.exception("%s: event sink failed on %s", self.asset_id, kind)

    # -------------------------------------------------------------- commands

    async def _command_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._target_pending or not self._online:
                continue  # sent once the link is back (the connection loop wakes us)
            self._target_pending = False
            target = self._target
            try:
                await self._command(target)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.exception("%s: command failed unexpectedly", self.asset_id)
                self._command_failed(target, None, f"internal error: {error!r}", {})

    async def _command(self, target_kw: float | None) -> None:
        spec = self.points["p_setpoint"]
        values, _, _ = self._latest_values()
        blocked = blocking_reason(self.asset, values)
        if blocked:
            self._command_failed(target_kw, None, f"not sent: {blocked}", {"ioa": spec.ioa, "type": spec.type})
            return
        # Release (None) means "stop": IEC 104 setpoints stay latched in the unit otherwise.
        value_kw = 0.0 if target_kw is None else feasible_target_kw(self.asset, target_kw, values)
        raw = spec.to_raw(value_kw)
        written = {"ioa": spec.ioa, "type": spec.type, "raw": raw, "value_kw": value_kw}
        try:
            command_value = _raw_command_value(spec, raw)
        except ValueError as error:
            self._command_failed(target_kw, value_kw, str(error), written)
            return
        if self._transmit is not None and not self._transmit.done():
            # A timed-out transmit still holds the point; c104 allows one command in flight.
            await asyncio.wait({self._transmit}, timeout=self.asset.command_timeout_s)
        point = self._remote_points.get("p_setpoint")
        if point is None or not self._online:  # the link went while the point was held
            self._command_failed(target_kw, value_kw, f"link down ({self._state.name})", written, refused=False)
            return
        loop = asyncio.get_running_loop()
        # The raw-frame callback resolves these: True positive, False negative; None: the link was lost.
        con = self._waiters[(spec.ioa, apdu.COT_ACT_CON)] = loop.create_future()
        term = self._waiters[(spec.ioa, apdu.COT_ACT_TERM)] = loop.create_future()
        started = time.monotonic()
        self.commands_sent += 1
        try:
            # Success is read from the ACT_CON frame itself, never from transmit()'s answer: in
            # direct mode transmit() does not wait (False at once); with select-and-execute it
            # cannot tell a refusal from a timeout, c104 can take a late ACT_TERM of an earlier
            # command for this one's answer, and c104 2.2.1 can miss the ACT_CON altogether
            # (awaitCommandSuccess waits without first looking whether the answer is already in;
            # under load, about one transmit() in 1000-2000 returned only with the next answer).
            # transmit() only holds the point until it returns.
            # Few loop callbacks per command on purpose: 50 units are commanded in the same instant.
            self._transmit = self._c104_call(self._send_command, point, command_value)
            self._transmit.add_done_callback(functools.partial(_pass_transmit_error, con))
            try:
                async with asyncio.timeout(self.asset.command_timeout_s):
                    accepted = await con
            except TimeoutError:
                accepted = None
                reason = f"no ACT_CON within {self.asset.command_timeout_s:g} s"
            else:
                reason = "negative ACT_CON (unit refused the setpoint)" if accepted is False else "link lost"
            if accepted is not True:
                link_lost = self._state != c104.ConnectionState.OPEN or (accepted is None and reason == "link lost")
                if self._state != c104.ConnectionState.OPEN:
                    reason = f"link down ({self._state.name})"
                self._command_failed(target_kw, value_kw, reason, written, refused=not link_lost)
                return
            if self.asset.confirm == "act_term":
                remaining = self.asset.command_timeout_s - (time.monotonic() - started)
                try:
                    async with asyncio.timeout(max(0.0, remaining)):
                        executed = await term
                except TimeoutError:
                    executed = "timeout"
                if executed is not True:
                    link_lost = executed is None or self._state != c104.ConnectionState.OPEN
                    if link_lost:
                        reason = "link lost before ACT_TERM"
                    elif executed is False:
                        reason = "negative ACT_TERM (unit did not execute)"
                    else:
                        reason = f"no ACT_TERM within {self.asset.command_timeout_s:g} s"
                    self._command_failed(target_kw, value_kw, reason, written, refused=not link_lost)
                    return
        finally:
            for key in ((spec.ioa, apdu.COT_ACT_CON), (spec.ioa, apdu.COT_ACT_TERM)):
                future = self._waiters.pop(key, None)
                if future is not None and not future.done():
                    future.cancel()
        self._confirmed_target = target_kw
        self.last_command_s = time.monotonic() - started
        self.command_log.note("target_kw", target_kw, True, "ACT_TERM" if self.asset.confirm == "act_term" else "ACT_CON")
        command_log.debug("%s: %s kW confirmed in %.3f ms", self.asset_id, target_kw, self.last_command_s * 1000)
        if self._command_problem is not None:
            self._command_problem = None
        self._command_refused = False

    def _c104_call(self, call, *args, pool: bool = False, **kwargs) -> asyncio.Future:
        """A c104 call off the loop: on the send thread when it only sends, else (or with ``pool``) in the pool.

        The call is noted in ``_in_c104`` until it has returned, and what is returned is a shield
        of it: a caller that is cancelled stops waiting, but the client is still not stopped
        under the call (``_close_client``).
        """
        if kwargs:
            call = functools.partial(call, **kwargs)
        if self._direct and not pool:
            inner = _SENDER.submit(call, *args)
        else:
            inner = asyncio.get_running_loop().run_in_executor(_C104_CALLS, call, *args)
        self._in_c104.add(inner)
        inner.add_done_callback(self._in_c104.discard)
        return asyncio.shield(inner)

    @staticmethod
    def _send_command(point: c104.Point, value) -> bool:
        point.value = value
        return point.transmit(cause=c104.Cot.ACTIVATION)

    def _command_failed(self, target_kw, value_kw, reason: str, written: dict[str, Any], *, refused: bool = True) -> None:
        """``refused``: the unit refused or did not confirm it, or it could not be sent; not so when the link went."""
        self.commands_failed += 1
        self.command_log.note("target_kw", target_kw, False, reason)
        self._confirmed_target = None
        self._command_problem = f"last command failed: {reason}"
        if refused:
            self._command_refused = True
        log.warning("%s: command %s kW failed: %s", self.asset_id, target_kw, reason)
        self._emit("command_failed", {"target_kw": target_kw, "sent_kw": value_kw, "reason": reason, **written})

    def _fail_waiters(self) -> None:
        for future in self._waiters.values():
            if not future.done():
                future.set_result(None)  # no answer: the link is gone
