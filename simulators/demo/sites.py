"""The demo site's simulated devices and grid operator, for `flexedge demo`.

``SimulatedSite(profile)`` starts, on the ports the profile names, one
simulator per asset: SunSpec devices (``simulators.sunspec``), IEC 104 battery
and power-to-heat units (``simulators.iec104_unit``) and OCPP charge points
(``simulators.ocpp``) whose EVs are plugged in and charging once the gateway's
central system accepts them.  The SunSpec meter only sums the SunSpec devices
of its own simulator, so the site keeps telling it what the other units and the
EVs draw: the connection point then measures the whole site, as a real one does.

``play_deie(config, script, note)`` plays the grid operator on the gateway's
DEIE link: the ``simulators.deie`` script format (``limit:5@44,limit:none@56``),
seconds counted from the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable

from edge.config.profile import Profile

# How the demo's devices behave (what a real site's devices would decide).
DEMO_DEVICES: dict[str, dict[str, Any]] = {
    "pv-roof": {"kind": "pv", "rated_kw": 30.0, "sun_kw": 24.0},
    "pv-carport": {"kind": "pv", "rated_kw": 20.0, "sun_kw": 14.0, "models": (1, 103, 120, 121, 123)},
    "bess-1": {"kind": "storage", "rated_kw": 25.0, "capacity_kwh": 50.0, "soc_pct": 60.0},
    # The building; the chargers draw the rest of the site's load.
    "meter-poc": {"kind": "meter", "load_kw": 5.0},
}
DEMO_UNITS: dict[str, dict[str, Any]] = {
    "bess-2": {"capacity_kwh": 100.0, "soc_pct": 55.0, "ramp_kw_per_s": 25.0},
    "boiler-1": {"storage_temp_c": 70.0, "draw_kw": 8.0},
}
# Each EV takes at least its charger's rating, so a charger's measured power is its limit.
DEMO_EVS: dict[str, dict[str, Any]] = {
    "cp16-1": {"id_tag": "DEMO-EV-1", "capacity_kwh": 40.0, "soc_pct": 35.0, "max_power_kw": 7.4},
    "cp16-2": {"id_tag": "DEMO-EV-2", "capacity_kwh": 52.0, "soc_pct": 60.0, "max_power_kw": 11.0},
    "cp201-1": {"id_tag": "DEMO-EV-3", "capacity_kwh": 77.0, "soc_pct": 20.0, "max_power_kw": 11.0},
    "cp201-2": {"id_tag": "DEMO-EV-4", "capacity_kwh": 64.0, "soc_pct": 45.0, "max_power_kw": 7.4},
    # Bidirectional (a 2.1 station): leaves in 6 h (DEMO_V2X_DEPARTURE_S), wants 10 % more.
    "cp21-v2x": {"id_tag": "DEMO-EV-5", "capacity_kwh": 60.0, "soc_pct": 70.0, "target_soc_pct": 80.0,
                 "max_power_kw": 11.0, "bidirectional": True, "min_soc_pct": 20.0},
}
DEMO_V2X_DEPARTURE_S = 6 * 3600.0
SIM_KIND = {"pv": "pv", "bess": "storage", "meter": "meter"}
# Seconds from the VPP's start, whose steps change every 10 s (0, +15, 0, -15 kW ...): the limit
# comes mid-way through a zero step, so the site visibly drops to it, holds the +15 kW step at
# 50 s back, and is lifted before a one-minute demo ends.  Orders are kept clear of the steps'
# edges: an order within a cycle of a step would freeze the baselines before the devices settle.
DEFAULT_DEIE_SCRIPT = "limit:5@44,limit:none@56"
SITE_WIRING_S = 0.1  # how often the meter learns what the non-SunSpec devices draw: the simulators' tick


def _client_host(host: str) -> str:
    """Where a simulated client connects to a gateway that listens on ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def sunspec_specs(profile: Profile) -> list[Any]:
    from simulators.sunspec import DeviceSpec

    specs = []
    for asset in profile.assets:
        if asset.driver != "sunspec" or asset.host is None:
            continue
        settings = dict(DEMO_DEVICES.get(asset.id, {"kind": SIM_KIND[asset.kind]}))
        base = 40000 if asset.base_address == "auto" else asset.base_address
        specs.append(DeviceSpec(port=asset.port, unit_id=asset.unit_id, base_address=base, **settings))
    return specs


def unit_specs(profile: Profile) -> list[Any]:
    from simulators.iec104_unit import UnitSpec

    specs = []
    for asset in profile.assets:
        if asset.driver != "iec104":
            continue
        settings: dict[str, Any] = {"template": asset.template, "port": asset.port,
                                    "common_address": asset.common_address, "command_mode": asset.command_mode}
        if asset.kind == "bess":
            settings.update(max_charge_kw=asset.max_charge_kw, max_discharge_kw=asset.max_discharge_kw)
        else:
            settings.update(min_load_kw=asset.min_load_kw, max_load_kw=asset.max_load_kw)
            if asset.storage_temp_max_c is not None:
                settings["storage_temp_max_c"] = asset.storage_temp_max_c
            if asset.ramp_kw_per_s is not None:
                settings["ramp_kw_per_s"] = asset.ramp_kw_per_s
        settings.update(DEMO_UNITS.get(asset.id, {}))
        specs.append(UnitSpec(kind=asset.kind, **settings))
    return specs


def charger_specs(profile: Profile) -> list[tuple[Any, Any]]:
    """(StationSpec, EvSpec) per charger; the EVs present tags the central system accepts."""
    from simulators.ocpp import EvSpec, StationSpec

    accepted = list(profile.ocpp.authorize.id_tags) if profile.ocpp and profile.ocpp.authorize.mode == "local_list" else []
    pairs = []
    for asset in (a for a in profile.assets if a.driver == "ocpp"):
        version = "2.0.1" if asset.ocpp_version == "auto" else asset.ocpp_version
        bidirectional = version == "2.1" and bool(DEMO_EVS.get(asset.id, {}).get("bidirectional"))
        station = StationSpec(asset.charge_point_id, ocpp_version=version, password=asset.password(),
                              bidirectional=bidirectional,
                              max_current_a=asset.max_current_a, phases=asset.phases, voltage_v=asset.voltage_v,
                              connector_id=max(1, asset.connector_id), evse_id=asset.evse_id,
                              # The stations start before the gateway's central system listens.
                              reconnect_cap_s=1.0)
        ev = dict(DEMO_EVS.get(asset.id, {}))
        if not bidirectional:
            ev.pop("bidirectional", None)
        elif "departure_s" not in ev:
            ev["departure_s"] = time.time() + DEMO_V2X_DEPARTURE_S
        if "id_tag" not in ev:
            ev["id_tag"] = accepted[len(pairs) % len(accepted)] if accepted else f"DEMO-EV-{len(pairs) + 1}"
        pairs.append((station, EvSpec(**ev)))
    return pairs


class SimulatedSite:
    """Every simulated device of the profile, on loopback; async context manager."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.sunspec_specs = sunspec_specs(profile)
        self.unit_specs = unit_specs(profile)
        self.chargers = charger_specs(profile)
        self.sunspec = self.units = self.stations = None
        self.plugged_in = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task] = []

    def describe(self) -> str:
        parts = [f"{len(self.sunspec_specs)} SunSpec devices"]
        if self.unit_specs:
            parts.append(f"{len(self.unit_specs)} IEC 104 units")
        if self.chargers:
            versions = sorted({station.ocpp_version for station, _ in self.chargers})
            named = versions[0] if len(versions) == 1 else f"{', '.join(versions[:-1])} and {versions[-1]}"
            parts.append(f"{len(self.chargers)} OCPP {named} chargers with EVs")
        return ", ".join(parts)

    async def __aenter__(self) -> "SimulatedSite":
        from drivers.ocpp.config import OcppServer
        from simulators.iec104_unit import Iec104UnitSimulator
        from simulators.ocpp import OcppSimulator
        from simulators.sunspec import SunSpecSimulator

        try:
            self.sunspec = await self._stack.enter_async_context(SunSpecSimulator(self.sunspec_specs))
            if self.unit_specs:
                try:
                    self.units = await self._stack.enter_async_context(Iec104UnitSimulator(self.unit_specs))
                except RuntimeError as error:  # c104: "Can't start server: Port in use?"
                    raise OSError(f"IEC 104 unit simulators: {error}") from error
            if self.chargers:
                ocpp = self.profile.ocpp or OcppServer()
                url = f"ws://{_client_host(ocpp.host)}:{ocpp.port}{ocpp.path}"
                self.stations = await self._stack.enter_async_context(
                    OcppSimulator(url, [station for station, _ in self.chargers]))
                self._tasks.append(asyncio.create_task(self._plug_in_evs(), name="demo-ev-plug-in"))
            else:
                self.plugged_in.set()
            if self.units or self.stations:
                self._tasks.append(asyncio.create_task(self._wire_meters(), name="demo-site-wiring"))
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stack.aclose()  # stations, then IEC 104 units, then SunSpec devices

    async def _plug_in_evs(self) -> None:
        async def plug(station, ev) -> None:
            # A driver arrives once the charger is on line; a refused tag or a lost link: try again.
            while not await self._try_plug_in(station, ev):
                await asyncio.sleep(1.0)

        await asyncio.gather(*(plug(station, ev) for station, (_, ev) in zip(self.stations.stations, self.chargers)))
        self.plugged_in.set()

    @staticmethod
    async def _try_plug_in(station, ev) -> bool:
        await station.connected.wait()
        if await station.plug_in(ev):
            return True
        await station.unplug()
        return False

    def _others_export_kw(self) -> float:
        """What the IEC 104 units and the EVs export now (+ export), as the meter would see it."""
        total = 0.0
        for unit in self.units.units if self.units else []:
            # The units speak their own convention: a BESS + discharge, a P2H unit + consumption.
            total += unit.power_kw if unit.spec.kind == "bess" else -unit.power_kw
        for station in self.stations.stations if self.stations else []:
            total -= station.power_w / 1000.0
        return total

    async def _wire_meters(self) -> None:
        meters = [device for device in self.sunspec.devices if device.kind == "meter"]
        building_kw = {id(meter): meter.load_kw for meter in meters}
        while True:
            others_kw = self._others_export_kw()
            for meter in meters:
                meter.set_load(building_kw[id(meter)] - others_kw)
            await asyncio.sleep(SITE_WIRING_S)


async def play_deie(config, script: str, note: Callable[[str], None], connect_timeout_s: float = 30.0) -> None:
    """Send the script's orders to the gateway's DEIE server, noting each confirmation; then
    keep the link open (the operator stays connected) until cancelled."""
    from simulators.deie import DeieOperator, parse_script, run_command

    steps = parse_script(script)
    started = time.monotonic()
    operator = None
    while operator is None:
        try:
            operator = await DeieOperator(_client_host(config.host), config.port, config.common_address,
                                          points=config.point_map(), connect_timeout_s=2.0).__aenter__()
        except ConnectionError:
            if time.monotonic() - started > connect_timeout_s:
                note(f"grid operator (DEIE): no link to {config.host}:{config.port}; no orders sent")
                return
    try:
        unit = "%" if config.limit_unit == "pct" else " kW"
        for at_s, name, args in steps:
            await asyncio.sleep(max(0.0, started + at_s - time.monotonic()))
            confirmation = await run_command(operator, name, args)
            if name == "limit":
                order = "lifts the limit" if args[0].lower() == "none" else f"limits export to {args[0]}{unit}"
            else:
                order = f"sends {':'.join([name, *args])}"
            note(f"grid operator (DEIE) {order}: {confirmation.value} confirmation")
        await asyncio.Event().wait()
    finally:
        await operator.close()
