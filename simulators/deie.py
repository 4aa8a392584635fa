"""Simulated grid operator's side of a DEIE link (IEC 60870-5-104 client, c104).

It connects to a gateway whose ``grid.deie`` runs in the server role, sends
orders, checks each confirmation (ACT_CON positive or negative, or none before
the timeout) and records the measurements the gateway reports.

CLI::

    python -m simulators.deie --port 2404 --script "limit:50@5,disconnect@15,reconnect@25,limit:none@30"
    python -m simulators.deie --port 2404 --interactive     # commands on stdin, "help" lists them

Script steps are ``<command>@<seconds from start>``; commands: ``limit:<value|none>``
(value in the gateway's limit unit, kW or %), ``q:<kvar>``, ``tanphi:<x>``,
``disconnect``, ``reconnect``, ``raw:<ioa>:<type>:<value>``.

In-process API (for tests)::

    async with DeieOperator(port=port, points=cfg.point_map()) as operator:
        assert await operator.send_limit_kw(50) is Confirmation.POSITIVE
        m = await operator.wait_measurement("p_limit_applied", lambda v: v is True)

``send_*`` return a ``Confirmation``; ``measurements`` maps a report signal to
its latest ``Measurement``; ``history`` lists every measurement received.
"""

# No `from __future__ import annotations`: c104 checks callback annotations as objects.

import argparse
import asyncio
import enum
import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import c104

from drivers.deie.config import ORDER_SIGNALS, DeiePoint, load_template

ACT_CON = 7
C_CS_NA_1 = 103


class Confirmation(enum.Enum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Measurement:
    signal: str
    ioa: int
    value: float | bool | str  # flexedge units; bool for single points; "ON"/"OFF"... for double points
    cot: str  # e.g. "SPONTANEOUS", "PERIODIC", "INTERROGATED_BY_STATION"
    received_at: float  # monotonic s


class DeieOperator:
    """Async context manager: an IEC 104 client playing the grid operator."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2404, common_address: int = 1,
                 points: dict[str, DeiePoint] | None = None, command_timeout_s: float = 2.0,
                 connect_timeout_s: float = 5.0):
        self.host, self.port, self.common_address = host, port, common_address
        self.points = points if points is not None else load_template("deie")
        self.command_timeout_s = command_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.measurements: dict[str, Measurement] = {}
        self.history: list[Measurement] = []
        self.on_measurement: Callable[[Measurement], None] | None = None
        self._signal_of = {spec.ioa: signal for signal, spec in self.points.items()}
        self._act_con: dict[tuple[int, int], tuple[bool, float]] = {}  # (type id, ioa) -> (negative, t)
        self._act_con_lock = threading.Lock()
        self._initialised = threading.Event()  # set from c104's thread
        self._states: list[str] = []  # connection state history, for diagnostics
        self._point_locks: dict[int, asyncio.Lock] = {}
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = self._connection = self._station = None

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self):
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._start)
        deadline = time.monotonic() + self.connect_timeout_s
        muted_since: float | None = None
        while not (self.connected and self._initialised.is_set()):
            if self._connection.state == c104.ConnectionState.OPEN_MUTED:
                muted_since = muted_since or time.monotonic()
                if time.monotonic() - muted_since > 0.3:
                    # c104 2.2.1 now and then leaves a fresh connection muted (no STARTDT sent):
                    # start it and run the Init.ALL steps ourselves
                    await asyncio.to_thread(self._unmute_and_init)
                    muted_since = None
            if time.monotonic() > deadline:
                await self.close()
                state = self._connection.state.name if self._connection is not None else "none"
                raise ConnectionError(f"DEIE simulator: no IEC 104 link to {self.host}:{self.port} "
                                      f"within {self.connect_timeout_s:g} s (connection {state}, "
                                      f"initialised {self._initialised.is_set()}, states {self._states})")
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.stop)

    def _unmute_and_init(self) -> None:
        if self._connection.unmute():
            self._connection.interrogation(common_address=self.common_address)
            self._connection.clock_sync(common_address=self.common_address)

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.state == c104.ConnectionState.OPEN

    def _start(self) -> None:
        self._client = c104.Client(tick_rate_ms=50, command_timeout_ms=int(self.command_timeout_s * 1000))
        self._connection = self._client.add_connection(ip=self.host, port=self.port, init=c104.Init.ALL)
        self._connection.on_receive_raw(callable=self._on_raw)
        self._connection.on_state_change(callable=self._on_state)
        self._station = self._connection.add_station(common_address=self.common_address)
        for signal, spec in self.points.items():
            point = self._station.add_point(io_address=spec.ioa, type=getattr(c104.Type, spec.type))
            if signal not in ORDER_SIGNALS:
                point.on_receive(callable=self._on_report)
        self._client.start()

    # ------------------------------------------------------------ c104 callbacks (its threads)

    def _on_state(self, connection: c104.Connection, state: c104.ConnectionState) -> None:
        self._states.append(state.name)

    def _on_raw(self, connection: c104.Connection, data: bytes) -> None:
        # I-format APDU: 68 len ctrl*4 | type vsq cot(2) ca(2) ioa(3): negative ACT_CON has P/N set
        if len(data) >= 15 and data[2] & 1 == 0 and data[6] == C_CS_NA_1 and data[8] & 0x3F == ACT_CON:
            self._initialised.set()  # clock sync is the last step of c104's Init.ALL (after GI)
        if len(data) >= 15 and data[2] & 1 == 0 and data[8] & 0x3F == ACT_CON:
            ioa = data[12] | data[13] << 8 | data[14] << 16
            with self._act_con_lock:
                self._act_con[(data[6], ioa)] = (bool(data[8] & 0x40), time.monotonic())

    def _on_report(self, point: c104.Point, previous_info: c104.Information,
                   message: c104.IncomingMessage) -> c104.ResponseState:
        signal = self._signal_of.get(point.io_address, f"ioa{point.io_address}")
        value = point.value
        if isinstance(value, c104.Double):
            value = value.name
        elif isinstance(value, float):
            value = value * self.points[signal].scale if signal in self.points else value
        m = Measurement(signal, point.io_address, value, message.cot.name, time.monotonic())
        self._loop.call_soon_threadsafe(self._record, m)
        return c104.ResponseState.NONE

    def _record(self, m: Measurement) -> None:
        self.measurements[m.signal] = m
        self.history.append(m)
        self._changed.set()
        if self.on_measurement is not None:
            self.on_measurement(m)

    # ------------------------------------------------------------ orders

    async def send_limit(self, value: float | None) -> Confirmation:
        """Active-power limit in the gateway's limit unit; None lifts it (p_limit_end ON)."""
        if value is None:
            return await self.send_signal("p_limit_end", True)
        return await self.send_signal("p_limit", value)

    async def send_limit_kw(self, value_kw: float | None) -> Confirmation:
        """For a gateway with ``limit_unit: kw``."""
        return await self.send_limit(value_kw)

    async def send_limit_pct(self, value_pct: float | None) -> Confirmation:
        """For a gateway with ``limit_unit: pct``."""
        return await self.send_limit(value_pct)

    async def send_q_kvar(self, value_kvar: float) -> Confirmation:
        return await self.send_signal("q_setpoint", value_kvar)

    async def send_tan_phi(self, value: float) -> Confirmation:
        return await self.send_signal("tan_phi_setpoint", value)

    async def send_disconnect(self) -> Confirmation:
        return await self.send_signal("disconnect", True)

    async def send_reconnect(self) -> Confirmation:
        return await self.send_signal("disconnect", False)

    async def send_signal(self, signal: str, value: Any) -> Confirmation:
        """Send ``value`` (flexedge units) to the order point ``signal`` of the point map."""
        spec = self.points[signal]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = value / spec.scale
        return await self.send_raw(spec.ioa, spec.type, value)

    async def send_raw(self, ioa: int, type: str, value: Any) -> Confirmation:
        """Send one command as it is: ``value`` a float (C_SE_*), a bool (C_SC_NA_1), or for
        C_DC_NA_1 a bool or a ``c104.Double`` name ("ON", "OFF", "INTERMEDIATE", "INDETERMINATE")."""
        kind = getattr(c104.Type, type)
        point = self._station.get_point(io_address=ioa)
        if point is None:
            point = self._station.add_point(io_address=ioa, type=kind)
        elif point.type != kind:
            raise ValueError(f"IOA {ioa} is a {point.type.name} point in the map, not {type}")
        lock = self._point_locks.setdefault(ioa, asyncio.Lock())  # one command in flight per point
        async with lock:
            started = time.monotonic()
            ok = await asyncio.to_thread(_transmit, point, _c104_value(type, value))
            # The ACT_CON frame decides, not transmit()'s answer: c104 2.2.1 can miss a
            # confirmation and hand the next one to the wrong call (docs/drivers/iec104.md).
            for _ in range(20):  # the raw callback may trail transmit() by a moment
                with self._act_con_lock:
                    negative, at = self._act_con.get((int(kind), ioa), (False, 0.0))
                if at >= started:
                    return Confirmation.NEGATIVE if negative else Confirmation.POSITIVE
                await asyncio.sleep(0.01)
            return Confirmation.POSITIVE if ok else Confirmation.TIMEOUT

    async def wait_measurement(self, signal: str, predicate: Callable[[Any], bool] = lambda value: True,
                               timeout_s: float = 3.0, after: float | None = None) -> Measurement:
        """The first measurement of ``signal`` (received at or after ``after``, monotonic) whose value
        satisfies ``predicate``; TimeoutError after ``timeout_s``."""
        async def scan() -> Measurement:
            seen = 0
            while True:
                for m in self.history[seen:]:
                    if m.signal == signal and (after is None or m.received_at >= after) and predicate(m.value):
                        return m
                seen = len(self.history)
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(scan(), timeout_s)


def _transmit(point: c104.Point, value: Any) -> bool:
    point.value = value
    return point.transmit(cause=c104.Cot.ACTIVATION)


def _c104_value(type: str, value: Any) -> Any:
    if type.startswith("C_DC"):
        if isinstance(value, bool):
            return c104.Double.ON if value else c104.Double.OFF
        return getattr(c104.Double, str(value))
    if type.startswith("C_SC"):
        return bool(value)
    return float(value)


# ------------------------------------------------------------------ CLI

SCRIPT_HELP = "limit:<value|none>, q:<kvar>, tanphi:<x>, disconnect, reconnect, raw:<ioa>:<type>:<value>"


def parse_step(text: str) -> tuple[str, list[str]]:
    """``"limit:50"`` -> ("limit", ["50"]); raises ValueError naming the bad step."""
    name, *args = text.strip().split(":")
    arity = {"limit": 1, "q": 1, "tanphi": 1, "disconnect": 0, "reconnect": 0, "raw": 3}
    if name not in arity or len(args) != arity[name]:
        raise ValueError(f"bad command {text!r} (use {SCRIPT_HELP})")
    return name, args


def parse_script(script: str) -> list[tuple[float, str, list[str]]]:
    steps = []
    for item in filter(None, (s.strip() for s in script.split(","))):
        command, sep, at = item.rpartition("@")
        if not sep:
            raise ValueError(f"script step {item!r} lacks '@<seconds>'")
        try:
            at_s = float(at)
        except ValueError:
            raise ValueError(f"script step {item!r}: {at!r} is not a number of seconds") from None
        if not math.isfinite(at_s) or at_s < 0:
            raise ValueError(f"script step {item!r}: time must be >= 0 s")
        steps.append((at_s, *parse_step(command)))
    return sorted(steps, key=lambda step: step[0])


async def run_command(operator: DeieOperator, name: str, args: list[str]) -> Confirmation:
    if name == "limit":
        return await operator.send_limit(None if args[0].lower() == "none" else float(args[0]))
    if name == "q":
        return await operator.send_q_kvar(float(args[0]))
    if name == "tanphi":
        return await operator.send_tan_phi(float(args[0]))
    if name == "disconnect":
        return await operator.send_disconnect()
    if name == "reconnect":
        return await operator.send_reconnect()
    ioa, kind, value = args
    parsed: Any = value if kind.startswith("C_DC") else (value.lower() in ("1", "true", "on") if kind.startswith("C_SC") else float(value))
    return await operator.send_raw(int(ioa), kind, parsed)


async def _main(ns: argparse.Namespace) -> int:
    steps = parse_script(ns.script) if ns.script else []
    async with DeieOperator(ns.host, ns.port, ns.common_address, load_template(ns.template),
                            command_timeout_s=ns.command_timeout_s) as operator:
        operator.on_measurement = lambda m: print(f"  <- {m.signal} = {m.value} ({m.cot})", flush=True)
        print(f"connected to {ns.host}:{ns.port}", flush=True)
        t0 = time.monotonic()
        for at_s, name, args in steps:
            await asyncio.sleep(max(0.0, t0 + at_s - time.monotonic()))
            result = await run_command(operator, name, args)
            print(f"-> {name} {' '.join(args)}: {result.value}", flush=True)
        if ns.interactive:
            while True:
                line = await asyncio.to_thread(sys.stdin.readline)
                if not line or line.strip() in ("quit", "exit"):
                    break
                if not line.strip() or line.strip() == "help":
                    print(f"commands: {SCRIPT_HELP}, quit", flush=True)
                    continue
                try:
                    name, args = parse_step(line.strip().replace(" ", ":"))
                    print(f"-> {line.strip()}: {(await run_command(operator, name, args)).value}", flush=True)
                except (ValueError, AttributeError) as exc:
                    print(f"error: {exc}", flush=True)
        else:
            await asyncio.sleep(ns.linger_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.deie", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=2404, help="gateway IEC 104 port (default 2404)")
    parser.add_argument("--common-address", type=int, default=1)
    parser.add_argument("--template", default="deie", help="point-list template (profiles/templates)")
    parser.add_argument("--script", help=f"comma-separated <command>@<s>; commands: {SCRIPT_HELP}")
    parser.add_argument("--interactive", action="store_true", help="read commands from stdin after the script")
    parser.add_argument("--linger-s", type=float, default=3.0, help="time to keep printing reports after the script")
    parser.add_argument("--command-timeout-s", type=float, default=2.0)
    ns = parser.parse_args(argv)
    try:
        if ns.script:
            parse_script(ns.script)
        return asyncio.run(_main(ns))
    except (ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
