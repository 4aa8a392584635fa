"""`flexedge probe iec104`: a general interrogation of an IEC 104 station, and the template it fits.

Serves for the units the iec104 driver controls and for a DEIE that is an IEC 104 server.
The gateway connects as the driver does (a c104 client; its blocking calls in threads,
its callbacks handed to the loop), sends one general interrogation (C_IC_NA_1) and prints
every point the station answers with, sorted by IOA; confirmations are read from the raw
frames with the driver's ``apdu.parse``.  Then it compares the points with the point-map
templates of profiles/templates and says which fits best.

``--scan`` interrogates the global common address 65535 instead, which every station of
the connection answers (IEC 60870-5-101/104 broadcast; a station that ignores it is not
found this way: name its address with ``--ca``).  A scan of addresses one by one is not
offered: a station answers an unknown address with a negative confirmation or not at all,
so 65534 addresses would cost up to 65534 timeouts.

Contract with ``flexedge probe``: edge/commission/probe.py.
"""

# No "from __future__ import annotations": c104 checks callback annotations as objects, not strings.
import argparse
import asyncio
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import c104
import yaml

from drivers.registry import seconds_option
from drivers.iec104 import apdu
from edge import resources

from drivers.iec104.config import load_template

HELP = ("Send a general interrogation to an IEC 104 station (a unit, or a DEIE in server role) and print its "
        "points; compare them with the point-map templates.")

DEFAULT_PORT = 2404
GLOBAL_ADDRESS = 65535
TYPE_ID_C_IC_NA_1 = 100
QUIET_AFTER_SCAN_S = 0.5  # a broadcast interrogation is over once no station has spoken for this long
QUALITY_FLAGS = ("Invalid", "NonTopical", "Substituted", "Blocked", "Overflow", "ElapsedTimeInvalid")


# ------------------------------------------------------------------ arguments


def parse_target(text: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\s/]+)(?::(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST[:PORT]")
    port = int(match.group(2) or match.group(4) or DEFAULT_PORT)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} in {text!r} is outside 1..65535")
    return match.group(1) or match.group(3), port


def _common_address(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 65534:
        raise argparse.ArgumentTypeError(f"{text!r} is not a common address (1..65534)")
    return int(text)


_timeout = seconds_option(0.1, 60)


def add_arguments(parser) -> None:
    parser.add_argument("target", type=parse_target, metavar="HOST[:PORT]",
                        help=f"the station's address (port {DEFAULT_PORT} by default)")
    parser.add_argument("--ca", type=_common_address, default=1, help="ASDU common address (default 1)")
    parser.add_argument("--timeout-s", type=_timeout, default=5.0,
                        help="for the connection, and again for the interrogation (default 5)")
    parser.add_argument("--scan", action="store_true",
                        help="interrogate the global address 65535: every station that answers it is listed")


# ------------------------------------------------------------------ the session


@dataclass(frozen=True)
class PointRow:
    common_address: int
    ioa: int
    type: str
    value: Any
    quality: str
    recorded_at: str


class Interrogation:
    """One c104 client, one connection, one general interrogation (see the module doc)."""

    def __init__(self, host: str, port: int, common_address: int, timeout_s: float):
        self.host, self.port, self.common_address, self.timeout_s = host, port, common_address, timeout_s
        self.loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()
        self.state = c104.ConnectionState.CLOSED_AWAIT_OPEN
        self.confirmed: dict[int, bool] = {}  # CA -> positive ACT_CON
        self.terminated: set[int] = set()  # CAs whose ACT_TERM came
        self.last_frame = time.monotonic()
        self._lock = threading.Lock()  # c104 adds points on its thread; rows are read on another
        self.client = None
        self.connection = None

    # c104's threads ---------------------------------------------------------

    def _on_state(self, connection: c104.Connection, state: c104.ConnectionState) -> None:
        self.loop.call_soon_threadsafe(self._set_state, state)

    def _on_raw(self, connection: c104.Connection, data: bytes) -> None:
        head = apdu.parse(data)
        if head is None:
            return
        self.loop.call_soon_threadsafe(self._frame, head)

    def _on_new_station(self, client: c104.Client, connection: c104.Connection, common_address: int) -> None:
        with self._lock:
            if connection.get_station(common_address=common_address) is None:
                connection.add_station(common_address=common_address)

    def _on_new_point(self, client: c104.Client, station: c104.Station, io_address: int, point_type: c104.Type) -> None:
        with self._lock:
            station.add_point(io_address=io_address, type=point_type)

    # the loop ----------------------------------------------------------------

    def _set_state(self, state) -> None:
        self.state = state
        self.changed.set()

    def _frame(self, head: apdu.AsduHead) -> None:
        self.last_frame = time.monotonic()
        if head.type_id == TYPE_ID_C_IC_NA_1:
            if head.cot == apdu.COT_ACT_CON:
                self.confirmed[head.common_address] = not head.negative
            elif head.cot == apdu.COT_ACT_TERM:
                self.terminated.add(head.common_address)
        self.changed.set()

    def _build(self) -> None:
        client = c104.Client(tick_rate_ms=50, command_timeout_ms=int(self.timeout_s * 1000))
        # Init.NONE: STARTDT only; the interrogation is ours, so its confirmations are ours to see.
        connection = client.add_connection(ip=self.host, port=self.port, init=c104.Init.NONE)
        connection.on_state_change(callable=self._on_state)
        connection.on_receive_raw(callable=self._on_raw)
        client.on_new_station(callable=self._on_new_station)
        client.on_new_point(callable=self._on_new_point)
        if self.common_address != GLOBAL_ADDRESS:
            connection.add_station(common_address=self.common_address)
        self.client, self.connection = client, connection

    async def _until(self, done, deadline: float) -> bool:
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.changed.clear()
            try:  # woken by a frame or a state change, and at least every 0.1 s for the quiet period
                async with asyncio.timeout(min(remaining, 0.1)):
                    await self.changed.wait()
            except TimeoutError:
                pass
        return True

    async def run(self) -> str | None:
        """Connect and interrogate; None on success, else one line why not."""
        where = f"{self.host}:{self.port}"
        await asyncio.to_thread(self._build)
        await asyncio.to_thread(self.client.start)
        deadline = time.monotonic() + self.timeout_s
        settled = lambda: self.state in (c104.ConnectionState.OPEN, c104.ConnectionState.CLOSED,  # noqa: E731
                                         c104.ConnectionState.CLOSED_AWAIT_RECONNECT)
        opened = await self._until(settled, time.monotonic() + min(self.timeout_s / 2, 1.0))
        if not opened and self.state == c104.ConnectionState.OPEN_MUTED:
            # As the driver does: c104 2.2.1 now and then leaves a fresh connection muted (no STARTDT).
            await asyncio.to_thread(self.connection.unmute)
        opened = opened or await self._until(settled, deadline)
        if self.state != c104.ConnectionState.OPEN:
            if opened:
                return f"{where} closed the IEC 104 connection before STARTDT was confirmed (not an IEC 104 server?)"
            return f"{where}: no IEC 104 connection (STARTDT) within {self.timeout_s:g} s"
        sent_at = time.monotonic()
        await asyncio.to_thread(self.connection.interrogation, common_address=self.common_address,
                                wait_for_response=False)
        deadline = sent_at + self.timeout_s
        if self.common_address == GLOBAL_ADDRESS:
            # Every station answers for itself: done once they have all finished and gone quiet.
            await self._until(lambda: self.terminated and self.terminated >= set(self.confirmed)
                              and time.monotonic() - self.last_frame >= QUIET_AFTER_SCAN_S, deadline)
            if not self.confirmed:
                return (f"{where}: no station answered the interrogation of the global address {GLOBAL_ADDRESS} "
                        f"within {self.timeout_s:g} s (some ignore it: name one with --ca)")
            return None
        ca = self.common_address
        await self._until(lambda: ca in self.terminated or self.confirmed.get(ca) is False
                          or self.state != c104.ConnectionState.OPEN, deadline)
        if self.state != c104.ConnectionState.OPEN:
            return f"{where} closed the connection during the interrogation of CA {ca}"
        if self.confirmed.get(ca) is False:
            return f"{where} refused the interrogation of CA {ca} (negative confirmation): wrong common address? " \
                   f"(--scan lists the stations)"
        if ca not in self.confirmed:
            return f"{where}: no answer to the interrogation of CA {ca} within {self.timeout_s:g} s " \
                   f"(wrong common address? --scan lists the stations)"
        if ca not in self.terminated:
            self.incomplete = True
        return None

    incomplete = False  # confirmed, but its end (ACT_TERM) did not come in time

    def rows(self) -> list[PointRow]:
        """Blocking (c104 calls): run it in a thread."""
        rows = []
        with self._lock:
            for station in self.connection.stations:
                for point in station.points:
                    rows.append(PointRow(station.common_address, point.io_address, point.type.name,
                                         _value(point.value), _quality(point.quality),
                                         point.recorded_at.isoformat(timespec="milliseconds")
                                         if point.recorded_at is not None else ""))
        return sorted(rows, key=lambda row: (row.common_address, row.ioa))

    async def close(self) -> None:
        if self.client is not None:
            await asyncio.to_thread(self.client.stop)


def _value(value: Any) -> Any:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, c104.Double):
        return value.name.lower()
    if hasattr(value, "get"):  # c104.NormalizedFloat, c104.Int16 ...
        value = value.get()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _quality(quality: Any) -> str:
    if quality is None or quality.is_good():
        return "good"
    return ",".join(flag for flag in QUALITY_FLAGS if quality & getattr(c104.Quality, flag)) or str(quality)


# ------------------------------------------------------------------ templates


@dataclass(frozen=True)
class TemplateMatch:
    name: str
    kind: str | None
    expected: dict[tuple[int, str], str]  # (IOA, type) -> signal, the template's monitored points
    matched: int
    missing: list[str]
    type_differs: list[str]

    @property
    def score(self) -> float:
        return self.matched / len(self.expected) if self.expected else 0.0


def _templates() -> list[tuple[str, str | None, dict[str, dict]]]:
    """(name, kind, points) of every template; only IOA and type are needed, so any template reads."""
    found = []
    for name in resources.template_names():
        try:
            data = yaml.safe_load(resources.template_path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and isinstance(data.get("points"), dict):
            found.append((name, data.get("kind"), data["points"]))
    return found


def match_templates(rows: list[PointRow]) -> list[TemplateMatch]:
    """Each template scored by the share of its monitored points (IOA and type) the station has, best first."""
    seen = {(row.ioa, row.type) for row in rows}
    type_at = {row.ioa: row.type for row in rows}
    matches = []
    for name, kind, points in _templates():
        expected = {(int(spec["ioa"]), str(spec["type"])): signal for signal, spec in points.items()
                    if isinstance(spec, dict) and str(spec.get("type", "")).startswith("M_") and "ioa" in spec}
        missing, differs = [], []
        for (ioa, ptype), signal in sorted(expected.items()):
            if (ioa, ptype) in seen:
                continue
            if ioa in type_at:
                differs.append(f"IOA {ioa} ({signal}) is {type_at[ioa]}, the template says {ptype}")
            else:
                missing.append(f"IOA {ioa} {ptype} ({signal})")
        matches.append(TemplateMatch(name, kind, expected, len(expected) - len(missing) - len(differs),
                                     missing, differs))
    return sorted(matches, key=lambda m: (-m.score, -m.matched, m.name))


# ------------------------------------------------------------------ the command


def _print_rows(report, rows: list[PointRow]) -> None:
    width = max([len(str(row.value)) for row in rows] + [5])
    report.line(f"{'CA':>5} {'IOA':>8}  {'type':<10}  {'value':<{width}}  {'quality':<8} time")
    for row in rows:
        report.line(f"{row.common_address:>5} {row.ioa:>8}  {row.type:<10}  {row.value!s:<{width}}  "
                    f"{row.quality:<8} {row.recorded_at}".rstrip())


def _report_template(report, rows: list[PointRow]) -> TemplateMatch | None:
    matches = [m for m in match_templates(rows) if m.expected]
    best = matches[0] if matches and matches[0].matched else None
    if best is None:
        report.line(f"template  none of profiles/{resources.TEMPLATES}/ has these IOAs: map the signals in the profile "
                    "(assets[].points, docs/drivers/iec104.md)")
        return None
    extra = len({(row.ioa, row.type) for row in rows} - set(best.expected))
    verdict = "matches" if best.score == 1 else "is the closest"
    report.line(f"template  {best.name} {verdict}: {best.matched} of {len(best.expected)} monitored points "
                f"(IOA and type) found, {extra} other point{'s' if extra != 1 else ''}")
    for problem in best.type_differs + [f"missing {text}" for text in best.missing]:
        report.line(f"          {problem}")
    commands = [f"{signal} IOA {spec['ioa']} {spec['type']}" for name, _, points in _templates() if name == best.name
                for signal, spec in points.items() if str(spec.get("type", "")).startswith("C_")]
    if commands:
        report.line(f"          not in an interrogation, check against the point list: {'; '.join(commands)}")
    return best


def _fragment(report, args, ca: int, rows: list[PointRow], best: TemplateMatch) -> None:
    if best.kind not in ("bess", "p2h"):
        report.line(f"          ({best.name} is not a unit's template: no asset fragment; the DEIE goes in "
                    "grid.deie, docs/deie.md)")
        return
    host, port = args.target
    asset: dict[str, Any] = {"id": f"{best.kind}-ca{ca}", "kind": best.kind, "driver": "iec104", "host": host,
                             "port": port, "common_address": ca, "template": best.name}
    # The available powers the battery reports now are a floor of its ratings: a start, to be checked.
    values = {(row.ioa, row.type): row.value for row in rows if row.common_address == ca}
    check_with: dict[str, Any] = {}
    needed = {"bess": {"max_charge_kw": "p_charge_available", "max_discharge_kw": "p_discharge_available"},
              "p2h": {"max_load_kw": None}}[best.kind]
    specs = load_template(best.name)
    for key, signal in needed.items():
        spec = specs.get(signal) if signal else None
        try:
            kw = spec.to_flexedge(float(values[(spec.ioa, spec.type)])) if spec is not None else None
        except (KeyError, ValueError):
            kw = None
        if kw is not None and kw > 0:
            asset[key] = round(kw, 3)
            report.line(f"          {key} {kw:g} from {signal} now: check it against the nameplate")
        else:
            check_with[key] = 1.0
    report.fragment({"assets": [asset]}, check_with or None)


async def probe(args, report) -> int:
    host, port = args.target
    problem = await report.tcp_unreachable(host, port, args.timeout_s)
    if problem is not None:
        report.fail(problem)
        return 0
    ca = GLOBAL_ADDRESS if args.scan else args.ca
    session = Interrogation(host, port, ca, args.timeout_s)
    started = time.monotonic()
    try:
        problem = await session.run()
        rows = await asyncio.to_thread(session.rows) if problem is None else []
    finally:
        await session.close()
    if problem is not None:
        report.fail(problem)
        return 0
    stations = sorted({row.common_address for row in rows} | {c for c, ok in session.confirmed.items() if ok})
    took = time.monotonic() - started
    what = f"general interrogation of {'the global address' if args.scan else 'CA'} {ca}"
    report.line(f"station   {host}:{port}, {what}: {len(stations)} station{'s' if len(stations) != 1 else ''} "
                f"({', '.join(f'CA {c}' for c in stations)}), {len(rows)} points in {took:.2f} s"
                + (" (not terminated: ACT_TERM missing)" if session.incomplete else ""))
    if not rows:
        report.line("          the station confirmed the interrogation but sent no point")
    else:
        _print_rows(report, rows)
    for station in stations:
        station_rows = [row for row in rows if row.common_address == station]
        if not station_rows:
            continue
        if len(stations) > 1:
            report.line(f"CA {station}")
        best = _report_template(report, station_rows)
        if best is not None and best.score >= 0.5:
            _fragment(report, args, station, station_rows, best)
    return len(stations)
