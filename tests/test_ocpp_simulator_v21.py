"""OCPP 2.1 bidirectional stations of the simulator, driven by a tiny central system written here.

The central system is a websockets server with the ocpp library's v21 / v201 ChargePoint:
what the tests assert is what crossed the wire (the charging needs, the answers' status
and reasonCode, the meter values), plus the station's own records.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ocpp.routing import on
from ocpp.v21 import ChargePoint as ChargePoint21
from ocpp.v21 import call as call21
from ocpp.v21 import call_result as result21
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from simulators.ocpp import EvSpec, OcppSimulator, StationSpec
from simulators.ocpp.schedule import Capability, ProfileRefused, check_v2x, decide, parse_profile
from tests.conftest import free_port, until

REPO = Path(__file__).resolve().parents[1]


def iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Handlers:
    results = result201

    def __init__(self, cp_id, connection, csms: "Csms"):
        super().__init__(cp_id, connection, response_timeout=3)
        self.csms = csms

    def _got(self, action: str, **fields):
        self.csms.received[self.id].append((action, fields))

    @on("BootNotification")
    def on_boot(self, **fields):
        self._got("BootNotification", **fields)
        return self.results.BootNotification(current_time=iso(time.time()), interval=300, status="Accepted")

    @on("StatusNotification")
    def on_status(self, **fields):
        self._got("StatusNotification", **fields)
        return self.results.StatusNotification()

    @on("Authorize")
    def on_authorize(self, **fields):
        return self.results.Authorize(id_token_info={"status": "Accepted"})

    @on("TransactionEvent")
    def on_transaction_event(self, **fields):
        self._got("TransactionEvent", **fields)
        return self.results.TransactionEvent()

    @on("NotifyEVChargingNeeds")
    def on_needs(self, **fields):
        self._got("NotifyEVChargingNeeds", **fields)
        return self.results.NotifyEVChargingNeeds(status="Accepted")

    @on("NotifyReport")
    def on_report(self, **fields):
        self._got("NotifyReport", **fields)
        return self.results.NotifyReport()


class _Central21(_Handlers, ChargePoint21):
    results = result21


class _Central201(_Handlers, ChargePoint201):
    pass


class Csms:
    """Accepts every station on ws://127.0.0.1:<port>/ocpp/<id>, answers everything, records what came."""

    def __init__(self):
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ocpp"
        self.points: dict[str, _Handlers] = {}
        self.versions: dict[str, str] = {}
        self.received: dict[str, list] = defaultdict(list)
        self._server = None

    async def _serve(self, websocket):
        cp_id = websocket.request.path.rsplit("/", 1)[-1]
        self.versions[cp_id] = websocket.subprotocol
        point = (_Central21 if websocket.subprotocol == "ocpp2.1" else _Central201)(cp_id, websocket, self)
        self.points[cp_id] = point
        with contextlib.suppress(ConnectionClosed):
            await point.start()

    async def start(self):
        self._server = await serve(self._serve, "127.0.0.1", self.port, subprotocols=["ocpp2.1", "ocpp2.0.1"])

    async def stop(self):
        self._server.close()
        await asyncio.wait_for(self._server.wait_closed(), 3)

    def messages(self, cp_id: str, action: str) -> list[dict]:
        return [fields for name, fields in self.received[cp_id] if name == action]

    async def call(self, cp_id: str, request):
        return await asyncio.wait_for(self.points[cp_id].call(request), 3)


@contextlib.asynccontextmanager
async def site(*specs: StationSpec):
    csms = Csms()
    await csms.start()
    try:
        async with OcppSimulator(csms.url, list(specs)) as sim:
            await asyncio.wait_for(asyncio.gather(*(s.wait_connected() for s in sim.stations)), 3)
            await until(lambda: all(s.spec.charge_point_id in csms.points for s in sim.stations), 3, "CSMS links")
            yield csms, sim
    finally:
        await csms.stop()


def period(start_s: int, **fields) -> dict:
    return {"start_period": start_s, **fields}


def profile_21(profile_id: int, periods: list[dict], *, purpose="TxDefaultProfile", kind="Relative", start_s=None,
               duration_s=None, stack_level=0) -> dict:
    schedule = {"id": profile_id, "charging_rate_unit": "W", "charging_schedule_period": periods}
    if start_s is not None:
        schedule["start_schedule"] = iso(start_s)
    if duration_s is not None:
        schedule["duration"] = duration_s
    return {"id": profile_id, "stack_level": stack_level, "charging_profile_purpose": purpose,
            "charging_profile_kind": kind, "charging_schedule": [schedule]}


def v21(cp_id: str, bidirectional=True, **extra) -> StationSpec:
    return StationSpec(cp_id, "2.1", bidirectional=bidirectional, meter_interval_s=0.1, tick_s=0.02, **extra)


def bidi_ev(**extra) -> EvSpec:
    fields = dict(id_tag="V2G1", capacity_kwh=50.0, soc_pct=60.0, max_power_kw=11.0, max_discharge_kw=10.0,
                  min_charge_kw=1.4, min_discharge_kw=1.0, target_soc_pct=80.0, bidirectional=True,
                  min_soc_pct=30.0, max_soc_pct=90.0)
    return EvSpec(**{**fields, **extra})


async def test_21_station_boots_plugs_in_and_states_bidirectional_charging_needs():
    async with site(v21("CP1", max_discharge_kw=7.0)) as (csms, sim):
        station = sim.stations[0]
        departure_s = float(int(time.time()) + 3 * 3600)
        assert csms.versions["CP1"] == "ocpp2.1"
        assert await station.plug_in(bidi_ev(departure_s=departure_s))
        assert station.charging_needs_answers == ["Accepted"]
        assert csms.messages("CP1", "BootNotification")[0]["charging_station"]["model"] == "SimAC"
        started = csms.messages("CP1", "TransactionEvent")[0]
        assert started["event_type"] == "Started"
        [needs] = csms.messages("CP1", "NotifyEVChargingNeeds")
        assert needs["evse_id"] == 1
        wanted = needs["charging_needs"]
        assert (wanted["requested_energy_transfer"], wanted["control_mode"]) == ("DC_BPT", "DynamicControl")
        assert wanted["departure_time"] == iso(departure_s)
        assert wanted["v2x_charging_parameters"] == {
            "max_charge_power": 11000.0, "min_charge_power": 1400.0,
            "max_discharge_power": 7000.0, "min_discharge_power": 1000.0,  # the station's 7 kW under the EV's 10
            "ev_target_energy_request": 10000.0,  # 60 -> 80 % of 50 kWh
            "ev_min_v2x_energy_request": -15000.0,  # 60 -> 30 %: that much above the floor
            "ev_max_v2x_energy_request": 15000.0, "target_soc": 80}
        dc = wanted["dc_charging_parameters"]
        assert (dc["ev_energy_capacity"], dc["state_of_charge"], dc["energy_amount"]) == (50000.0, 60, 10000.0)
        # The car changes its mind mid-session and says so again.
        station.ev.departure_s = departure_s + 3600
        station.ev.target_soc_pct = 90.0
        assert await station.send_charging_needs() == "Accepted"
        again = csms.messages("CP1", "NotifyEVChargingNeeds")[-1]["charging_needs"]
        assert again["departure_time"] == iso(departure_s + 3600)
        assert again["v2x_charging_parameters"]["ev_target_energy_request"] == pytest.approx(15000.0, abs=5)


async def test_central_setpoint_discharges_within_its_limits_and_the_rest_is_refused():
    async with site(v21("CP1")) as (csms, sim):
        station = sim.stations[0]
        assert await station.plug_in(bidi_ev(capacity_kwh=1.0))
        soc_before = station.ev.soc_pct
        answer = await csms.call("CP1", call21.SetChargingProfile(evse_id=1, charging_profile=profile_21(7, [
            period(0, operation_mode="CentralSetpoint", setpoint=-5000.0, limit=11000.0, discharge_limit=-11000.0)])))
        assert answer.status == "Accepted"
        await until(lambda: station.power_w == -5000.0, 2, "discharging at the setpoint")
        assert station.active_period().operation_mode == "CentralSetpoint"
        await asyncio.sleep(0.3)
        assert station.ev.soc_pct < soc_before and station.energy_discharged_wh > 0.3
        assert station.min_soc_seen_pct == pytest.approx(station.ev.soc_pct, abs=0.1)

        def exported():
            values = csms.messages("CP1", "TransactionEvent")[-1]["meter_value"][0]["sampled_value"]
            return {v["measurand"]: v["value"] for v in values}
        await until(lambda: exported().get("Power.Active.Export") == 5000.0, 2, "Power.Active.Export on the wire")
        assert exported()["Power.Active.Import"] == 0.0 and exported()["Energy.Active.Export.Register"] > 0
        record = station.profiles[-1]
        assert (record.operation_mode, record.setpoint, record.discharge_limit, record.charging_profile_id) == (
            "CentralSetpoint", -5000.0, -11000.0, 7)

        async def refused(periods, **extra):
            answer = await csms.call("CP1", call21.SetChargingProfile(evse_id=1, charging_profile=profile_21(
                8, periods, **extra)))
            assert answer.status == "Rejected"
            return answer.status_info["reason_code"]
        out_of_band = period(0, operation_mode="CentralSetpoint", setpoint=-12000.0, discharge_limit=-11000.0)
        assert await refused([out_of_band]) == "InvalidValue"
        assert await refused([period(0, operation_mode="LocalFrequency")]) == "UnsupportedParam"
        assert await refused([period(0, operation_mode="CentralFrequency")]) == "UnsupportedParam"  # no aFRR
        assert station.power_w == -5000.0 and station.profiles[-1].reason == "UnsupportedParam"

        # The setpoint is clamped to what the car can do; at 0 % nothing more comes out.
        station.ev.soc_pct = 0.05
        await until(lambda: station.ev.soc_pct == 0.0 and station.power_w == 0.0, 2, "empty battery")
        assert station.min_soc_seen_pct == 0.0

        # ClearChargingProfile by id, then again (nothing left): Accepted, Unknown.
        assert (await csms.call("CP1", call21.ClearChargingProfile(charging_profile_id=7))).status == "Accepted"
        assert (await csms.call("CP1", call21.ClearChargingProfile(charging_profile_id=7))).status == "Unknown"
        assert station.active_period().profile_id is None and station.stack.profiles == []
        assert [r.action for r in station.requests].count("ClearChargingProfile") == 2

        # The schema's longest schedule: 1024 one-minute periods, evaluated on the station's clock.
        longest = [period(60 * n, limit=1000.0 + n) for n in range(1024)]
        answer = await csms.call("CP1", call21.SetChargingProfile(evse_id=1, charging_profile=profile_21(
            30, longest, kind="Absolute", start_s=station.clock() - 60 * 1000 - 1)))
        assert answer.status == "Accepted" and len(station.profiles[-1].periods) == 1024
        assert station.active_period().period_index == 1000 and station.limit_w() == 2000.0


async def test_multi_period_profile_runs_on_the_station_clock_also_without_the_gateway():
    async with site(v21("CP1")) as (csms, sim):
        station = sim.stations[0]
        assert await station.plug_in(bidi_ev())
        start_s = station.clock() - 60
        plan = profile_21(21, [period(0, limit=7000.0),
                               period(900, operation_mode="CentralSetpoint", setpoint=-3000.0, limit=11000.0,
                                      discharge_limit=-6000.0),
                               period(1800, operation_mode="Idle")],
                          purpose="TxDefaultProfile", kind="Absolute", start_s=start_s, duration_s=2700)
        assert (await csms.call("CP1", call21.SetChargingProfile(evse_id=1, charging_profile=plan))).status == \
            "Accepted"
        record = station.profiles[-1]
        assert record.limit == 7000.0 and len(record.periods) == 3
        await until(lambda: station.power_w == 7000.0, 2, "period 0")
        station.clock_offset_s += 900
        await until(lambda: station.power_w == -3000.0, 2, "period 1 after the clock moved")
        assert station.active_period().period_index == 1

        await csms.stop()  # the gateway is gone
        await until(lambda: not station.connected.is_set(), 3, "link down")
        station.clock_offset_s += 900
        await until(lambda: station.operation_mode == "Idle" and station.power_w == 0.0, 2, "period 2 offline")
        active = station.active_period()
        assert (active.purpose, active.profile_id, active.period_index) == ("TxDefaultProfile", 21, 2)
        station.clock_offset_s += 900  # past the schedule's duration: no profile, full power
        await until(lambda: station.power_w == 11000.0, 2, "after the schedule")
        assert station.active_period().profile_id is None
        await csms.start()  # for site()'s own stop


async def test_afrr_signal_moves_a_central_frequency_station_along_its_curve():
    async with site(v21("CP1", afrr_signal=True), v21("CP2")) as (csms, sim):
        follower, other = sim.stations
        assert await follower.plug_in(bidi_ev())
        frequency = period(0, operation_mode="CentralFrequency", v2x_baseline=2000.0, limit=11000.0,
                           discharge_limit=-8000.0, v2x_signal_watt_curve=[
                               {"signal": -1000, "power": 6000.0}, {"signal": 0, "power": 0.0},
                               {"signal": 1000, "power": -6000.0}])
        answer = await csms.call("CP1", call21.SetChargingProfile(evse_id=1, charging_profile=profile_21(
            3, [frequency])))
        assert answer.status == "Accepted"
        await until(lambda: follower.power_w == 2000.0, 2, "baseline before any signal")
        for signal, expected_w in ((500, -1000.0), (1000, -4000.0), (-400, 4400.0)):
            answer = await csms.call("CP1", call21.AFRRSignal(timestamp=iso(time.time()), signal=signal))
            assert answer.status == "Accepted"
            await until(lambda: follower.power_w == pytest.approx(expected_w), 2, f"power at signal {signal}")
        assert [s.signal for s in follower.afrr_signals] == [500, 1000, -400]
        assert follower.afrr_signals[0].received_at == pytest.approx(time.time(), abs=3)
        answer = await csms.call("CP2", call21.AFRRSignal(timestamp=iso(time.time()), signal=100))
        assert answer.status == "Rejected" and other.afrr_signals == []


async def test_a_station_that_cannot_discharge_refuses_v2x_and_says_so_in_its_device_model():
    async with site(v21("CP1", bidirectional=False), v21("CP2", afrr_signal=True)) as (csms, sim):
        one_way, bidi = sim.stations
        assert await one_way.plug_in(EvSpec(id_tag="T1", max_power_kw=7.0))
        # A one-way session states ISO 15118-2 AC needs even on 2.1.
        needs = csms.messages("CP1", "NotifyEVChargingNeeds")[0]["charging_needs"]
        assert needs["requested_energy_transfer"] == "AC_three_phase" and "v2x_charging_parameters" not in needs
        discharge = period(0, operation_mode="CentralSetpoint", setpoint=-4000.0, discharge_limit=-7000.0)
        answer = await csms.call("CP1", call21.SetChargingProfile(evse_id=1, charging_profile=profile_21(
            4, [discharge])))
        assert (answer.status, answer.status_info["reason_code"]) == ("Rejected", "NoDischarge")
        charge = period(0, operation_mode="CentralSetpoint", setpoint=4000.0, limit=7000.0)
        answer = await csms.call("CP1", call21.SetChargingProfile(evse_id=1, charging_profile=profile_21(5, [charge])))
        assert answer.status == "Accepted"
        await until(lambda: one_way.power_w == 4000.0, 2, "a charging setpoint")

        wanted = [{"component": {"name": "V2XChargingCtrlr", "evse": {"id": 1}}, "variable": {"name": name}}
                  for name in ("Enabled", "SupportedOperationModes")]
        wanted.append({"component": {"name": "EVSE", "evse": {"id": 1}}, "variable": {"name": "Power"}})
        wanted.append({"component": {"name": "SmartChargingCtrlr"}, "variable": {"name": "Enabled"}})
        answers = {}
        for cp_id in ("CP1", "CP2"):
            results = (await csms.call(cp_id, call21.GetVariables(get_variable_data=wanted))).get_variable_result
            answers[cp_id] = [(r["attribute_status"], r.get("attribute_value")) for r in results]
        assert answers["CP1"] == [("Accepted", "false"), ("Accepted", "ChargingOnly,CentralSetpoint,Idle"),
                                  ("Accepted", "4000.0"), ("UnknownComponent", None)]
        assert answers["CP2"][:2] == [("Accepted", "true"),
                                      ("Accepted", "ChargingOnly,CentralSetpoint,Idle,CentralFrequency")]

        answer = await csms.call("CP2", call21.GetBaseReport(request_id=42, report_base="ConfigurationInventory"))
        assert answer.status == "Accepted"
        await until(lambda: csms.messages("CP2", "NotifyReport"), 2, "NotifyReport")
        report = csms.messages("CP2", "NotifyReport")[0]
        assert report["request_id"] == 42
        values = {(d["component"]["name"], d["variable"]["name"]): d["variable_attribute"][0]["value"]
                  for d in report["report_data"]}
        assert values[("V2XChargingCtrlr", "Enabled")] == "true" and ("EVSE", "Power") in values
        summary = await csms.call("CP2", call21.GetBaseReport(request_id=43, report_base="SummaryInventory"))
        assert summary.status == "NotSupported"
        assert bidi.status == "Available"


async def test_201_stations_state_ac_charging_needs_only_when_the_ev_sends_them():
    async with site(StationSpec("CP1", "2.0.1", tick_s=0.02), StationSpec("CP2", "2.0.1")) as (csms, sim):
        asking, quiet = sim.stations
        assert csms.versions["CP1"] == "ocpp2.0.1"
        departure_s = float(int(time.time()) + 7200)
        ev = EvSpec(id_tag="T1", capacity_kwh=40.0, soc_pct=50.0, max_power_kw=11.0, min_charge_kw=4.14,
                    target_soc_pct=75.0, departure_s=departure_s, send_charging_needs=True)
        assert await asking.plug_in(ev) and await quiet.plug_in(EvSpec(id_tag="T2"))
        [needs] = [m["charging_needs"] for m in csms.messages("CP1", "NotifyEVChargingNeeds")]
        assert needs == {"requested_energy_transfer": "AC_three_phase", "departure_time": iso(departure_s),
                         "ac_charging_parameters": {"energy_amount": 10000, "ev_min_current": 6,
                                                    "ev_max_current": 15, "ev_max_voltage": 230}}
        assert csms.messages("CP2", "NotifyEVChargingNeeds") == [] and quiet.charging_needs_answers == []
        # 2.0.1 knows no V2X: the component is unknown, ClearChargingProfile works by criteria.
        [result] = (await csms.call("CP1", call201.GetVariables(get_variable_data=[
            {"component": {"name": "V2XChargingCtrlr", "evse": {"id": 1}}, "variable": {"name": "Enabled"}}]))
        ).get_variable_result
        assert result["attribute_status"] == "UnknownComponent"
        tx_default = {"id": 9, "stack_level": 1, "charging_profile_purpose": "TxDefaultProfile",
                      "charging_profile_kind": "Relative", "charging_schedule": [
                          {"id": 1, "charging_rate_unit": "A", "charging_schedule_period": [
                              {"start_period": 0, "limit": 8.0}]}]}
        assert (await csms.call("CP1", call201.SetChargingProfile(evse_id=1, charging_profile=tx_default))
                ).status == "Accepted"
        await until(lambda: asking.power_w == pytest.approx(8 * 690), 2, "8 A")
        cleared = await csms.call("CP1", call201.ClearChargingProfile(charging_profile_criteria={
            "charging_profile_purpose": "TxDefaultProfile", "stack_level": 1}))
        assert cleared.status == "Accepted"
        await until(lambda: asking.power_w == 11000.0, 2, "back to the EV's maximum")


def test_cli_runs_a_bidirectional_21_station():
    async def scenario():
        csms = Csms()
        await csms.start()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators.ocpp", "--url", csms.url, "--version", "2.1", "--bidirectional",
            "--afrr-signal", "--ev", "--ev-min-soc-pct", "25", "--departure-in-s", "3600", "--meter-interval-s", "0.2",
            cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await until(lambda: csms.messages("CP1", "NotifyEVChargingNeeds"), 8, "charging needs from the CLI")
            needs = csms.messages("CP1", "NotifyEVChargingNeeds")[0]["charging_needs"]
            assert needs["requested_energy_transfer"] == "DC_BPT" and "departure_time" in needs
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 5)
            await csms.stop()
    asyncio.run(scenario())
    out = subprocess.run([sys.executable, "-m", "simulators.ocpp", "--version", "2.0.1", "--bidirectional"],
                         cwd=REPO, capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and "--bidirectional needs --version 2.1" in out.stderr


def test_invalid_v2x_specs_name_the_field():
    with pytest.raises(ValueError, match="bidirectional needs ocpp_version '2.1'"):
        StationSpec("CP1", "2.0.1", bidirectional=True)
    with pytest.raises(ValueError, match="min_soc_pct"):
        EvSpec(min_soc_pct=80, max_soc_pct=70)
    with pytest.raises(ValueError, match="min_discharge_kw"):
        EvSpec(max_discharge_kw=5, min_discharge_kw=6)
    with pytest.raises(ValueError, match="departure_s"):
        EvSpec(departure_s=float("nan"))
    assert EvSpec(max_power_kw=7).max_discharge_kw == 7
    assert StationSpec("CP1", "2.1", max_current_a=16).max_discharge_kw == pytest.approx(16 * 690 / 1000)


def _raw(periods, kind="Absolute", start="2030-01-01T00:00:00Z", duration=None):
    schedule = {"charging_rate_unit": "W", "charging_schedule_period": periods, "start_schedule": start}
    if duration is not None:
        schedule["duration"] = duration
    return {"id": 1, "stack_level": 0, "charging_profile_purpose": "TxDefaultProfile",
            "charging_profile_kind": kind}, schedule


def test_profiles_that_cannot_run_are_refused_with_a_reason():
    profile, schedule = _raw([{"start_period": 10, "limit": 1.0}])
    with pytest.raises(ProfileRefused, match=r"startPeriod is 10, must be 0") as refused:
        parse_profile(profile, schedule, 1, "2.1", 0.0)
    assert refused.value.reason_code == "InvalidSchedule"
    profile, schedule = _raw([{"start_period": 0, "limit": 1.0}, {"start_period": 0, "limit": 2.0}])
    with pytest.raises(ProfileRefused, match=r"\[1\].startPeriod 0 does not follow"):
        parse_profile(profile, schedule, 1, "2.1", 0.0)
    profile, schedule = _raw([{"start_period": 0, "operation_mode": "CentralSetpoint", "setpoint": 500.0,
                               "limit": 400.0}])
    with pytest.raises(ProfileRefused, match=r"setpoint 500 is outside \[dischargeLimit -inf, limit 400\]"):
        check_v2x(parse_profile(profile, schedule, 1, "2.1", 0.0), can_discharge=True, afrr_signal=False)


@settings(max_examples=150, deadline=None)
@given(starts=st.lists(st.integers(1, 10_000), min_size=0, max_size=30, unique=True),
       elapsed=st.floats(-100, 20_000), duration=st.one_of(st.none(), st.integers(1, 15_000)),
       setpoints=st.lists(st.floats(-50_000, 50_000), min_size=31, max_size=31),
       charge_max=st.floats(0, 22_000), discharge_max=st.floats(0, 22_000))
def test_the_period_in_force_and_the_power_stay_within_bounds(starts, elapsed, duration, setpoints, charge_max,
                                                              discharge_max):
    offsets = [0] + sorted(starts)
    periods = [{"start_period": s, "operation_mode": "CentralSetpoint", "setpoint": setpoints[n]}
               for n, s in enumerate(offsets)]
    start_s = 1_900_000_000.0
    installed = parse_profile(*_raw(periods, start=iso(start_s), duration=duration), 1, "2.1", start_s)
    moment_s = start_s + elapsed
    elapsed = moment_s - start_s  # as the station sees it
    index = installed.period_at(moment_s, None)
    if elapsed < 0 or (duration is not None and elapsed >= duration):
        assert index is None
        return
    assert offsets[index] <= elapsed and (index + 1 == len(offsets) or elapsed < offsets[index + 1])
    mode, power = decide((installed, index), [], Capability(charge_max, discharge_max), 0)
    assert mode == "CentralSetpoint" and -discharge_max <= power <= charge_max
    if -discharge_max <= setpoints[index] <= charge_max:
        assert power == pytest.approx(setpoints[index])
