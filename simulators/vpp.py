"""The VPP's side of the flexedge MQTT contract, simulated: setpoints out, monitoring in.

The simulator publishes activation setpoints to ``<prefix>/<site>/setpoint`` on a
fixed cadence, following a pattern, and listens to the gateway's
``telemetry``, ``setpoint/ack``, ``events`` and ``status`` topics.  It logs every
ack (rejections as warnings, with the gateway's reason) and computes the
tracking error ``|site.p_kw - site.setpoint_kw|`` over the telemetry received.

Setpoint payload (QoS 1, not retained)::

    {"id": "vpp-3fa9c2-17", "ts": "2026-11-21T10:00:00.000Z", "valid_s": 10.0, "activation_kw": 12.5}

``id`` is ``<id_prefix>-<n>``, ``n`` counting from 1 and ``id_prefix`` random per
simulator (``vpp-`` and 6 hex digits), so a restarted simulator does not repeat
the ids of an earlier run; ``ts`` is the send time, UTC, milliseconds, ``Z``;
``activation_kw`` is rounded to 1 W; positive means upward regulation.

Patterns (``t_s`` is time since :meth:`VppSimulator.run` started; ``A`` the amplitude):

* :class:`ConstantPattern` -- ``A`` all the time.
* :class:`StepsPattern` -- ``0, +A, 0, -A``, each held ``step_s``, repeating.
* :class:`RampPattern` -- triangle wave of period ``period_s``: 0 up to ``+A``
  at a quarter period, down through 0 to ``-A`` at three quarters, back to 0.
* :class:`TracePattern` -- read from a CSV file with columns ``t_s`` and
  ``activation_kw`` (other columns ignored, ``t_s`` strictly increasing);
  sample and hold: the value of the last row with ``t_s <= t``, 0 before the
  first row.  A run without a duration ends after the last row has been sent.

In-process use (what tests and ``flexedge demo`` do)::

    async with VppSimulator("127.0.0.1", port, "flexedge", "demo",
                            pattern=StepsPattern(10.0, step_s=20.0), cadence_s=2.0) as vpp:
        sent = await vpp.send_setpoint(5.0, valid_s=10)      # one exact message
        ack = await vpp.wait_ack(sent["id"], timeout_s=5)
        summary = await vpp.run(duration_s=60)               # the pattern, for 60 s
        print(vpp.tracking_stats())

The connection is kept up by a background task that reconnects with capped
exponential backoff and jitter; :meth:`send_setpoint` waits up to ``timeout_s``
for a connection and raises ConnectionError if there is none, while
:meth:`run` logs a failed send and carries on with the next tick.

Command line (Ctrl-C stops it and prints the summary)::

    python -m simulators.vpp --port 1883 --site demo --pattern steps --amplitude-kw 10 --duration-s 60
    python -m simulators.vpp --trace afrr.csv --cadence-s 2
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import math
import random
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import aiomqtt

log = logging.getLogger(__name__)
T = TypeVar("T")


def utc_iso_ms(epoch_s: float | None = None) -> str:
    """``epoch_s`` (default now) as UTC ISO 8601 with milliseconds and ``Z``."""
    moment = datetime.fromtimestamp(time.time() if epoch_s is None else epoch_s, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _check_finite(name: str, value: float, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be greater than 0, got {value!r}")
    return float(value)


# -- patterns ---------------------------------------------------------------


class Pattern(Protocol):
    """Activation in kW as a function of time since the run started."""

    end_s: float | None  # the pattern's natural end (a trace's last row), None if endless

    def activation_kw(self, t_s: float) -> float: ...


@dataclass(frozen=True)
class ConstantPattern:
    amplitude_kw: float
    end_s: float | None = None

    def __post_init__(self) -> None:
        _check_finite("amplitude_kw", self.amplitude_kw)

    def activation_kw(self, t_s: float) -> float:
        return self.amplitude_kw


@dataclass(frozen=True)
class StepsPattern:
    amplitude_kw: float
    step_s: float = 10.0
    end_s: float | None = None

    def __post_init__(self) -> None:
        _check_finite("amplitude_kw", self.amplitude_kw)
        _check_finite("step_s", self.step_s, positive=True)

    def activation_kw(self, t_s: float) -> float:
        # A small epsilon so that t_s = k * step_s, computed in floating point, lands in step k.
        step = int(math.floor(t_s / self.step_s + 1e-9)) % 4
        return (0.0, self.amplitude_kw, 0.0, -self.amplitude_kw)[step]


@dataclass(frozen=True)
class RampPattern:
    amplitude_kw: float
    period_s: float = 40.0
    end_s: float | None = None

    def __post_init__(self) -> None:
        _check_finite("amplitude_kw", self.amplitude_kw)
        _check_finite("period_s", self.period_s, positive=True)

    def activation_kw(self, t_s: float) -> float:
        phase = (t_s / self.period_s) % 1.0
        if phase < 0.25:
            shape = 4 * phase
        elif phase < 0.75:
            shape = 2 - 4 * phase
        else:
            shape = 4 * phase - 4
        return self.amplitude_kw * shape


@dataclass(frozen=True)
class TracePattern:
    points: tuple[tuple[float, float], ...]  # (t_s, activation_kw), t_s strictly increasing

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a trace needs at least one (t_s, activation_kw) point")
        for (t0, _), (t1, _) in zip(self.points, self.points[1:]):
            if t1 <= t0:
                raise ValueError(f"trace t_s must increase strictly, got {t0!r} then {t1!r}")

    @property
    def end_s(self) -> float:
        return self.points[-1][0]

    def activation_kw(self, t_s: float) -> float:
        value = 0.0
        for point_t_s, point_kw in self.points:
            if point_t_s > t_s + 1e-9:
                break
            value = point_kw
        return value

    @classmethod
    def from_csv(cls, path: str | Path) -> TracePattern:
        """Read a trace; a bad file raises ValueError naming the file, line and column."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ValueError(f"{path}: cannot read trace: {exc.strerror or exc}") from exc
        rows = csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
        header = [name.strip() for name in rows.fieldnames or []]
        missing = [name for name in ("t_s", "activation_kw") if name not in header]
        if missing:
            raise ValueError(f"{path}: trace header {header} lacks column(s) {', '.join(missing)}")
        rows.fieldnames = header
        lines = [number for number, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")]
        points: list[tuple[float, float]] = []
        for row_index, row in enumerate(rows):
            line = lines[row_index + 1]
            values = []
            for column in ("t_s", "activation_kw"):
                raw = (row.get(column) or "").strip()
                try:
                    values.append(_check_finite(column, float(raw)))
                except ValueError:
                    raise ValueError(f"{path}:{line}: {column} {raw!r} is not a finite number") from None
            if values[0] < 0:
                raise ValueError(f"{path}:{line}: t_s {values[0]:g} is negative")
            if points and values[0] <= points[-1][0]:
                raise ValueError(f"{path}:{line}: t_s {values[0]:g} does not increase (previous {points[-1][0]:g})")
            points.append((values[0], values[1]))
        if not points:
            raise ValueError(f"{path}: trace has no data rows")
        return cls(tuple(points))


def make_pattern(name: str, amplitude_kw: float, *, step_s: float = 10.0, period_s: float = 40.0) -> Pattern:
    """The pattern called ``name`` ("steps", "ramp" or "constant")."""
    if name == "steps":
        return StepsPattern(amplitude_kw, step_s)
    if name == "ramp":
        return RampPattern(amplitude_kw, period_s)
    if name == "constant":
        return ConstantPattern(amplitude_kw)
    raise ValueError(f"unknown pattern {name!r}: use steps, ramp or constant")


# -- figures ----------------------------------------------------------------


@dataclass(frozen=True)
class TrackingStats:
    """Statistics of ``|site.p_kw - site.setpoint_kw|`` over telemetry messages, in kW.

    Every telemetry message counts whose ``site.p_kw`` and ``site.setpoint_kw``
    are both finite numbers, whatever its ``mode``; the others are skipped.

    ``p95_kw`` is the nearest-rank 95th percentile.  All None when ``count`` is 0.
    """

    count: int
    mean_kw: float | None
    p95_kw: float | None
    max_kw: float | None

    @classmethod
    def of(cls, errors_kw: list[float]) -> TrackingStats:
        if not errors_kw:
            return cls(0, None, None, None)
        ordered = sorted(errors_kw)
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
        return cls(len(ordered), sum(ordered) / len(ordered), p95, ordered[-1])

    def __str__(self) -> str:
        if not self.count:
            return "tracking error: no telemetry with p_kw and setpoint_kw yet"
        return (f"tracking error over {self.count} telemetry messages: mean {self.mean_kw:.3f} kW, "
                f"p95 {self.p95_kw:.3f} kW, max {self.max_kw:.3f} kW")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# -- the simulator ----------------------------------------------------------


class VppSimulator:
    """A VPP talking to one flexedge site over MQTT 3.1.1.

    Collected data (newest last, each bounded to ``history`` entries):
    ``sent`` (setpoint payloads published), ``acks``, ``telemetry``, ``events``
    (payloads as decoded JSON); ``status`` is the latest status payload or None;
    ``tracking_errors_kw`` keeps every tracking error (one float per telemetry).
    Counters: ``send_failures``, ``bad_messages`` (non-JSON or non-object payloads).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        prefix: str = "flexedge",
        site_id: str = "demo",
        *,
        pattern: Pattern | None = None,
        cadence_s: float = 2.0,
        valid_s: float = 10.0,
        client_id: str | None = None,
        id_prefix: str | None = None,
        timeout_s: float = 5.0,
        reconnect_max_s: float = 10.0,
        history: int = 10_000,
    ):
        for name, value in (("prefix", prefix), ("site_id", site_id)):
            if not value or any(char in value for char in "+#/\x00"):
                raise ValueError(f"{name} must be a non-empty MQTT topic level without + # /, got {value!r}")
        self.host, self.port, self.prefix, self.site_id = host, port, prefix, site_id
        self.pattern: Pattern = pattern if pattern is not None else StepsPattern(10.0)
        self.cadence_s = _check_finite("cadence_s", cadence_s, positive=True)
        self.valid_s = _check_finite("valid_s", valid_s, positive=True)
        self.timeout_s = _check_finite("timeout_s", timeout_s, positive=True)
        self.reconnect_max_s = _check_finite("reconnect_max_s", reconnect_max_s, positive=True)
        self.client_id = client_id or f"flexedge-vpp-sim-{secrets.token_hex(3)}"
        self.id_prefix = id_prefix or f"vpp-{secrets.token_hex(3)}"
        self.base_topic = f"{prefix}/{site_id}"
        self.setpoint_topic = f"{self.base_topic}/setpoint"

        self.sent: deque[dict[str, Any]] = deque(maxlen=history)
        self.acks: deque[dict[str, Any]] = deque(maxlen=history)
        self.schedule_acks: deque[dict[str, Any]] = deque(maxlen=history)
        self.preference_acks: deque[dict[str, Any]] = deque(maxlen=history)
        self.telemetry: deque[dict[str, Any]] = deque(maxlen=history)
        self.events: deque[dict[str, Any]] = deque(maxlen=history)
        self.status: dict[str, Any] | None = None
        self.tracking_errors_kw: list[float] = []
        self.ack_latencies_s: deque[float] = deque(maxlen=history)
        self.acks_accepted = 0
        self.acks_rejected = 0
        self.send_failures = 0
        self.bad_messages = 0

        self._history = history
        self._counter = 0
        self._awaiting_ack: dict[str, float] = {}  # setpoint id -> monotonic send time
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._arrived = asyncio.Event()  # replaced after each message; waiters hold the old one
        self._supervisor: asyncio.Task[None] | None = None

    # -- connection ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def __aenter__(self) -> VppSimulator:
        await self.connect(self.timeout_s)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self, timeout_s: float) -> None:
        """Start the connection task and wait until connected and subscribed.

        Raises ConnectionError if no broker answered within ``timeout_s``.
        """
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._keep_connected(), name=f"vpp-sim {self.client_id}")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            await self.close()
            raise ConnectionError(f"VPP simulator: no MQTT broker answered at {self.host}:{self.port} "
                                  f"within {timeout_s:g} s") from None

    async def close(self) -> None:
        """Disconnect and stop the connection task."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await asyncio.wait_for(self._supervisor, self.timeout_s)
            except (asyncio.CancelledError, TimeoutError):
                pass
            self._supervisor = None

    async def _keep_connected(self) -> None:
        delay_s = 0.2
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, identifier=self.client_id, keepalive=30,
                                          timeout=self.timeout_s, clean_session=True) as client:
                    for leaf in ("telemetry", "setpoint/ack", "schedule/ack", "ev/preferences/ack", "events", "status"):
                        await client.subscribe(f"{self.base_topic}/{leaf}", qos=1)
                    self._client = client
                    self._connected.set()
                    delay_s = 0.2
                    log.info("VPP simulator %s connected to %s:%d", self.client_id, self.host, self.port)
                    async for message in client.messages:
                        self._on_message(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                log.warning("VPP simulator: MQTT connection to %s:%d failed or lost (%s); retrying in ~%.1f s",
                            self.host, self.port, exc, delay_s)
            except Exception:  # a bug must not end the connection task silently: log it, back off, retry
                log.exception("VPP simulator: unexpected error on the MQTT connection; retrying in ~%.1f s", delay_s)
            finally:
                self._client = None
                self._connected.clear()
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.0))
            delay_s = min(delay_s * 2, self.reconnect_max_s)

    # -- sending ------------------------------------------------------------

    async def send_setpoint(
        self,
        activation_kw: float,
        valid_s: float | None = None,
        id: str | None = None,  # noqa: A002 -- named like the payload field
        ts: str | float | None = None,
        expires_at: str | None = None,
    ) -> dict[str, Any]:
        """Publish one setpoint (QoS 1, waits for PUBACK) and return the payload sent.

        Defaults: the next unique id, ``ts`` now, ``valid_s`` the simulator's
        unless ``expires_at`` is given (then only ``expires_at`` is sent, unless
        ``valid_s`` is given too).  Values are sent as given, so a test can send
        a stale ``ts`` or a negative ``valid_s``; for payloads that are not even
        valid JSON use :meth:`send_raw`.  Raises ConnectionError if not
        connected within ``timeout_s`` or if the broker does not acknowledge.
        """
        if id is None:
            self._counter += 1
            id = f"{self.id_prefix}-{self._counter}"  # noqa: A001
        payload: dict[str, Any] = {"id": id, "ts": utc_iso_ms() if ts is None else ts}
        if expires_at is not None:
            payload["expires_at"] = expires_at
        if valid_s is not None or expires_at is None:
            payload["valid_s"] = self.valid_s if valid_s is None else valid_s
        # Rounded to 1 W; "+ 0.0" turns -0.0 (from a ramp through zero) into 0.0.
        payload["activation_kw"] = round(activation_kw, 3) + 0.0 if isinstance(activation_kw, float) else activation_kw
        try:
            data = json.dumps(payload, allow_nan=False)
        except ValueError:
            raise ValueError(f"setpoint {id}: values must be finite for JSON, got {payload}; "
                             "use send_raw for malformed payloads") from None
        self._awaiting_ack[id] = time.monotonic()
        while len(self._awaiting_ack) > self._history:
            del self._awaiting_ack[next(iter(self._awaiting_ack))]
        try:
            await self._publish(self.setpoint_topic, data, f"setpoint {id}")
        except ConnectionError:
            self._awaiting_ack.pop(id, None)
            raise
        self.sent.append(payload)
        log.debug("sent setpoint %s", data)
        return payload

    async def send_schedule(
        self,
        kind: str,
        values: list[Any],
        resolution_s: int,
        start: str | float | None = None,
        id: str | None = None,  # noqa: A002 -- named like the payload field
        ts: str | float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Publish one schedule (docs/schedules.md) and return the payload sent.

        Defaults: the next unique id, ``ts`` now, ``start`` now rounded down to
        the resolution; ``extra`` adds fields (``currency`` for a tariff)."""
        if id is None:
            self._counter += 1
            id = f"{self.id_prefix}-sch-{self._counter}"  # noqa: A001
        now = time.time()
        payload: dict[str, Any] = {
            "id": id, "ts": utc_iso_ms(now) if ts is None else ts, "kind": kind,
            "start": utc_iso_ms(now - now % resolution_s) if start is None else start,
            "resolution_s": resolution_s, "values": values, **extra,
        }
        await self._publish(f"{self.base_topic}/schedule", json.dumps(payload, allow_nan=False), f"schedule {id}")
        return payload

    async def wait_schedule_ack(self, schedule_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """The ack for ``schedule_id`` (already received or the next to arrive); TimeoutError if none."""
        return await self._wait(lambda: next((a for a in self.schedule_acks if a.get("id") == schedule_id), None),
                                timeout_s, f"no ack for schedule {schedule_id!r}")

    async def send_raw(self, payload: bytes | str, leaf: str = "setpoint", qos: int = 1) -> None:
        """Publish ``payload`` as is to ``<prefix>/<site>/<leaf>`` (for malformed-input tests)."""
        await self._publish(f"{self.base_topic}/{leaf}", payload, f"raw message to {leaf}", qos)

    async def _publish(self, topic: str, data: bytes | str, what: str, qos: int = 1) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), self.timeout_s)
        except TimeoutError:
            raise ConnectionError(f"{what} not sent: not connected to {self.host}:{self.port} "
                                  f"within {self.timeout_s:g} s") from None
        client = self._client
        if client is None:
            raise ConnectionError(f"{what} not sent: connection to {self.host}:{self.port} just dropped")
        try:
            await client.publish(topic, data, qos=qos, timeout=self.timeout_s)
        except aiomqtt.MqttError as exc:
            raise ConnectionError(f"{what} not sent to {self.host}:{self.port}: {exc}") from exc

    # -- receiving ----------------------------------------------------------

    def _on_message(self, topic: str, raw: Any) -> None:
        leaf = topic[len(self.base_topic) + 1:]
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
        except (ValueError, TypeError) as exc:
            self.bad_messages += 1
            log.warning("VPP simulator: ignoring bad payload on %s (%s): %.200r", topic, exc, raw)
            return
        if leaf == "setpoint/ack":
            self._on_ack(payload)
        elif leaf == "ev/preferences/ack":
            self.preference_acks.append(payload)
        elif leaf == "schedule/ack":
            self.schedule_acks.append(payload)
            if payload.get("status") == "rejected":
                log.warning("schedule %s rejected: %s", payload.get("id"), payload.get("reason"))
        elif leaf == "telemetry":
            self._on_telemetry(payload)
        elif leaf == "events":
            self.events.append(payload)
            log.info("event %s asset=%s detail=%s", payload.get("type"), payload.get("asset_id"), payload.get("detail"))
        elif leaf == "status":
            self.status = payload
            log.info("gateway status: %s%s", payload.get("state"),
                     f" ({payload['reason']})" if payload.get("reason") else "")
        self._arrived.set()
        self._arrived = asyncio.Event()

    def _on_ack(self, ack: dict[str, Any]) -> None:
        self.acks.append(ack)
        sent_at = self._awaiting_ack.pop(str(ack.get("id")), None)
        latency = ""
        if sent_at is not None:
            self.ack_latencies_s.append(time.monotonic() - sent_at)
            latency = f" after {self.ack_latencies_s[-1] * 1000:.1f} ms"
        if ack.get("status") == "accepted":
            self.acks_accepted += 1
            log.info("setpoint %s accepted (activation %s kW)%s", ack.get("id"), ack.get("activation_kw"), latency)
        else:
            self.acks_rejected += 1
            log.warning("setpoint %s %s: %s%s", ack.get("id"), ack.get("status"), ack.get("reason"), latency)

    def _on_telemetry(self, message: dict[str, Any]) -> None:
        self.telemetry.append(message)
        site = message.get("site")
        if isinstance(site, dict):
            p_kw, setpoint_kw = _number(site.get("p_kw")), _number(site.get("setpoint_kw"))
            if p_kw is not None and setpoint_kw is not None:
                self.tracking_errors_kw.append(abs(p_kw - setpoint_kw))

    async def _wait(self, probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
        try:
            async with asyncio.timeout(timeout_s):
                while (found := probe()) is None:
                    await self._arrived.wait()
                return found
        except TimeoutError:
            raise TimeoutError(f"VPP simulator: {what} within {timeout_s:g} s") from None

    async def wait_ack(self, setpoint_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """The ack for ``setpoint_id`` (already received or the next to arrive); TimeoutError if none."""
        return await self._wait(lambda: next((a for a in self.acks if a.get("id") == setpoint_id), None),
                                timeout_s, f"no ack for setpoint {setpoint_id!r}")

    async def wait_telemetry(self, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """Wait until ``count`` telemetry messages have been received in total; returns them all."""
        return await self._wait(lambda: list(self.telemetry) if len(self.telemetry) >= count else None,
                                timeout_s, f"fewer than {count} telemetry messages")

    async def wait_status(self, state: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """Wait until the latest status payload has ``"state": state``."""
        return await self._wait(lambda: self.status if self.status and self.status.get("state") == state else None,
                                timeout_s, f"gateway status never {state!r}")

    # -- running the pattern --------------------------------------------------

    async def run(self, duration_s: float | None = None, report_s: float | None = None) -> dict[str, Any]:
        """Send the pattern every ``cadence_s`` for ``duration_s`` and return :meth:`summary`.

        Setpoints go out at t = 0, cadence, 2 x cadence ... while t < duration_s
        (ticks missed because a send was slow are skipped, not bunched), then the
        run waits until ``duration_s`` has passed, so late telemetry is counted.
        Without ``duration_s`` a trace runs to its last row, other patterns until
        cancelled.  ``report_s`` logs :meth:`format_report` periodically.
        Connects first if not already connected (ConnectionError after ``timeout_s``).
        """
        if duration_s is not None and _check_finite("duration_s", duration_s) < 0:
            raise ValueError(f"duration_s must not be negative, got {duration_s!r}")
        if report_s is not None:
            _check_finite("report_s", report_s, positive=True)
        if self._supervisor is None:
            async with self:
                return await self.run(duration_s, report_s)
        if duration_s is None and self.pattern.end_s is not None:
            duration_s = self.pattern.end_s + self.cadence_s
        reporter = asyncio.create_task(self._report_every(report_s)) if report_s else None
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        try:
            while duration_s is None or tick * self.cadence_s < duration_s - 1e-9:
                t_s = tick * self.cadence_s
                await asyncio.sleep(max(0.0, start + t_s - loop.time()))
                try:
                    await self.send_setpoint(self.pattern.activation_kw(t_s))
                except ConnectionError as exc:
                    self.send_failures += 1
                    log.warning("%s", exc)
                tick = max(tick + 1, math.ceil((loop.time() - start) / self.cadence_s - 1e-9))
            if duration_s is not None:
                await asyncio.sleep(max(0.0, start + duration_s - loop.time()))
        finally:
            if reporter is not None:
                reporter.cancel()
        return self.summary()

    async def _report_every(self, report_s: float) -> None:
        while True:
            await asyncio.sleep(report_s)
            log.info("%s", self.format_report())

    def tracking_stats(self) -> TrackingStats:
        """Tracking error statistics over every telemetry message received so far."""
        return TrackingStats.of(self.tracking_errors_kw)

    def summary(self) -> dict[str, Any]:
        """Counts and figures so far, JSON-serialisable."""
        latencies_ms = [s * 1000 for s in self.ack_latencies_s]
        return {
            "setpoints_sent": len(self.sent),
            "send_failures": self.send_failures,
            "acks_accepted": self.acks_accepted,
            "acks_rejected": self.acks_rejected,
            "awaiting_ack": len(self._awaiting_ack),
            "ack_latency_ms": {
                "mean": sum(latencies_ms) / len(latencies_ms) if latencies_ms else None,
                "max": max(latencies_ms) if latencies_ms else None,
            },
            "telemetry": len(self.telemetry),
            "events": len(self.events),
            "bad_messages": self.bad_messages,
            "gateway_state": self.status.get("state") if self.status else None,
            "tracking": asdict(self.tracking_stats()),
        }

    def format_report(self) -> str:
        s = self.summary()
        return (f"sent {s['setpoints_sent']} setpoints ({s['send_failures']} failed), "
                f"acks {s['acks_accepted']} accepted / {s['acks_rejected']} rejected, "
                f"{s['telemetry']} telemetry, {s['events']} events; {self.tracking_stats()}")


# -- command line -----------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulators.vpp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--prefix", default="flexedge", help="topic prefix (default flexedge)")
    parser.add_argument("--site", default="demo", help="site id (default demo)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--pattern", choices=["steps", "ramp", "constant"], help="default steps")
    source.add_argument("--trace", type=Path, help="CSV file with columns t_s, activation_kw")
    parser.add_argument("--amplitude-kw", type=float, default=10.0, help="pattern amplitude (default 10)")
    parser.add_argument("--step-s", type=float, default=10.0, help="hold time of each step (default 10)")
    parser.add_argument("--period-s", type=float, default=40.0, help="ramp period (default 40)")
    parser.add_argument("--cadence-s", type=float, default=2.0, help="setpoint interval (default 2)")
    parser.add_argument("--valid-s", type=float, default=10.0, help="validity of each setpoint (default 10)")
    parser.add_argument("--duration-s", type=float, help="stop after this long (default: trace end, or never)")
    parser.add_argument("--report-s", type=float, default=10.0, help="progress report interval, 0 for none")
    parser.add_argument("--client-id", help="MQTT client id (default random)")
    parser.add_argument("--connect-timeout-s", type=float, default=30.0, help="wait this long for the broker")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


async def _main(args: argparse.Namespace) -> int:
    pattern = (TracePattern.from_csv(args.trace) if args.trace
               else make_pattern(args.pattern or "steps", args.amplitude_kw, step_s=args.step_s, period_s=args.period_s))
    vpp = VppSimulator(args.host, args.port, args.prefix, args.site, pattern=pattern, cadence_s=args.cadence_s,
                       valid_s=args.valid_s, client_id=args.client_id)
    connect_timeout_s = _check_finite("--connect-timeout-s", args.connect_timeout_s, positive=True)
    if args.duration_s is not None and _check_finite("--duration-s", args.duration_s) < 0:
        raise ValueError(f"--duration-s must not be negative, got {args.duration_s:g}")
    report_s = _check_finite("--report-s", args.report_s) or None
    if report_s is not None and report_s < 0:
        raise ValueError(f"--report-s must not be negative, got {report_s:g}")
    try:
        await vpp.connect(connect_timeout_s)
        await vpp.run(args.duration_s, report_s=report_s)
    except ConnectionError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    finally:
        await vpp.close()
        print(vpp.format_report(), flush=True)
        print("summary: " + json.dumps(vpp.summary()), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("aiomqtt").setLevel(logging.WARNING)
    try:
        return asyncio.run(_main(args))
    except ValueError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
