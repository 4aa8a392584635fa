"""`flexedge probe sunspec`: what a SunSpec Modbus device is and what the driver would do with it.

Uses the driver's own pieces, so what it prints is what ``flexedge run`` would find: the
shared link (``drivers.sunspec.link``), the map walk (``discovery.discover``), the codec
(``codec.layout_for``, ``ModelBlock``), the control path (``control.choose_path``,
``choose_var_path``), the ratings and the live reading (``measure.device_ratings``,
``build_reading``).  The module's contract with ``flexedge probe`` is in
edge/commission/probe.py; the output is shown in docs/cli.md.

Bounds: every request by ``--timeout-s``; a ``--scan`` covers at most 247 unit ids, one
after another on one connection (a serial bus and most data managers serve one request at a
time), within an overall deadline printed before it starts.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from drivers.sunspec.codec import ModelBlock, layout_for
from drivers.sunspec.config import Serial, SunSpecAsset
from drivers.sunspec.control import choose_path, choose_var_path
from drivers.registry import seconds_option
from drivers.sunspec.discovery import AUTO_BASES, ModelMap, NotSunSpec, discover, plan_reads
from drivers.sunspec.driver import COMMON_MODEL, POLLED_MODELS
from drivers.sunspec.link import DeviceRejected, LinkFailure, ModbusLink
from drivers.sunspec.measure import INVERTER_MODELS, METER_MODELS, build_reading, device_ratings

HELP = ("Look at a SunSpec Modbus device (TCP or RTU): identity, model chain, the control path the driver would "
        "use, ratings and live values; or scan a range of unit ids.")

MAX_UNIT_ID = 247
DEFAULT_TCP_PORT = 502
STORAGE_MODELS = (124, 713, 802, 803, 804)
# Read beyond what the driver polls: the identity and the storage nameplate (713).
READ_MODELS = frozenset({COMMON_MODEL, 713}).union(*POLLED_MODELS.values())
# The device's own figures, as stated (model, point, unit).
RATING_POINTS = (
    (120, "WRtg", "W"), (120, "VARtg", "VA"), (120, "VArRtgQ1", "var"), (120, "VArRtgQ4", "var"),
    (120, "ARtg", "A"), (120, "WHRtg", "Wh"), (120, "MaxChaRte", "W"), (120, "MaxDisChaRte", "W"),
    (121, "WMax", "W"), (702, "WMaxRtg", "W"), (702, "WMax", "W"), (702, "VAMaxRtg", "VA"),
    (702, "VarMaxInjRtg", "var"), (702, "VarMaxAbsRtg", "var"), (702, "WChaRteMaxRtg", "W"),
    (702, "WDisChaRteMaxRtg", "W"), (124, "WChaMax", "W"), (713, "WHRtg", "Wh"), (713, "WHAvail", "Wh"),
    (802, "WHRtg", "Wh"),
)
IDENTITY_POINTS = {"manufacturer": "Mn", "model": "Md", "serial": "SN", "version": "Vr"}
_REQUEST_PREFIX = re.compile(r"^(read|write) \d+ registers at \d+: ")


# ------------------------------------------------------------------ arguments


@dataclass(frozen=True)
class Target:
    host: str | None = None
    port: int = DEFAULT_TCP_PORT
    serial_port: str | None = None

    def __str__(self) -> str:
        return self.serial_port if self.serial_port else f"{self.host}:{self.port}"


def parse_target(text: str) -> Target:
    """``HOST``, ``HOST:PORT``, ``[IPv6]:PORT`` or a serial port path (``/dev/...``, ``COMn``)."""
    import argparse

    text = text.strip()
    if text.startswith("/") or re.fullmatch(r"(?i)com\d+", text):
        return Target(serial_port=text)
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\s]+)(?::(\d+))?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is neither HOST[:PORT] nor a serial port path (/dev/...)")
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    port = int(port_text) if port_text else DEFAULT_TCP_PORT
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} in {text!r} is outside 1..65535")
    return Target(host=host, port=port)


def parse_unit_range(text: str) -> range:
    """``A-B`` (or one id): unit ids within 1..247."""
    import argparse

    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a unit id range such as 1-10")
    first, last = int(match.group(1)), int(match.group(2) or match.group(1))
    if not 1 <= first <= last <= MAX_UNIT_ID:
        raise argparse.ArgumentTypeError(f"{text!r}: unit ids go from 1 to {MAX_UNIT_ID}, first <= last")
    return range(first, last + 1)


def _unit_id(text: str) -> int:
    import argparse

    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_UNIT_ID:
        raise argparse.ArgumentTypeError(f"{text!r} is not a unit id (1..{MAX_UNIT_ID}; --scan takes a range)")
    return int(text)


_timeout = seconds_option(0.05, 30)


def add_arguments(parser) -> None:
    serial_defaults = {name: Serial.model_fields[name].default for name in Serial.LINE_KEYS}
    parser.add_argument("target", type=parse_target, metavar="HOST[:PORT]|SERIAL_PORT",
                        help=f"Modbus TCP address (port {DEFAULT_TCP_PORT} by default) or serial port (Modbus RTU)")
    parser.add_argument("--unit", type=_unit_id, default=1, help="Modbus unit id (default 1)")
    parser.add_argument("--timeout-s", type=_timeout, default=2.0, help="timeout of each request (default 2)")
    parser.add_argument("--base-address", choices=["auto", "0", "40000", "50000"], default="auto",
                        help="where the SunSpec map starts; auto tries 40000, 0, 50000 (default)")
    parser.add_argument("--kind", choices=["pv", "bess", "meter"],
                        help="asset kind the control path is chosen for (default: from the models)")
    parser.add_argument("--scan", type=parse_unit_range, metavar="FIRST-LAST",
                        help=f"try each unit id of the range (at most {MAX_UNIT_ID}) once; one line per device found")
    serial = parser.add_argument_group("serial line (Modbus RTU); defaults as in the profile")
    serial.add_argument("--baudrate", type=int, default=serial_defaults["baudrate"],
                        choices=[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200])
    serial.add_argument("--parity", choices=["N", "E", "O"], default=serial_defaults["parity"])
    serial.add_argument("--bytesize", type=int, choices=[7, 8], default=serial_defaults["bytesize"])
    serial.add_argument("--stopbits", type=int, choices=[1, 2], default=serial_defaults["stopbits"])


def _asset(args, unit_id: int, kind: str = "pv") -> SunSpecAsset:
    target: Target = args.target
    fields: dict[str, Any] = dict(id="probe", kind=kind, driver="sunspec", unit_id=unit_id, timeout_s=args.timeout_s)
    if target.serial_port:
        fields["serial"] = {"port": target.serial_port, "baudrate": args.baudrate, "parity": args.parity,
                            "bytesize": args.bytesize, "stopbits": args.stopbits}
    else:
        fields.update(host=target.host, port=target.port)
    return SunSpecAsset(**fields)


def _bases(args) -> tuple[int, ...]:
    return AUTO_BASES if args.base_address == "auto" else (int(args.base_address),)


# ------------------------------------------------------------------ looking


@dataclass
class Device:
    """What one unit showed: its map, the blocks read, and the reads it refused."""

    unit_id: int
    model_map: ModelMap
    blocks: dict[int, ModelBlock] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    @property
    def identity(self) -> dict[str, str]:
        block = self.blocks.get(COMMON_MODEL)
        if block is None:
            return {}
        return {key: text for key, point in IDENTITY_POINTS.items() if (text := block.text(point))}


def infer_kind(model_ids) -> str:
    """Storage models make a battery, meter models alone a meter; anything else is taken for PV."""
    ids = set(model_ids)
    if ids & set(STORAGE_MODELS):
        return "bess"
    if ids & set(METER_MODELS) and not ids & set(INVERTER_MODELS + (701,)):
        return "meter"
    return "pv"


async def examine(link: ModbusLink, bases: tuple[int, ...], wanted=READ_MODELS) -> Device:
    """Walk the map and read the models in ``wanted``; LinkFailure or NotSunSpec as ``discover``."""
    model_map = await discover(link.read, bases)
    device = Device(link.unit_id, model_map)
    for entry in model_map.models:
        if entry.model_id not in wanted or entry.model_id in device.blocks:
            continue
        layout = layout_for(entry.model_id, entry.length)
        if layout is None:
            continue
        registers: list[int] = []
        try:
            for span in plan_reads([(entry.address, entry.length + 2)]):
                registers += await link.read(span.address, span.count)
        except DeviceRejected as error:
            device.refused.append(f"model {entry.model_id}: {error}")
            continue
        device.blocks[entry.model_id] = ModelBlock(layout, registers, entry.address)
    return device


async def reachable(report, target: Target, timeout_s: float) -> str | None:
    """None when the endpoint can be opened; else one line saying why not."""
    if target.serial_port:
        if not os.path.exists(target.serial_port):
            return f"serial port {target.serial_port} does not exist"
        if not os.access(target.serial_port, os.R_OK | os.W_OK):
            return f"serial port {target.serial_port}: permission denied (is this user in the dialout group?)"
        return None
    return await report.tcp_unreachable(target.host, target.port, timeout_s)


def _why(error: Exception) -> str:
    return _REQUEST_PREFIX.sub("", str(error))


# ------------------------------------------------------------------ printing


def _number(value: float, unit: str) -> str:
    if unit in ("W", "VA", "var", "Wh") and abs(value) >= 1000:
        return f"{value / 1000:g} k{unit}"
    return f"{value:g} {unit}"


def _rating_lines(device: Device, kind: str) -> list[str]:
    lines = [f"{key} {rating.power_kw:g} kW ({rating.source})" for key, rating in device_ratings(kind, device.blocks).items()]
    stated = []
    for model_id, point, unit in RATING_POINTS:
        block = device.blocks.get(model_id)
        try:
            value = block.value(point) if block is not None else None
        except ValueError:
            value = None
        if value is not None:
            stated.append(f"{model_id} {point} {_number(value, unit)}")
    for start in range(0, len(stated), 4):
        lines.append(", ".join(stated[start:start + 4]))
    return lines or ["none stated"]


def _live_line(device: Device, asset: SunSpecAsset, path, var_path) -> str:
    reading = build_reading(asset, device.blocks, path, time.time(), var_path)
    parts = [f"P {reading.p_kw:.3f} kW" if reading.p_kw is not None else "P -",
             f"Q {reading.q_kvar:.3f} kvar" if reading.q_kvar is not None else "Q -",
             f"U {reading.voltage_v:.1f} V" if reading.voltage_v is not None else "U -",
             f"f {reading.frequency_hz:.2f} Hz" if reading.frequency_hz is not None else "f -"]
    if reading.soc_pct is not None:
        parts.append(f"SoC {reading.soc_pct:.1f} %")
    text = ", ".join(parts) + " (+ export)"
    if reading.detail:
        text += f"; {reading.detail}"
    return text


def _section(report, title: str, lines: list[str]) -> None:
    for index, line in enumerate(lines):
        report.line(f"{title if index == 0 else '':<10}{line}")


def _print_device(report, args, device: Device, kind: str, kind_given: bool) -> None:
    asset = _asset(args, device.unit_id, kind)
    model_map = device.model_map
    link_text = f"rtu {args.target} {args.baudrate} {args.bytesize}{args.parity}{args.stopbits}" \
        if args.target.serial_port else f"tcp {args.target}"
    _section(report, "device", [f"{link_text} unit {device.unit_id}, SunSpec map at {model_map.base_address}, "
                                f"{len(model_map.models)} models"
                                + ("" if model_map.end_marker else " (no end marker)")])
    identity = device.identity
    _section(report, "identity", [", ".join(f"{key} {value}" for key, value in identity.items()) or "no model 1"])
    rows = [f"{'id':>5}  {'name':<24}{'address':>8}{'length':>8}"]
    for entry in model_map.models:
        layout = layout_for(entry.model_id, entry.length)
        name = layout.name if layout is not None else "(no definition)"
        rows.append(f"{entry.model_id:>5}  {name[:23]:<24}{entry.address:>8}{entry.length:>8}")
    _section(report, "models", rows)
    path, var_path = choose_path(kind, device.blocks), choose_var_path(kind, device.blocks)
    origin = "as given" if kind_given else "from the models; --kind to change"
    control = [f"kind {kind} ({origin})",
               f"{'active power':<16}{path or 'none (no usable 704, 123 or 124 model)'}",
               f"{'reactive power':<16}{var_path or 'none (no 704 VarSet)'}"]
    _section(report, "control", control)
    _section(report, "ratings", _rating_lines(device, kind))
    _section(report, "live", [_live_line(device, asset, path, var_path)])
    for refusal in device.refused:
        report.line(f"{'note':<10}{refusal}")


def _fragment_asset(args, device: Device, kind: str) -> dict[str, Any]:
    asset: dict[str, Any] = {"id": f"{kind}-{device.unit_id}", "kind": kind, "driver": "sunspec"}
    if args.target.serial_port:
        asset["serial"] = {"port": args.target.serial_port, "baudrate": args.baudrate, "parity": args.parity,
                           "bytesize": args.bytesize, "stopbits": args.stopbits}
    else:
        asset.update(host=args.target.host, port=args.target.port)
    asset.update(unit_id=device.unit_id, base_address=device.model_map.base_address)
    return asset


# ------------------------------------------------------------------ commands


async def probe(args, report) -> int:
    problem = await reachable(report, args.target, args.timeout_s)
    if problem is not None:
        report.fail(problem)
        return 0
    if args.scan is not None:
        return await scan(args, report)
    link = ModbusLink(_asset(args, args.unit))
    where = f"{args.target} unit {args.unit}"
    try:
        await link.connect()
        device = await examine(link, _bases(args))
    except NotSunSpec:
        report.fail(f"{where} answered but has no SunSpec marker at {_listed(_bases(args))}")
        return 0
    except LinkFailure as error:
        why = _why(error)
        if why.endswith(" lost"):
            why += " at the first request (is it a Modbus TCP device?)"
        report.fail(why)
        return 0
    finally:
        link.close()
    kind = args.kind or infer_kind(device.model_map.model_ids)
    _print_device(report, args, device, kind, args.kind is not None)
    report.fragment({"assets": [_fragment_asset(args, device, kind)]})
    return 1


def _listed(bases: tuple[int, ...]) -> str:
    text = [str(base) for base in bases]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


async def scan(args, report) -> int:
    units: range = args.scan
    # A failed unit costs one timeout; a device that answers, a few quick reads more.
    deadline_s = len(units) * (args.timeout_s + 0.5) + 5.0
    report.line(f"scanning unit ids {units[0]}-{units[-1]} on {args.target}: {args.timeout_s:g} s per silent unit, "
                f"done within {deadline_s:g} s")
    # A handle with unit id 0 (broadcast, never asked anything) holds the link open for the whole
    # scan: otherwise the hub gives up a link on which every attached unit has been silent.
    keeper = ModbusLink(_asset(args, 1))
    keeper.unit_id = 0
    found: list[Device] = []
    silent = not_sunspec = 0
    started = time.monotonic()
    try:
        await keeper.connect()
        async with asyncio.timeout(deadline_s):
            for unit_id in units:
                link = ModbusLink(_asset(args, unit_id))
                try:
                    await link.connect()
                    device = await examine(link, _bases(args), wanted={COMMON_MODEL})
                except NotSunSpec:
                    not_sunspec += 1
                    report.line(f"unit {unit_id:<4} answers, but no SunSpec marker at {_listed(_bases(args))}")
                    continue
                except LinkFailure:
                    silent += 1
                    continue
                finally:
                    link.close()
                found.append(device)
                identity = device.identity
                report.line(f"unit {unit_id:<4} SunSpec at {device.model_map.base_address:<5} models "
                            f"{' '.join(map(str, device.model_map.model_ids))}"
                            + (f"  {identity.get('manufacturer', '')} {identity.get('model', '')}".rstrip()
                               if identity else "")
                            + (f" serial {identity['serial']}" if "serial" in identity else ""))
    except TimeoutError:
        report.line(f"scan stopped at its deadline ({deadline_s:g} s)")
    except LinkFailure as error:
        report.fail(_why(error))
        return 0
    finally:
        keeper.close()
    report.line(f"found {len(found)} SunSpec device{'s' if len(found) != 1 else ''} among unit ids "
                f"{units[0]}-{units[-1]} ({silent} without answer, {not_sunspec} not SunSpec) in "
                f"{time.monotonic() - started:.1f} s")
    if not found:
        report.fail(f"no SunSpec device on {args.target} at unit ids {units[0]}-{units[-1]}")
        return 0
    report.fragment({"assets": [_fragment_asset(args, device, args.kind or infer_kind(device.model_map.model_ids))
                                for device in found]})
    return len(found)
