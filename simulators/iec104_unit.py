"""Shared core of the IEC 104 unit simulators (``simulators.bess``, ``simulators.p2h``).

Each simulated unit is one station (common address) on a c104 server; units
with the same non-zero port share one server, port 0 gives a unit its own free
port.  The point map is the same template the driver uses
(``profiles/templates``), so raw values, scales and signs match a real point
list of that shape.  Physics runs in one simulator thread every ``tick_s``
(0.1 s); c104 command callbacks run on c104's threads; a per-unit lock guards
the state.  Measured values are sent spontaneously when they change.

``UnitSpec`` fields (ValueError naming the field when invalid)
--------------------------------------------------------------
``kind`` ``"bess"`` | ``"p2h"``; ``template`` (default ``bess-generic`` / ``electric-boiler``);
``port=0``; ``common_address=1``; ``command_mode="direct"`` | ``"select_and_execute"`` (how the
setpoint point accepts commands).  BESS: ``max_charge_kw=100``, ``max_discharge_kw=100``,
``capacity_kwh=200``, ``soc_pct=50``, ``soc_min_pct=0``, ``soc_max_pct=100``.  P2H:
``min_load_kw=50``, ``max_load_kw=500``, ``storage_temp_c=60``, ``storage_temp_max_c=95``,
``heat_capacity_kwh_per_c=10`` (store), ``draw_kw=100`` (heat drawn from the store).
Both: ``ramp_kw_per_s=1000`` (0 = jump).

Unit behaviour (``SimulatedUnit``)
----------------------------------
* Setpoint (``p_setpoint``) in the unit's own convention (BESS + = discharge; P2H + = consume).
  Refused with a negative ACT_CON: outside the ratings (BESS beyond max charge/discharge; P2H
  negative or above max load), in local mode, when faulted.  P2H: an accepted setpoint above 0
  but below the minimum load switches the unit OFF (it is accepted, not refused).
* Power ramps toward the setpoint at ``ramp_kw_per_s``; BESS SoC integrates (100 % efficiency)
  and stops discharge at ``soc_min_pct``, charge at ``soc_max_pct``; available charge/discharge
  power points reflect those limits.  Boiler store temperature rises with heating, falls with
  ``draw_kw``; at ``storage_temp_max_c`` heating stops (load 0) until it cools 2 degC.
* ``set_fault(bool)`` (power drops to 0), ``set_remote(bool)`` (False = local mode).
* ``reply``: ``"positive"`` | ``"negative"`` | ``"none"`` (no ACT_CON at all, for timeout tests);
  ``act_term`` (default True): an accepted direct command is followed by ACT_TERM.
* ``commands``: ``CommandRecord(at, ioa, type, raw, value, cause, accepted)`` for every command.
  ``await unit.wait_command(timeout_s, count=n)`` waits until ``n`` commands were received.
"""

# No "from __future__ import annotations": c104 checks callback annotations as objects, not strings.
import asyncio
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import c104

from drivers.iec104.config import PointSpec, load_template

DEFAULT_TEMPLATES = {"bess": "bess-generic", "p2h": "electric-boiler"}

@dataclass
class UnitSpec:
    kind: str
    template: str | None = None
    port: int = 0
    common_address: int = 1
    command_mode: str = "direct"
    max_charge_kw: float = 100.0
    max_discharge_kw: float = 100.0
    capacity_kwh: float = 200.0
    soc_pct: float = 50.0
    soc_min_pct: float = 0.0
    soc_max_pct: float = 100.0
    min_load_kw: float = 50.0
    max_load_kw: float = 500.0
    storage_temp_c: float = 60.0
    storage_temp_max_c: float = 95.0
    heat_capacity_kwh_per_c: float = 10.0
    draw_kw: float = 100.0
    ramp_kw_per_s: float = 1000.0

    def __post_init__(self):
        if self.kind not in DEFAULT_TEMPLATES:
            raise ValueError(f"kind must be bess or p2h, got {self.kind!r}")
        if self.command_mode not in ("direct", "select_and_execute"):
            raise ValueError(f"command_mode must be direct or select_and_execute, got {self.command_mode!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if not 1 <= self.common_address <= 65534:
            raise ValueError(f"common_address must be 1..65534, got {self.common_address}")
        for name in ("max_charge_kw", "max_discharge_kw", "capacity_kwh", "min_load_kw", "max_load_kw",
                     "heat_capacity_kwh_per_c", "draw_kw", "ramp_kw_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.soc_pct <= 100:
            raise ValueError(f"soc_pct must be 0..100, got {self.soc_pct}")
        if self.min_load_kw > self.max_load_kw:
            raise ValueError(f"min_load_kw ({self.min_load_kw}) must not exceed max_load_kw ({self.max_load_kw})")
        self.template = self.template or DEFAULT_TEMPLATES[self.kind]

@dataclass(frozen=True)
class CommandRecord:
    at: float  # wall time, s since epoch
    ioa: int
    type: str
    raw: float
    value: float  # engineering value in the unit's own convention
    cause: str
    accepted: bool | None  # None: no reply sent

def _server_value(spec: PointSpec, raw: Any):
    if spec.type in ("M_SP_NA_1", "M_SP_TB_1"):
        return bool(raw)
    if spec.type in ("M_DP_NA_1", "M_DP_TB_1"):
        return c104.Double.ON if raw else c104.Double.OFF
    if spec.type in ("M_ME_NB_1", "M_ME_TE_1"):
        return c104.Int16(max(-32768, min(32767, round(raw))))
    if spec.type in ("M_ME_NA_1", "M_ME_TD_1"):
        return c104.NormalizedFloat(max(-1.0, min(0.99996, raw)))
    return float(raw)

class SimulatedUnit:
    def __init__(self, spec: UnitSpec):
        self.spec = spec
        self.points = load_template(spec.template, spec.kind)
        self.port = spec.port
        self.common_address = spec.common_address
        self.lock = threading.Lock()
        self.commands: list[CommandRecord] = []
        self.reply = "positive"
        self.act_term = True
        self.fault = False
        self.remote = True
        self.setpoint_kw = 0.0  # unit convention
        self.power_kw = 0.0  # unit convention: BESS + discharge, P2H + consumption
        self.soc_pct = spec.soc_pct
        self.storage_temp_c = spec.storage_temp_c
        self.heat_blocked = False
        self._station_points: dict[str, c104.Point] = {}
        self._sent: dict[str, Any] = {}
        self._act_terms: list[c104.Point] = []

    # ------------------------------------------------------------ switches

    def set_fault(self, fault: bool) -> None:
        with self.lock:
            self.fault = bool(fault)

    def set_remote(self, remote: bool) -> None:
        with self.lock:
            self.remote = bool(remote)

    async def wait_command(self, timeout_s: float, count: int = 1) -> CommandRecord:
        deadline = time.monotonic() + timeout_s
        while len(self.commands) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"unit CA {self.common_address}: {len(self.commands)} commands after {timeout_s} s, wanted {count}")
            await asyncio.sleep(0.01)
        return self.commands[count - 1]

    # --------------------------------------------------------- server side

    def attach(self, server: c104.Server) -> None:
        station = server.add_station(common_address=self.common_address)
        mode = c104.CommandMode.SELECT_AND_EXECUTE if self.spec.command_mode == "select_and_execute" else c104.CommandMode.DIRECT
        self._station_points = {}
        self._sent = {}
        for signal, spec in self.points.items():
            ptype = getattr(c104.Type, spec.type)
            if spec.type.startswith("C_"):
                point = station.add_point(io_address=spec.ioa, type=ptype, command_mode=mode)
                point.on_receive(callable=self._command_callback(signal, spec))
            else:
                point = station.add_point(io_address=spec.ioa, type=ptype)
            self._station_points[signal] = point
        self.publish(transmit=False)

    def _command_callback(self, signal: str, spec: PointSpec):
        def on_receive(point: c104.Point, previous_info: c104.Information, message: c104.IncomingMessage) -> c104.ResponseState:
            raw = float(int(point.value)) if isinstance(point.value, c104.Int16) else float(point.value)
            value = raw * spec.scale  # unit convention: the unit's own sign
            with self.lock:
                accepted = self._accept(value) if self.reply != "none" else None
                if self.reply == "negative":
                    accepted = False
                if accepted:
                    self.setpoint_kw = 0.0 if self.spec.kind == "p2h" and value < self.spec.min_load_kw else value
                    if self.act_term and self.spec.command_mode == "direct":
                        self._act_terms.append(point)
                self.commands.append(CommandRecord(time.time(), spec.ioa, spec.type, raw, value, message.cot.name, accepted))
            if accepted is None:
                return c104.ResponseState.NONE
            return c104.ResponseState.SUCCESS if accepted else c104.ResponseState.FAILURE

        return on_receive

    def _accept(self, value: float) -> bool:
        if self.fault or not self.remote or not math.isfinite(value):
            return False
        if self.spec.kind == "bess":
            return -self.spec.max_charge_kw <= value <= self.spec.max_discharge_kw
        return 0.0 <= value <= self.spec.max_load_kw

    # ------------------------------------------------------------- physics

    def tick(self, dt_s: float) -> None:
        spec = self.spec
        with self.lock:
            target = 0.0 if self.fault else self.setpoint_kw
            if spec.kind == "bess":
                if self.soc_pct <= spec.soc_min_pct:
                    target = min(target, 0.0)
                if self.soc_pct >= spec.soc_max_pct:
                    target = max(target, 0.0)
            elif "storage_temp" in self.points:
                if self.storage_temp_c >= spec.storage_temp_max_c:
                    self.heat_blocked = True
                elif self.storage_temp_c < spec.storage_temp_max_c - 2.0:
                    self.heat_blocked = False
                if self.heat_blocked:
                    target = 0.0
            step = spec.ramp_kw_per_s * dt_s if spec.ramp_kw_per_s > 0 else math.inf
            self.power_kw += max(-step, min(step, target - self.power_kw))
            if spec.kind == "p2h" and 0 < self.power_kw < spec.min_load_kw and target >= spec.min_load_kw:
                self.power_kw = min(target, spec.min_load_kw)  # starts straight at minimum load
            if spec.kind == "bess" and spec.capacity_kwh > 0:
                self.soc_pct -= self.power_kw * dt_s / 3600.0 / spec.capacity_kwh * 100.0
                if self.soc_pct <= spec.soc_min_pct and self.power_kw > 0:
                    self.soc_pct, self.power_kw = spec.soc_min_pct, 0.0  # the BMS cuts discharge at the limit
                if self.soc_pct >= spec.soc_max_pct and self.power_kw < 0:
                    self.soc_pct, self.power_kw = spec.soc_max_pct, 0.0
                self.soc_pct = max(0.0, min(100.0, self.soc_pct))
            if spec.kind == "p2h" and spec.heat_capacity_kwh_per_c > 0:
                self.storage_temp_c += (self.power_kw - spec.draw_kw) * dt_s / 3600.0 / spec.heat_capacity_kwh_per_c

    def signal_values(self) -> dict[str, Any]:
        """Current values in flexedge convention (what the driver should read)."""
        spec = self.spec
        with self.lock:
            if spec.kind == "bess":
                charge = 0.0 if self.fault or self.soc_pct >= spec.soc_max_pct else spec.max_charge_kw
                discharge = 0.0 if self.fault or self.soc_pct <= spec.soc_min_pct else spec.max_discharge_kw
                values = {"p_measured": self.power_kw, "q_measured": 0.0, "soc": self.soc_pct,
                          "p_charge_available": charge, "p_discharge_available": discharge}
            else:
                values = {"p_measured": -self.power_kw, "min_load": spec.min_load_kw,
                          "storage_temp": self.storage_temp_c}
            values.update(running=abs(self.power_kw) > 0.01, fault=self.fault, remote=self.remote)
        return values

    def publish(self, transmit: bool = True) -> None:
        for signal, value in self.signal_values().items():
            spec = self.points.get(signal)
            point = self._station_points.get(signal)
            if spec is None or point is None:
                continue
            raw = value if isinstance(value, bool) else spec.to_raw(value)
            last = self._sent.get(signal)
            changed = last is None or (raw != last if isinstance(raw, bool) else abs(raw - last) > 1e-3 * max(1.0, abs(raw)))
            if not changed:
                continue
            point.value = _server_value(spec, raw)
            self._sent[signal] = raw
            if transmit:
                point.transmit(cause=c104.Cot.SPONTANEOUS)
        with self.lock:
            terms, self._act_terms = self._act_terms, []
        for point in terms:
            point.transmit(cause=c104.Cot.ACTIVATION_TERMINATION)

class Iec104UnitSimulator:
    """Hosts units on c104 servers and ticks their physics; async context manager."""

    def __init__(self, specs: list[UnitSpec], *, host: str = "127.0.0.1", tick_s: float = 0.1):
        self.host = host
        self.tick_s = tick_s
        self.units = [SimulatedUnit(spec) for spec in specs]
        self.servers: dict[int, c104.Server] = {}
        self._running: dict[int, bool] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server_lock = threading.Lock()

    def start(self) -> None:
        from socket import AF_INET, SOCK_STREAM, socket

        for unit in self.units:
            if unit.port == 0:
                with socket(AF_INET, SOCK_STREAM) as sock:
                    sock.bind((self.host, 0))
                    unit.port = sock.getsockname()[1]
        for unit in self.units:
            if unit.port not in self.servers:
                self.servers[unit.port] = c104.Server(ip=self.host, port=unit.port, tick_rate_ms=50)
            unit.attach(self.servers[unit.port])
        for port, server in self.servers.items():
            server.start()
            self._running[port] = True
        self._thread = threading.Thread(target=self._run, name="iec104-sim-physics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        for server in self.servers.values():
            server.stop()

    def stop_port(self, port: int) -> None:
        """The unit(s) on ``port`` go away (TCP connections close)."""
        with self._server_lock:
            self.servers[port].stop()
            self._running[port] = False

    def start_port(self, port: int, *, lose_setpoint: bool = True) -> None:
        """The unit(s) on ``port`` come back, by default with setpoint and power at 0 (a restart)."""
        with self._server_lock:
            for unit in self.units:
                if unit.port == port and lose_setpoint:
                    with unit.lock:
                        unit.setpoint_kw = unit.power_kw = 0.0
            self.servers[port].start()
            self._running[port] = True

    async def restart(self, port: int, down_s: float = 0.3) -> None:
        await asyncio.to_thread(self.stop_port, port)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.start_port, port)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.tick_s):
            now = time.monotonic()
            dt, last = now - last, now
            with self._server_lock:
                for unit in self.units:
                    unit.tick(dt)
                    if self._running.get(unit.port):
                        unit.publish(transmit=self.servers[unit.port].has_active_connections)

    async def __aenter__(self) -> "Iec104UnitSimulator":
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.stop)

def run_cli(kind: str, argv: list[str] | None = None) -> None:
    import argparse
    import logging

    parser = argparse.ArgumentParser(
        prog=f"python -m simulators.{kind}",
        description=f"Simulated {kind.upper()} unit(s) as IEC 60870-5-104 servers (controlled stations). "
                    "Units get consecutive common addresses on one port, or consecutive ports with --per-port.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=2404, help="TCP port (default 2404)")
    parser.add_argument("--count", type=int, default=1, help="number of units")
    parser.add_argument("--per-port", action="store_true", help="one port per unit (port, port+1, ...), CA 1 each")
    parser.add_argument("--common-address", type=int, default=1, help="common address of the first unit")
    parser.add_argument("--template", default=None, help=f"point-map template (default {DEFAULT_TEMPLATES[kind]})")
    parser.add_argument("--command-mode", choices=("direct", "select_and_execute"), default="direct")
    if kind == "bess":
        parser.add_argument("--max-charge-kw", type=float, default=100.0)
        parser.add_argument("--max-discharge-kw", type=float, default=100.0)
        parser.add_argument("--capacity-kwh", type=float, default=200.0)
        parser.add_argument("--soc-pct", type=float, default=50.0)
    else:
        parser.add_argument("--min-load-kw", type=float, default=50.0)
        parser.add_argument("--max-load-kw", type=float, default=500.0)
        parser.add_argument("--storage-temp-c", type=float, default=60.0)
        parser.add_argument("--storage-temp-max-c", type=float, default=95.0)
        parser.add_argument("--draw-kw", type=float, default=100.0)
    parser.add_argument("--ramp-kw-per-s", type=float, default=1000.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    extra = {k: v for k, v in vars(args).items() if k in UnitSpec.__dataclass_fields__ and k not in ("port", "common_address")}
    specs = []
    for index in range(args.count):
        port = args.port + index if args.per_port else args.port
        ca = args.common_address if args.per_port else args.common_address + index
        specs.append(UnitSpec(kind=kind, port=port, common_address=ca, **extra))
    sim = Iec104UnitSimulator(specs, host=args.host)
    sim.start()
    for unit in sim.units:
        logging.info("%s unit on %s:%d CA %d, template %s", kind, args.host, unit.port, unit.common_address, unit.spec.template)
    seen = [0] * len(sim.units)
    try:
        while True:
            time.sleep(0.5)
            for index, unit in enumerate(sim.units):
                for record in unit.commands[seen[index]:]:
                    logging.info("CA %d command %s IOA %d value %g (%s) accepted=%s", unit.common_address,
                                 record.type, record.ioa, record.value, record.cause, record.accepted)
                seen[index] = len(unit.commands)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
