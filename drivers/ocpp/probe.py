"""`flexedge probe ocpp`: listen for one charger, and print what it says about itself.

A central system of one connection, built from the driver's own handlers
(``drivers.ocpp.handlers``: the boot gate, the BootNotification and StatusNotification
answers) with a little recording on top.  Any charge point id is accepted, with OCPP 2.1,
2.0.1 or 1.6J as the charger offers (newest first, as the driver).  Once the boot is answered
(Accepted) it asks for the configuration: 1.6 GetConfiguration; 2.0.1 and 2.1 GetBaseReport
(FullInventory) and the NotifyReport it brings, else GetVariables of the smart-charging
variables, and the EVSE's power as the driver asks for it (``greeting.request_ratings``);
on 2.1 the V2X features as the driver learns them (``features.ask_device_model``); then a
TriggerMessage for the connectors' StatusNotification.  Then it closes the link and
exits.  No charging profile is sent; ID tags are refused (the probe authorizes no one).

Bounds: ``--timeout-s`` for a charger to connect; then ``EXCHANGE_S`` for everything
else, each request answered within ``CALL_TIMEOUT_S``.  Contract with ``flexedge probe``:
edge/commission/probe.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import secrets
import time
from typing import Any
from urllib.parse import unquote

from ocpp.exceptions import OCPPError
from ocpp.routing import on
from ocpp.v16 import call as call16
from ocpp.v201 import call as call201
from ocpp.v21 import call as call21
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from drivers.ocpp.config import CHARGE_POINT_ID_PATTERN, OcppCharger, OcppServer
from drivers.ocpp.features import ask_device_model, resolve
from drivers.ocpp.greeting import request_ratings
from drivers.ocpp.handlers import CentralPoint16, CentralPoint21, CentralPoint201, evse_max_power_kw
from drivers.ocpp.identity import SUBPROTOCOLS, VERSIONS
from drivers.ocpp.session import ChargerSession, TagHasher
from drivers.registry import seconds_option

HELP = ("Listen for one OCPP charger (1.6J, 2.0.1 or 2.1): print its identity, BootNotification, configuration and "
        "connectors, then exit.")

EXCHANGE_S = 30.0  # after the charger connected: boot, configuration, status
CALL_TIMEOUT_S = 10.0
BOOT_GRACE_S = 5.0  # a charger booted already sends no BootNotification: spoken to after this
STATUS_WAIT_S = 2.0
REPORT_WAIT_S = 10.0
# 2.0.1 variables that say how a charger takes a charging limit (OCPP 2.0.1 part 2, SmartChargingCtrlr).
SMART_CHARGING_VARIABLES = (("SmartChargingCtrlr", "Enabled"), ("SmartChargingCtrlr", "RateUnit"),
                            ("SmartChargingCtrlr", "ProfileStackLevel"), ("SmartChargingCtrlr", "PeriodsPerSchedule"),
                            ("SmartChargingCtrlr", "LimitChangeSignificance"), ("ChargingStation", "SupplyPhases"))
_request_ids = itertools.count(1)


_timeout = seconds_option(1, 86400)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1..65535)")
    return int(text)


def _path(text: str) -> str:
    try:
        OcppServer(path=text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a path starts with '/' and does not end with '/'") from None
    return text


def add_arguments(parser) -> None:
    defaults = OcppServer()
    parser.add_argument("--host", default=defaults.host, help=f"listen address (default {defaults.host})")
    parser.add_argument("--port", type=_port, default=defaults.port, help=f"listen port (default {defaults.port})")
    parser.add_argument("--path", type=_path, default=defaults.path,
                        help=f"URL prefix; the charger connects to PATH/<charge point id> (default {defaults.path})")
    parser.add_argument("--timeout-s", type=_timeout, default=120.0,
                        help="how long to wait for a charger to connect (default 120)")


# ------------------------------------------------------------------ recording handlers


class _Recording:
    """What the charger sent, kept for printing; the driver's handlers still answer."""

    def _init_record(self) -> None:
        self.boot: dict[str, Any] | None = None
        self.statuses: dict[tuple[int, int], tuple[str, str]] = {}  # (evse or 0, connector) -> (status, error)
        self.report: list[dict[str, Any]] = []
        self.report_done = asyncio.Event()
        self.status_seen = asyncio.Event()


class _Probe16(_Recording, CentralPoint16):
    @on("BootNotification")
    def on_boot(self, **fields):
        self.boot = fields
        return CentralPoint16.on_boot(self, **fields)

    @on("StatusNotification")
    def on_status(self, connector_id: int, error_code: str, status: str, **extra):
        self.statuses[(0, int(connector_id))] = (status, error_code)
        self.status_seen.set()
        return CentralPoint16.on_status(self, connector_id, error_code, status, **extra)


class _Recording2x(_Recording):
    @on("BootNotification")
    def on_boot(self, charging_station: dict, reason: str, **extra):
        self.boot = {**charging_station, "reason": reason, **extra}
        return super().on_boot(charging_station, reason, **extra)

    @on("StatusNotification")
    def on_status(self, timestamp: str, connector_status: str, evse_id: int, connector_id: int, **extra):
        self.statuses[(int(evse_id), int(connector_id))] = (connector_status, "")
        self.status_seen.set()
        return super().on_status(timestamp, connector_status, evse_id, connector_id, **extra)

    @on("NotifyReport")
    def on_notify_report(self, request_id: int, generated_at: str, seq_no: int, **extra):
        self.report += extra.get("report_data") or []
        if not extra.get("tbc"):
            self.report_done.set()
        return super().on_notify_report(request_id, generated_at, seq_no, **extra)


class _Probe201(_Recording2x, CentralPoint201):
    pass


class _Probe21(_Recording2x, CentralPoint21):
    pass


_PROBES = {"1.6": _Probe16, "2.0.1": _Probe201, "2.1": _Probe21}


# ------------------------------------------------------------------ the exchange


def _charge_point_id(prefix: str, path: str) -> str | None:
    head = prefix.rstrip("/") + "/"
    path = path.split("?", 1)[0]
    if not path.startswith(head):
        return None
    cp_id = unquote(path[len(head):])
    return cp_id if cp_id and "/" not in cp_id else None


def _camel(name: str) -> str:
    """The OCPP spelling of a field the library hands over in snake_case."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _fields(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            out += _fields(value, f"{prefix}{_camel(key)}.")
        elif value is not None:
            out.append(f"{prefix}{_camel(key)} {value}")
    return out


def _error_text(error: Exception) -> str:
    if isinstance(error, OCPPError):
        return f"{type(error).__name__}: {error.description}" if getattr(error, "description", "") else type(error).__name__
    return f"no answer within {CALL_TIMEOUT_S:g} s" if isinstance(error, asyncio.TimeoutError) else str(error)


class Exchange:
    """The one charger's visit: what it said, and what it answered."""

    def __init__(self, args):
        self.args = args
        self.lines: list[str] = []
        self.fragment: dict[str, Any] | None = None
        self.connected = asyncio.Event()
        self.done = asyncio.Event()

    def say(self, title: str, text: str) -> None:
        self.lines.append(f"{title:<10}{text}")

    async def handle(self, connection: ServerConnection) -> None:
        if self.connected.is_set():
            await connection.close(1013, "the probe serves one charger")
            return
        self.connected.set()
        try:
            async with asyncio.timeout(EXCHANGE_S):
                await self._talk(connection)
        except TimeoutError:
            self.say("note", f"the exchange was cut at {EXCHANGE_S:g} s")
        except ConnectionClosed as closed:
            self.say("note", f"the charger closed the link ({closed.rcvd.code if closed.rcvd else 'no close frame'})")
        finally:
            self.done.set()
            with contextlib.suppress(Exception):
                await connection.close(1000, "probe done")

    async def _talk(self, connection: ServerConnection) -> None:
        cp_id = _charge_point_id(self.args.path, connection.request.path) or "?"
        version = VERSIONS.get(connection.subprotocol, "1.6")
        remote = connection.remote_address
        self.say("charger", f"{cp_id} from {remote[0]}:{remote[1]}, OCPP {version} (subprotocol {connection.subprotocol})")
        usable = re.fullmatch(CHARGE_POINT_ID_PATTERN, cp_id) is not None
        charger = OcppCharger(id="probe", kind="ev_charger", driver="ocpp", charge_point_id=cp_id if usable else "probe",
                              ocpp_version=version, connector_id=0)
        session = ChargerSession(charger, lambda *_: None, TagHasher(secrets.token_bytes(32)))
        point_class = _PROBES[version]
        point = point_class(cp_id, connection, session, lambda tag: False, OcppServer().heartbeat_interval_s,
                            CALL_TIMEOUT_S)
        point._init_record()
        point.arm_boot_grace(BOOT_GRACE_S)
        receiver = asyncio.create_task(point.start())
        try:
            await self._converse(point, version, charger, receiver)
        finally:
            point.disarm_boot_grace()
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiver
        self._fragment(cp_id, usable, version, point)

    async def _converse(self, point, version: str, charger: OcppCharger, receiver: asyncio.Task) -> None:
        ready = asyncio.create_task(point.ready.wait())
        await asyncio.wait({ready, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if receiver.done():
            ready.cancel()
            receiver.result()  # the link closed: ConnectionClosed
        if point.boot is not None:
            self.say("boot", ", ".join(_fields(point.boot)) + f"; answered {point.boot_status}")
        else:
            self.say("boot", f"no BootNotification within {BOOT_GRACE_S:g} s (booted already): taken as booted")
        if version == "1.6":
            await self._configuration16(point)
            trigger = call16.TriggerMessage(requested_message="StatusNotification")
        else:
            await self._configuration201(point, charger, version)
            if version == "2.1":
                await self._v2x21(point, charger)
            trigger = (call21 if version == "2.1" else call201).TriggerMessage(requested_message="StatusNotification")
        try:
            await point.call(trigger, suppress=False)
        except (OCPPError, asyncio.TimeoutError) as error:
            self.say("status", f"TriggerMessage StatusNotification: {_error_text(error)}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STATUS_WAIT_S):
                await point.status_seen.wait()
                await asyncio.sleep(0.3)  # the other connectors' notifications follow the first
        if not point.statuses:
            self.say("status", f"no StatusNotification within {STATUS_WAIT_S:g} s")
        for index, ((evse, connector), (status, error)) in enumerate(sorted(point.statuses.items())):
            where = f"evse {evse} connector {connector}" if version != "1.6" else f"connector {connector}"
            self.say("status" if index == 0 else "", f"{where}: {status}"
                     + (f" ({error})" if error and error != "NoError" else ""))

    async def _configuration16(self, point) -> None:
        try:
            answer = await point.call(call16.GetConfiguration(), suppress=False)
        except (OCPPError, asyncio.TimeoutError) as error:
            self.say("config", f"GetConfiguration: {_error_text(error)}")
            return
        keys = answer.configuration_key or []
        self.config16 = {item.get("key"): item.get("value") for item in keys}
        self.say("config", f"GetConfiguration: {len(keys)} keys" + (f", unknown: {', '.join(answer.unknown_key)}"
                                                                   if answer.unknown_key else ""))
        width = max([len(str(item.get("key"))) for item in keys] + [3])
        for item in sorted(keys, key=lambda item: str(item.get("key"))):
            flag = " (read-only)" if item.get("readonly") else ""
            self.say("", f"{item.get('key')!s:<{width}}  {item.get('value', '')}{flag}")

    async def _configuration201(self, point, charger: OcppCharger, version: str) -> None:
        calls = call21 if version == "2.1" else call201
        try:
            answer = await point.call(calls.GetBaseReport(request_id=next(_request_ids), report_base="FullInventory"),
                                      suppress=False)
            status = answer.status
        except (OCPPError, asyncio.TimeoutError) as error:
            status = _error_text(error)
        if status == "Accepted":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_WAIT_S):
                    await point.report_done.wait()
            self.say("config", f"GetBaseReport FullInventory: {len(point.report)} variables")
        else:
            self.say("config", f"GetBaseReport FullInventory: {status}")
            await self._variables201(point, calls)
        if evse_max_power_kw(point.report, charger.evse_id) is None:
            # What the driver asks on every link: the EVSE's Power maxLimit, in a NotifyReport.
            point.report_done.clear()
            await request_ratings(point, version, charger)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_WAIT_S):
                    await point.report_done.wait()
        for item in point.report:
            self.say("", _report_row(item))

    async def _variables201(self, point, calls) -> None:
        wanted = [{"component": {"name": component}, "variable": {"name": variable}}
                  for component, variable in SMART_CHARGING_VARIABLES]
        try:
            answer = await point.call(calls.GetVariables(get_variable_data=wanted), suppress=False)
        except (OCPPError, asyncio.TimeoutError) as error:
            self.say("", f"GetVariables (smart charging): {_error_text(error)}")
            return
        for result in answer.get_variable_result or []:
            name = f"{result['component']['name']}.{result['variable']['name']}"
            value = result.get("attribute_value") if result.get("attribute_status") == "Accepted" \
                else f"({result.get('attribute_status')})"
            self.say("", f"{name:<40} {value}")

    async def _v2x21(self, point, charger: OcppCharger) -> None:
        """The V2X features, asked as the driver asks them at each connection."""
        learned = await ask_device_model(point, point.session, REPORT_WAIT_S)
        features = resolve(charger, "2.1", learned)
        self.v2x = features
        if learned is None:
            self.say("v2x", "V2XChargingCtrlr: no answer to GetVariables nor GetBaseReport: taken as not bidirectional")
            return
        modes = ", ".join(learned.operation_modes) or "none stated"
        enabled = {None: "not stated", True: "true", False: "false"}[learned.enabled]
        self.say("v2x", f"V2XChargingCtrlr[{charger.evse_id}]: Enabled {enabled}; SupportedOperationModes {modes}")
        self.say("", f"bidirectional (CentralSetpoint): {'yes' if features.bidirectional else 'no'}; "
                     f"aFRR signal (CentralFrequency): {'yes' if features.afrr_signal else 'no'}")

    def _fragment(self, cp_id: str, usable: bool, version: str, point) -> None:
        if not usable:
            self.say("note", f"charge point id {cp_id!r} cannot go in a profile (letters, digits and _.:*+|@- "
                             "only, at most 48): no fragment")
            return
        asset: dict[str, Any] = {"id": "ev-" + re.sub(r"[^A-Za-z0-9_.-]", "-", cp_id)[:61], "kind": "ev_charger",
                                 "driver": "ocpp", "charge_point_id": cp_id, "ocpp_version": version}
        connectors = sorted({key for key in point.statuses if key[1] > 0})
        if version == "1.6" and len(connectors) == 1:
            asset["connector_id"] = connectors[0][1]
        if version != "1.6" and len({evse for evse, _ in connectors}) == 1:
            asset["evse_id"] = connectors[0][0]
        kw = evse_max_power_kw(point.report, asset.get("evse_id", 1)) if version != "1.6" else None
        if kw is not None:
            asset["max_power_kw"] = kw
        units = str(getattr(self, "config16", {}).get("ChargingScheduleAllowedChargingRateUnit") or "")
        if "Power" in units and "Current" not in units:
            asset["limit_unit"] = "W"
        features = getattr(self, "v2x", None)
        if features is not None and features.bidirectional:
            asset["v2x"] = {"bidirectional": True, "afrr_signal": features.afrr_signal}
        args = self.args
        self.fragment = {"ocpp": {"host": args.host, "port": args.port, "path": args.path}, "assets": [asset]}


def _report_row(item: dict[str, Any]) -> str:
    component, variable = item.get("component") or {}, item.get("variable") or {}
    name = component.get("name", "?")
    if (component.get("evse") or {}).get("id") is not None:
        name += f"[{component['evse']['id']}]"
    name += f".{variable.get('name', '?')}" + (f"[{variable['instance']}]" if variable.get("instance") else "")
    attributes = item.get("variable_attribute") or [{}]
    values = "; ".join(f"{a.get('type', 'Actual')} {a.get('value', '')}".rstrip() for a in attributes)
    characteristics = item.get("variable_characteristics") or {}
    extra = [str(characteristics[k]) if k == "unit" else f"{k} {characteristics[k]}"
             for k in ("unit", "max_limit") if characteristics.get(k) is not None]
    extra = [text.replace("max_limit", "maxLimit") for text in extra]
    return f"{name:<40} {values}" + (f" ({', '.join(extra)})" if extra else "")


async def probe(args, report) -> int:
    exchange = Exchange(args)

    def select_subprotocol(connection: ServerConnection, offered) -> Subprotocol | None:
        for name in SUBPROTOCOLS.values():  # newest first, as the central system
            if name in offered:
                return Subprotocol(name)
        return None  # refused by websockets: the charger offers neither

    def process_request(connection: ServerConnection, request):
        if _charge_point_id(args.path, request.path) is None:
            return connection.respond(404, f"connect to {args.path}/<charge point id>\n")
        return None

    try:
        server = await serve(exchange.handle, args.host, args.port, subprotocols=[Subprotocol(p) for p in SUBPROTOCOLS.values()],
                             select_subprotocol=select_subprotocol, process_request=process_request,
                             open_timeout=10, close_timeout=2, compression=None)
    except OSError as error:
        report.fail(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}")
        return 0
    started = time.monotonic()
    try:
        report.line(f"listening on ws://{args.host}:{args.port}{args.path}/<charge point id> "
                    f"(OCPP 2.1, 2.0.1, 1.6) for "
                    f"{args.timeout_s:g} s: point the charger's central system URL here")
        try:
            async with asyncio.timeout(args.timeout_s):
                await exchange.connected.wait()
        except TimeoutError:
            report.fail(f"no charger connected to {args.host}:{args.port}{args.path}/... within {args.timeout_s:g} s")
            return 0
        await exchange.done.wait()  # bounded by EXCHANGE_S in handle()
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                await server.wait_closed()
    for line in exchange.lines:
        report.line(line)
    report.line(f"{'':<10}(done {time.monotonic() - started:.1f} s after the start)")
    if exchange.fragment is not None:
        report.fragment(exchange.fragment)
    return 1
