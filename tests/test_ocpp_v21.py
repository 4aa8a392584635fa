"""OCPP 2.1 and V2X in the OCPP driver: the pure rules (payloads, charging needs, features, failsafe
shares), then on the wire against the bundled stations (simulators.ocpp)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from websockets.asyncio.client import connect

import drivers.ocpp as ocpp_driver
from drivers.ocpp.driver import configure_failsafe, configure_site, shared_system
from drivers.ocpp.features import DeviceModelV2x, from_report, from_variables, resolve
from drivers.ocpp.limits import failsafe_shares, limit_for_target
from drivers.ocpp.needs import decode_charging_needs
from drivers.ocpp.probe import probe
from drivers.ocpp.schedule import (CLEAR, FREQUENCY, LIMIT, MAX_PERIODS, PLAN, SETPOINT, Command, clear_payload,
                                   differs, failsafe_payload, set_profile_payload)
from drivers.ocpp.v2x import afrr_signal_payload, signal_for
from edge.asset import DispatchContext, PowerPlan
from simulators.ocpp import EvSpec, OcppSimulator, StationSpec
from tests.conftest import free_port
from tests.test_ocpp_driver import TAG, Events, charger, server_cfg, url
from tests.test_ocpp_driver import until as until_step

NOW = 1_800_000_000.0  # a whole second, so offsets are exact


def v21(**overrides):
    return charger(**{"ocpp_version": "2.1", "limit_unit": "W", "max_power_kw": 11.0, **overrides})


def period0(payload: dict) -> dict:
    return payload["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"][0]


# ------------------------------------------------------------------ profile keys


def test_v2x_keys_are_checked_and_name_what_is_wrong():
    assert v21().v2x.bidirectional == "auto" and v21().max_discharge_kw == 11.0
    assert v21(v2x={"bidirectional": True, "max_discharge_kw": 7.0}).max_discharge_kw == 7.0
    with pytest.raises(ValidationError, match=r"v2x.bidirectional: true needs ocpp_version 2.1 or auto"):
        charger(ocpp_version="2.0.1", v2x={"bidirectional": True})
    with pytest.raises(ValidationError, match=r"v2x.afrr_signal: true needs ocpp_version 2.1"):
        charger(ocpp_version="1.6", v2x={"afrr_signal": True})
    with pytest.raises(ValidationError, match="needs a TxDefaultProfile or TxProfile purpose"):
        v21(v2x={"bidirectional": True}, profile_purpose="ChargingStationMaxProfile")
    with pytest.raises(ValidationError, match="afrr_signal: true needs v2x.bidirectional"):
        v21(v2x={"bidirectional": False, "afrr_signal": True})
    with pytest.raises(ValidationError, match="failsafe_profile_id .2. must differ from profile_id"):
        v21(profile_id=2)
    with pytest.raises(ValidationError, match="max_discharge_kw"):
        v21(v2x={"max_discharge_kw": math.nan})
    with pytest.raises(ValidationError, match="operation_mode"):
        v21(v2x={"operation_mode": "Idle"})
    with pytest.raises(ValidationError, match="plan_hold_s"):
        v21(plan_hold_s=5)
    assert v21().hold_s(1.0) == 10.0 and v21().hold_s(4.0) == 12.0 and v21(plan_hold_s=30).hold_s(4.0) == 30.0


def test_failsafe_shares_follow_the_ratings_and_the_chargers_own_figure():
    a = charger("a", "A", ocpp_version="2.0.1")  # 22.08 kW
    b = charger("b", "B", ocpp_version="2.1", max_power_kw=11.04, v2x={"max_discharge_kw": 5.0})
    c = charger("c", "C", ocpp_version="1.6", max_power_kw=11.04, failsafe_kw=3.0)
    shares = failsafe_shares([a, b, c], import_limit_kw=44.16, export_limit_kw=10.0)
    assert shares["a"] == pytest.approx((22.08, None))
    assert shares["b"] == pytest.approx((11.04, 10.0))  # the only one that may discharge
    assert shares["c"] == (3.0, None)
    assert failsafe_shares([a, c], import_limit_kw=None, export_limit_kw=None) == {"c": (3.0, None)}


def test_prepare_site_hands_each_driver_its_share():
    assets = [charger("a", "A"), charger("b", "B", max_power_kw=11.04)]
    profile = SimpleNamespace(ocpp=None, assets=assets, grid=SimpleNamespace(import_limit_kw=33.12,
                                                                             export_limit_kw=None))
    try:
        ocpp_driver.prepare_site(profile)
        driver = ocpp_driver.create(assets[1], 1.0, lambda *_: None)
        assert driver.failsafe == pytest.approx((11.04, None))
    finally:
        configure_site(None)
        configure_failsafe({})


# ------------------------------------------------------------------ payloads


def test_without_a_plan_a_limit_is_the_single_period_of_before_and_chargingonly_on_2_1():
    c16, c201 = charger(ocpp_version="1.6"), charger(ocpp_version="2.0.1")
    for c, version in ((c16, "1.6"), (c201, "2.0.1")):
        payload = set_profile_payload(c, version, Command(LIMIT, limit=limit_for_target(c, -7.0)), None,
                                      now_s=NOW, hold_s=10)
        profile = payload.get("csChargingProfiles") or payload["chargingProfile"]
        schedule = profile["chargingSchedule"]
        schedule = schedule[0] if isinstance(schedule, list) else schedule
        assert profile["chargingProfileKind"] == "Relative" and "startSchedule" not in schedule
        assert schedule["chargingSchedulePeriod"] == [{"startPeriod": 0, "limit": 10.1, "numberPhases": 3}]
        assert "duration" not in schedule
    c = v21()
    payload = set_profile_payload(c, "2.1", Command(LIMIT, limit=limit_for_target(c, -7.0)), None, now_s=NOW, hold_s=10)
    assert period0(payload) == {"startPeriod": 0, "limit": 7000.0, "operationMode": "ChargingOnly"}


def test_a_v2x_setpoint_carries_ocpp_signs_in_watts():
    c = v21(limit_unit="A")  # V2X profiles are in W whatever the charging unit
    discharge = Command(SETPOINT, setpoint_kw=5.0, charge_max_kw=11.0, discharge_max_kw=7.0, v2x=True)
    payload = set_profile_payload(c, "2.1", discharge, "tx1", now_s=NOW, hold_s=10)
    schedule = payload["chargingProfile"]["chargingSchedule"][0]
    assert schedule["chargingRateUnit"] == "W"
    assert schedule["chargingSchedulePeriod"] == [{"startPeriod": 0, "operationMode": "CentralSetpoint",
                                                   "setpoint": -5000.0, "limit": 11000.0, "dischargeLimit": -7000.0}]
    charge = Command(SETPOINT, setpoint_kw=-7.0, charge_max_kw=11.0, discharge_max_kw=7.0, v2x=True)
    assert period0(set_profile_payload(c, "2.1", charge, "tx1", now_s=NOW, hold_s=10))["setpoint"] == 7000.0


def test_central_frequency_curve_and_the_afrr_signal():
    c = v21()
    command = Command(FREQUENCY, baseline_kw=-2.0, band_up_kw=4.0, band_down_kw=3.0, charge_max_kw=11.0,
                      discharge_max_kw=7.0, v2x=True)
    period = period0(set_profile_payload(c, "2.1", command, None, now_s=NOW, hold_s=10))
    assert period == {"startPeriod": 0, "operationMode": "CentralFrequency", "v2xBaseline": 2000.0,
                      "v2xSignalWattCurve": [{"signal": -1000, "power": 3000.0}, {"signal": 0, "power": 0.0},
                                             {"signal": 1000, "power": -4000.0}],
                      "limit": 11000.0, "dischargeLimit": -7000.0}
    assert [signal_for(x) for x in (-2.0, -0.5, 0.0004, 0.25, 1.0)] == [-1000, -500, 0, 250, 1000]
    assert afrr_signal_payload(250, NOW) == {"timestamp": "2027-01-15T08:00:00.000Z", "signal": 250}


def quarter_plan(start_s: float, powers_kw: list[float]) -> PowerPlan:
    return PowerPlan(slots=tuple((start_s + 900 * i, start_s + 900 * (i + 1), p) for i, p in enumerate(powers_kw)),
                     made_at_s=start_s)


def test_a_plan_becomes_periods_after_the_held_target_and_ends_with_the_plan():
    c = charger(ocpp_version="2.0.1")
    slot0 = NOW - 300  # the current quarter hour began 5 min ago
    plan = quarter_plan(slot0, [-11.0, -4.0, 0.0])
    command = Command(LIMIT, limit=limit_for_target(c, -7.0), plan=plan)
    payload = set_profile_payload(c, "2.0.1", command, None, now_s=NOW, hold_s=10)
    profile = payload["chargingProfile"]
    schedule = profile["chargingSchedule"][0]
    assert profile["chargingProfileKind"] == "Absolute"  # a plan needs the clock, whatever the purpose
    assert schedule["startSchedule"] == "2027-01-15T07:59:00Z"
    assert [(p["startPeriod"], p["limit"]) for p in schedule["chargingSchedulePeriod"]] == [
        (0, 10.1), (70, 15.9), (660, 0.0), (1560, 0.0)]  # -4 kW is below 6 A: 0
    assert schedule["duration"] == 60 + 600 + 1800

    released = set_profile_payload(c, "2.0.1", Command(PLAN, plan=plan), None, now_s=NOW, hold_s=10)
    periods = released["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"]
    assert [(p["startPeriod"], p["limit"]) for p in periods] == [(0, 15.9), (660, 0.0), (1560, 0.0)]


def test_plan_gaps_charge_freely_v2x_slots_are_setpoints_and_1024_periods_at_most():
    c = v21()
    plan = PowerPlan(slots=((NOW + 900, NOW + 1800, -6.0), (NOW + 2700, NOW + 3600, 3.0)), made_at_s=NOW)
    command = Command(SETPOINT, setpoint_kw=2.0, charge_max_kw=11.0, discharge_max_kw=5.0, plan=plan, v2x=True)
    periods = set_profile_payload(c, "2.1", command, "t", now_s=NOW, hold_s=20)["chargingProfile"][
        "chargingSchedule"][0]["chargingSchedulePeriod"]
    assert [(p["startPeriod"], p["operationMode"], p.get("setpoint"), p["limit"]) for p in periods] == [
        (0, "CentralSetpoint", -2000.0, 11000.0),
        (80, "ChargingOnly", None, 11000.0),  # before the plan: free charging
        (960, "CentralSetpoint", 6000.0, 11000.0),
        (1860, "ChargingOnly", None, 11000.0),
        (2760, "CentralSetpoint", 0.0, 11000.0)]  # the plan never discharges
    assert periods[2]["dischargeLimit"] == 0.0
    long_plan = PowerPlan(slots=tuple((NOW + 60 * i, NOW + 60 * (i + 1), -7.0 - (i % 2)) for i in range(2000)),
                          made_at_s=NOW)
    payload = set_profile_payload(c, "2.1", Command(PLAN, plan=long_plan), None, now_s=NOW, hold_s=10)
    schedule = payload["chargingProfile"]["chargingSchedule"][0]
    assert len(schedule["chargingSchedulePeriod"]) == MAX_PERIODS
    assert schedule["duration"] == 60 + 60 * MAX_PERIODS


def test_failsafe_and_clear_payloads():
    c = charger(ocpp_version="1.6", failsafe_profile_id=7)
    payload = failsafe_payload(c, "1.6", 20.0, None, now_s=NOW)
    assert payload["connectorId"] == 0
    profile = payload["csChargingProfiles"]
    assert (profile["chargingProfileId"], profile["stackLevel"], profile["chargingProfilePurpose"]) == (
        7, 0, "ChargePointMaxProfile")
    assert profile["chargingSchedule"]["chargingSchedulePeriod"] == [{"startPeriod": 0, "limit": 28.9,
                                                                      "numberPhases": 3}]
    v = v21()
    payload = failsafe_payload(v, "2.1", 20.0, 8.0, now_s=NOW)
    assert payload["evseId"] == 0 and payload["chargingProfile"]["id"] == 2
    assert period0(payload) == {"startPeriod": 0, "limit": 20000.0, "dischargeLimit": -8000.0}
    assert clear_payload(c, "1.6") == {"id": 1} and clear_payload(v, "2.1") == {"chargingProfileId": 1}
    assert clear_payload(v, "2.1", "ChargingStationExternalConstraints") == {"chargingProfileCriteria": {
        "evseId": 1, "chargingProfilePurpose": "ChargingStationExternalConstraints", "stackLevel": 1}}


def test_what_is_worth_sending():
    c = v21()
    base = Command(SETPOINT, setpoint_kw=3.0, charge_max_kw=11.0, discharge_max_kw=7.0, v2x=True)
    assert differs(None, base, 0.2)
    def setpoint(kw: float) -> Command:
        return Command(SETPOINT, setpoint_kw=kw, charge_max_kw=11.0, discharge_max_kw=7.0, v2x=True)
    assert not differs(base, setpoint(3.1), 0.2) and differs(base, setpoint(3.3), 0.2)
    assert differs(Command(SETPOINT, setpoint_kw=0.1, v2x=True), Command(SETPOINT, setpoint_kw=0.0, v2x=True), 0.2)
    plan = quarter_plan(NOW, [-7.0])
    assert differs(base, Command(SETPOINT, setpoint_kw=3.0, charge_max_kw=11.0, discharge_max_kw=7.0, v2x=True,
                                 plan=plan), 0.2)
    limit = Command(LIMIT, limit=limit_for_target(c, -7.0))
    assert differs(limit, Command(CLEAR), 0.2) and not differs(Command(CLEAR), Command(CLEAR), 0.2)
    assert Command(PLAN, plan=plan, v2x=True).operation_mode("2.1") == "CentralSetpoint"
    assert limit.operation_mode("2.1") == "ChargingOnly" and limit.operation_mode("2.0.1") is None


# ------------------------------------------------------------------ charging needs


def v2x_needs(**v2x_parameters) -> dict:
    parameters = {"max_charge_power": 11000, "min_charge_power": 1400, "max_discharge_power": 10000,
                  "min_discharge_power": 0, "ev_target_energy_request": 20000, "ev_min_v2x_energy_request": -15000,
                  "ev_max_v2x_energy_request": 30000}
    parameters.update(v2x_parameters)
    return {"requested_energy_transfer": "AC_BPT", "departure_time": "2027-01-15T16:00:00Z",
            "v2x_charging_parameters": {k: v for k, v in parameters.items() if v is not None}}


def test_a_2_1_cars_needs_are_decoded():
    needs, problems = decode_charging_needs(v2x_needs(), 230.0, 3, NOW)
    assert problems == []
    assert needs.bidirectional_ev and needs.transfer_mode == "AC_BPT"
    assert (needs.max_charge_kw, needs.min_charge_kw, needs.max_discharge_kw) == (11.0, 1.4, 10.0)
    assert (needs.energy_request_kwh, needs.min_v2x_energy_kwh, needs.max_v2x_energy_kwh) == (20.0, -15.0, 30.0)
    assert needs.departure_s == NOW + 8 * 3600
    per_phase, _ = decode_charging_needs(v2x_needs(max_discharge_power=3000, max_discharge_power_l2=3000,
                                                   max_discharge_power_l3=3000), 230.0, 3, NOW)
    assert per_phase.max_discharge_kw == 9.0
    one_way, _ = decode_charging_needs(v2x_needs(max_discharge_power=0), 230.0, 3, NOW)
    assert not one_way.bidirectional_ev


def test_a_2_0_1_cars_needs_are_decoded_from_ac_and_dc_parameters():
    ac = {"requested_energy_transfer": "AC_single_phase", "departure_time": "2027-01-15T09:00:00+01:00",
          "ac_charging_parameters": {"energy_amount": 12000, "ev_min_current": 6, "ev_max_current": 16,
                                     "ev_max_voltage": 400}}
    needs, problems = decode_charging_needs(ac, 230.0, 3, NOW)
    assert problems == [] and not needs.bidirectional_ev
    assert needs.max_charge_kw == pytest.approx(3.68) and needs.min_charge_kw == pytest.approx(1.38)
    assert needs.energy_request_kwh == 12.0 and needs.departure_s == NOW
    dc = {"requested_energy_transfer": "DC", "dc_charging_parameters": {
        "ev_max_current": 200, "ev_max_voltage": 500, "ev_max_power": 50000, "energy_amount": 30000,
        "state_of_charge": 40, "ev_energy_capacity": 60000}}
    needs, problems = decode_charging_needs(dc, 230.0, 3, NOW)
    assert problems == [] and (needs.max_charge_kw, needs.soc_pct, needs.capacity_kwh) == (50.0, 40.0, 60.0)


HOSTILE = [math.nan, math.inf, -math.inf, "11000", None, True, -5.0, 10**400, 1e300, [], {}]


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_a_hostile_number_is_left_out_and_named(value):
    needs, problems = decode_charging_needs(v2x_needs(max_discharge_power=value, ev_target_energy_request=value),
                                            230.0, 3, NOW)
    assert needs is not None and needs.max_discharge_kw is None and not needs.bidirectional_ev
    assert needs.max_charge_kw == 11.0  # the rest is kept
    if value is not None:
        assert any(p.startswith("v2xChargingParameters.maxDischargePower: ") for p in problems), problems
        if value != -5.0:  # a negative energy request is the car being above its target: 0 to charge
            assert any(p.startswith("v2xChargingParameters.evTargetEnergyRequest: ") for p in problems), problems


def test_messages_nothing_can_be_made_of():
    for needs in ("junk", None, [], {}, {"requested_energy_transfer": "Teleport"}):
        decoded, problems = decode_charging_needs(needs, 230.0, 3, NOW)
        assert decoded is None and len(problems) == 1
    needs, problems = decode_charging_needs({"requested_energy_transfer": "DC", "departure_time": "tomorrow",
                                             "dc_charging_parameters": "x"}, 230.0, 3, NOW)
    assert needs.departure_s is None and len(problems) == 2
    _, problems = decode_charging_needs({"requested_energy_transfer": "DC", "departure_time": "1999-01-01T00:00:00Z"},
                                        230.0, 3, NOW)
    assert problems and "departureTime" in problems[0]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
fields = st.sampled_from(["ac_charging_parameters", "dc_charging_parameters", "v2x_charging_parameters",
                          "requested_energy_transfer", "departure_time", "max_charge_power", "ev_max_current",
                          "max_discharge_power", "ev_min_v2x_energy_request", "state_of_charge"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(fields, json_values | st.dictionaries(fields, json_values, max_size=5), max_size=6))
def test_the_decoder_never_raises_and_keeps_only_sound_numbers(needs):
    needs.setdefault("requested_energy_transfer", "AC_BPT")
    decoded, _ = decode_charging_needs(needs, 230.0, 3, NOW)
    if decoded is None:
        return
    for name in ("max_charge_kw", "min_charge_kw", "max_discharge_kw", "min_discharge_kw", "energy_request_kwh",
                 "capacity_kwh", "soc_pct"):
        value = getattr(decoded, name)
        assert value is None or (math.isfinite(value) and value >= 0), (name, value)


# ------------------------------------------------------------------ features


def test_features_from_the_device_model():
    results = [{"attribute_status": "Accepted", "attribute_value": "true",
                "component": {"name": "V2XChargingCtrlr", "evse": {"id": 1}}, "variable": {"name": "Enabled"}},
               {"attribute_status": "Accepted", "attribute_value": "ChargingOnly,CentralSetpoint,CentralFrequency",
                "component": {"name": "V2XChargingCtrlr", "evse": {"id": 1}},
                "variable": {"name": "SupportedOperationModes"}}]
    learned = from_variables(results, 1)
    assert learned == DeviceModelV2x(True, True, ("ChargingOnly", "CentralSetpoint", "CentralFrequency"))
    features = resolve(v21(), "2.1", learned)
    assert (features.bidirectional, features.afrr_signal, features.source) == (True, True, "device_model")
    assert resolve(v21(v2x={"afrr_signal": False}), "2.1", learned).afrr_signal is False
    assert resolve(v21(), "2.0.1", learned).bidirectional is False  # never on a 2.0.1 link
    assert from_variables([{**results[0], "attribute_status": "Rejected"}], 1) is None  # refused: ask the report
    unknown = from_variables([{**results[0], "attribute_status": "UnknownComponent"}], 1)
    assert unknown == DeviceModelV2x(False) and not resolve(v21(), "2.1", unknown).bidirectional
    assert resolve(v21(), "2.1", None).source == "default" and not resolve(v21(), "2.1", None).bidirectional
    assert resolve(v21(v2x={"bidirectional": True, "afrr_signal": False}), "2.1", None).source == "profile"
    report = [{"component": {"name": "V2XChargingCtrlr", "evse": {"id": 1}}, "variable": {"name": "Enabled"},
               "variable_attribute": [{"type": "Actual", "value": "false"}]},
              {"component": {"name": "V2XChargingCtrlr", "evse": {"id": 1}},
               "variable": {"name": "SupportedOperationModes"},
               "variable_attribute": [{"type": "Actual", "value": "CentralSetpoint"}]}]
    disabled = from_report(report, 1)
    assert disabled.enabled is False and not resolve(v21(), "2.1", disabled).bidirectional
    assert from_report(report, 2) == DeviceModelV2x(False)


# ================================================================== on the wire

CYCLE_S = 2.0  # "within one cycle"


async def until(predicate, timeout_s=3.0, what="condition"):
    await until_step(predicate, timeout_s=timeout_s, what=what)


@contextlib.asynccontextmanager
async def site(tmp_path, chargers, events, *, import_limit_kw=None, export_limit_kw=None, cfg=None):
    """Drivers for ``chargers`` made as the daemon makes them (prepare_site, then create), sharing one
    central system; yields (server settings, drivers by asset id)."""
    cfg = cfg or server_cfg(tmp_path)
    profile = SimpleNamespace(ocpp=cfg, assets=chargers, grid=SimpleNamespace(
        import_limit_kw=import_limit_kw, export_limit_kw=export_limit_kw))
    ocpp_driver.prepare_site(profile)
    try:
        drivers = {c.id: ocpp_driver.create(c, 1.0, events) for c in chargers}
    finally:
        configure_site(None)
        configure_failsafe({})
    tasks = [asyncio.create_task(d.run()) for d in drivers.values()]
    try:
        await until(lambda: shared_system(cfg) is not None and shared_system(cfg).started.is_set(),
                    what="the central system")
        yield cfg, drivers
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def v2x_ev(**overrides) -> EvSpec:
    values = dict(id_tag=TAG, bidirectional=True, capacity_kwh=60.0, soc_pct=50.0, min_soc_pct=20.0,
                  target_soc_pct=80.0, max_power_kw=11.0, max_discharge_kw=10.0,
                  departure_s=float(int(time.time()) + 6 * 3600))
    values.update(overrides)
    return EvSpec(**values)


async def test_a_bidirectional_station_is_learned_decoded_and_dispatched_both_ways_beside_1_6_and_2_0_1(tmp_path):
    events = Events()
    chargers = [charger("v2x", "CPV", ocpp_version="2.1", limit_unit="W", max_power_kw=11.0),
                charger("ac201", "CPA", ocpp_version="2.0.1"),
                charger("ac16", "CP16", ocpp_version="1.6", max_current_a=16.0)]
    ratings = [11.0, 22.08, 11.04]
    async with site(tmp_path, chargers, events, import_limit_kw=40.0, export_limit_kw=8.0) as (cfg, drivers):
        specs = [StationSpec("CPV", "2.1", bidirectional=True, nameplate_kw=11.0, meter_interval_s=0.2),
                 StationSpec("CPA", "2.0.1", meter_interval_s=0.2), StationSpec("CP16", "1.6", meter_interval_s=0.2)]
        async with OcppSimulator(url(cfg), specs) as sim:
            v2x, ac201, ac16 = sim.stations
            features = await events.wait("charger_features", "v2x")
            assert features == {"charge_point_id": "CPV", "bidirectional": True, "afrr_signal": False,
                                "source": "device_model"}
            # The failsafe max profiles, at each charger's share of the 40 kW connection (by rating).
            for station, share_kw, value in ((v2x, 40 * 11.0 / sum(ratings), None), (ac201, None, 29.0),
                                             (ac16, None, 14.5)):
                record = await station.next_profile(after=0)
                assert record.purpose in ("ChargingStationMaxProfile", "ChargePointMaxProfile") and record.accepted
                assert record.stack_level == 0 and record.charging_profile_id == 2 and record.target_id == 0
                assert record.limit == (pytest.approx(share_kw * 1000, abs=0.2) if value is None else value)
            assert v2x.profiles[0].discharge_limit == -8000.0  # the only charger that may discharge

            ev = v2x_ev()
            assert await v2x.plug_in(ev)
            assert v2x.charging_needs_answers == ["Accepted"]
            needs = await events.wait("ev_charging_needs", "v2x")
            assert needs["bidirectional"] and needs["max_discharge_kw"] == 10.0
            started = await events.wait("v2x_session_started", "v2x")
            assert started["transaction_id"] == v2x.transaction_id and started["max_charge_kw"] == 11.0
            reading = drivers["v2x"].reading()
            assert (reading.p_min_kw, reading.p_max_kw) == (-11.0, 10.0)
            status = reading.ev
            assert status.bidirectional and status.departure_s == ev.departure_s
            assert status.energy_to_target_kwh == pytest.approx(18.0, abs=0.1)  # 30 % of 60 kWh
            assert status.energy_above_min_kwh == pytest.approx(18.0, abs=0.1)
            assert status.capacity_kwh == 60.0 and status.soc_pct == pytest.approx(50.0, abs=0.5)

            driver = drivers["v2x"]
            sent = time.monotonic()
            driver.set_target_kw(5.0)  # upward: discharge 5 kW
            await until(lambda: v2x.power_w == pytest.approx(-5000.0, abs=1), timeout_s=CYCLE_S,
                        what="the station discharging")
            record = v2x.profiles[-1]
            assert (record.operation_mode, record.setpoint, record.limit, record.discharge_limit) == (
                "CentralSetpoint", -5000.0, 11000.0, -10000.0)
            print(f"set_target_kw(+5) -> the station discharges: {1000 * (time.monotonic() - sent):.0f} ms")
            await until(lambda: (driver.reading().p_kw or 0) == pytest.approx(5.0, abs=0.01), what="metered export")
            await until(lambda: driver.reading().ev.energy_discharged_kwh > 0, what="discharged energy")
            driver.set_target_kw(-7.0)  # downward: charge 7 kW
            await until(lambda: v2x.power_w == pytest.approx(7000.0, abs=1), timeout_s=CYCLE_S,
                        what="the station charging")
            assert driver.reading().ev.operation_mode == "CentralSetpoint"

            # Released without a plan: the gateway's profile is cleared; the failsafe stays.
            driver.set_target_kw(None)
            await until(lambda: any(r.action == "ClearChargingProfile" for r in v2x.requests), what="the clear")
            await until(lambda: v2x.active_period().profile_id is None, what="no profile of the gateway's")
            assert [p.profile_id for p in v2x.stack.profiles] == [2]

            # 2.0.1 and 1.6 as before: single-period limits, no V2X; a 2.0.1 car's needs are decoded.
            assert await ac201.plug_in(EvSpec(id_tag=TAG, max_power_kw=11.0, send_charging_needs=True,
                                              departure_s=ev.departure_s))
            assert await ac16.plug_in(EvSpec(id_tag=TAG))
            await events.wait("ev_charging_needs", "ac201")
            reading = drivers["ac201"].reading()
            assert reading.p_max_kw == 0.0 and reading.p_min_kw == pytest.approx(-22.08)
            assert not reading.ev.bidirectional and reading.ev.max_charge_kw == pytest.approx(11.0, abs=0.7)
            assert reading.ev.departure_s == ev.departure_s
            assert drivers["ac16"].reading().ev is None and drivers["ac16"].reading().p_max_kw == 0.0
            for asset_id, station, limit in (("ac201", ac201, 10.1), ("ac16", ac16, 10.1)):
                drivers[asset_id].set_target_kw(-7.0)
                record = await station.next_profile(after=1)
                assert (record.purpose, record.limit, record.unit, len(record.periods)) == (
                    "TxDefaultProfile", limit, "A", 1)
                assert "operation_mode" not in record.periods[0] and record.operation_mode is None
            assert not events.of("charger_features", "ac201") and not events.of("v2x_session_started", "ac201")

            await v2x.unplug()
            stopped = await events.wait("v2x_session_stopped", "v2x")
            assert stopped["energy_discharged_kwh"] > 0 and stopped["energy_charged_kwh"] > 0
    assert not events.of("command_failed")


async def test_a_plan_is_run_on_release_and_outlives_the_gateway(tmp_path):
    events = Events()
    now = time.time()
    quarter = now - 300  # the plan's quarter hour in force began 5 min ago
    plan = PowerPlan(slots=((quarter, quarter + 900, -6.0), (quarter + 900, quarter + 1800, -5.0)), made_at_s=now)
    chargers = [charger("v2x", "CPV", ocpp_version="2.1", limit_unit="W", max_power_kw=11.0),
                charger("ac201", "CPA", ocpp_version="2.0.1")]
    cfg = server_cfg(tmp_path)
    specs = [StationSpec("CPV", "2.1", bidirectional=True, nameplate_kw=11.0),
             StationSpec("CPA", "2.0.1", reconnect_cap_s=5.0)]
    async with OcppSimulator(url(cfg), specs) as sim:
        v2x, ac201 = sim.stations
        async with site(tmp_path, chargers, events, cfg=cfg) as (_, drivers):
            await v2x.wait_connected()
            await ac201.wait_connected()
            assert await v2x.plug_in(v2x_ev())
            assert await ac201.plug_in(EvSpec(id_tag=TAG, max_power_kw=22.0, capacity_kwh=80.0))
            await events.wait("v2x_session_started", "v2x")
            for asset_id in ("v2x", "ac201"):
                drivers[asset_id].set_target_kw(-9.0)
                drivers[asset_id].set_plan(plan)
            await until(lambda: v2x.power_w == pytest.approx(9000.0, abs=1), what="the V2X target held")
            record = v2x.profiles[-1]
            assert [(p.get("operation_mode"), p.get("setpoint")) for p in record.periods] == [
                ("CentralSetpoint", 9000.0), ("CentralSetpoint", 6000.0), ("CentralSetpoint", 5000.0)]
            await until(lambda: ac201.power_w == pytest.approx(13.0 * 690, abs=1), what="the 2.0.1 target held")
            first = ac201.profiles[-1]
            assert [p["limit"] for p in first.periods] == [13.0, 8.6, 7.2]
            # Period 0 expires: the same profile goes again before half the hold (10 s) has run out.
            refresh = await ac201.next_profile(timeout_s=0.4 * 10.0 + 1.0)
            assert refresh.periods[:1] == first.periods[:1] and refresh.received_mono - first.received_mono < 5.0

            drivers["v2x"].set_target_kw(None)  # released with a plan: the plan alone, from now
            await until(lambda: v2x.power_w == pytest.approx(6000.0, abs=1), what="the V2X station on its plan")
            assert len(v2x.profiles[-1].periods) == 2 and not any(r.action == "ClearChargingProfile"
                                                                  for r in v2x.requests)
        # The gateway is gone; the 2.0.1 station still holds the target, then follows the plan on its clock.
        await until(lambda: not ac201.connected.is_set(), what="the stations see the gateway gone")
        assert ac201.power_w == pytest.approx(13.0 * 690, abs=1)
        ac201.clock_offset_s = chargers[1].hold_s(1.0) + 1.0
        await until(lambda: ac201.power_w == pytest.approx(8.6 * 690, abs=1), what="the plan's first slot")
        for station in (v2x, ac201):
            station.clock_offset_s = quarter + 900 + 5 - time.time()  # into the next quarter hour
        await until(lambda: ac201.power_w == pytest.approx(7.2 * 690, abs=1), what="the 2.0.1 plan's next slot")
        await until(lambda: v2x.power_w == pytest.approx(5000.0, abs=1), what="the V2X plan's next slot")
        for station in (v2x, ac201):
            station.clock_offset_s = quarter + 1800 + 5 - time.time()  # after the plan: the charger's default
        await until(lambda: v2x.active_period().profile_id is None and ac201.active_period().profile_id is None,
                    what="the plans' end")


async def test_a_station_following_the_afrr_signal_and_one_refusing_it(tmp_path):
    events = Events()
    chargers = [charger("f", "CPF", ocpp_version="2.1", limit_unit="W", max_power_kw=11.0),
                charger("r", "CPR", ocpp_version="auto", limit_unit="W", max_power_kw=11.0,
                        v2x={"afrr_signal": True})]
    async with site(tmp_path, chargers, events) as (cfg, drivers):
        specs = [StationSpec("CPF", "2.1", bidirectional=True, afrr_signal=True, nameplate_kw=11.0),
                 StationSpec("CPR", "2.1", bidirectional=True, nameplate_kw=11.0)]
        async with OcppSimulator(url(cfg), specs) as sim:
            follower, refuser = sim.stations
            assert not drivers["f"].wants_dispatch_context  # not learned yet
            assert drivers["r"].wants_dispatch_context  # the profile says so
            for station in sim.stations:
                await station.wait_connected()
                assert await station.plug_in(v2x_ev())
            await events.wait("v2x_session_started", "f")
            await events.wait("v2x_session_started", "r")
            assert drivers["f"].wants_dispatch_context  # learned: CentralFrequency is among its modes
            context = DispatchContext(baseline_kw=-2.0, band_up_kw=6.0, band_down_kw=3.0, activation_level=0.5)
            for driver in drivers.values():
                driver.set_target_kw(1.0)
                driver.set_dispatch_context(context)
            # 2 kW charging, less half of the 6 kW upward band: 1 kW discharging.
            await until(lambda: follower.power_w == pytest.approx(-1000.0, abs=1), timeout_s=CYCLE_S,
                        what="the follower at the signal")
            assert follower.afrr_signals[-1].signal == 500
            record = next(p for p in follower.profiles if p.operation_mode == "CentralFrequency")
            assert record.periods[0]["v2x_baseline"] == 2000.0 and record.accepted
            drivers["f"].set_dispatch_context(DispatchContext(-2.0, 6.0, 3.0, -1.0))
            await until(lambda: follower.power_w == pytest.approx(5000.0, abs=1), timeout_s=CYCLE_S,
                        what="the follower at a full downward signal")
            assert [s.signal for s in follower.afrr_signals] == [500, -1000]

            fallback = await events.wait("charging_profile_fallback", "r")
            assert fallback == {"charge_point_id": "CPR", "from_operation_mode": "CentralFrequency",
                                "to_operation_mode": "CentralSetpoint", "reason": "SetChargingProfile Rejected"}
            await until(lambda: refuser.power_w == pytest.approx(-1000.0, abs=1), what="the refuser at its setpoint")
            assert refuser.profiles[-1].operation_mode == "CentralSetpoint" and refuser.profiles[-1].accepted
            assert not refuser.afrr_signals

            drivers["f"].set_dispatch_context(None)  # no activation: back to CentralSetpoint
            await until(lambda: follower.power_w == pytest.approx(-1000.0, abs=1) and
                        follower.profiles[-1].operation_mode == "CentralSetpoint", what="the follower on a setpoint")
    assert not events.of("command_failed")


async def test_charging_needs_with_hostile_values_are_answered_and_never_break_the_link(tmp_path):
    """A raw 2.1 client: NaN, infinity and 10**400 in the needs (JSON allows what Python writes), another
    EVSE's needs, and needs nothing can be made of."""
    events = Events()
    async with site(tmp_path, [charger("v", "CPX", ocpp_version="2.1")], events) as (cfg, drivers):
        async with connect(f"{url(cfg)}/CPX", subprotocols=["ocpp2.1"]) as link:
            answers: dict[str, dict] = {}
            requests: list[str] = []
            profiles: list[dict] = []

            async def send(uid: str, action: str, payload: dict) -> dict:
                await link.send(json.dumps([2, uid, action, payload]).replace('"__1e400__"', "1" + "0" * 400))
                while uid not in answers:
                    message = json.loads(await asyncio.wait_for(link.recv(), 3.0))
                    if message[0] == 2:
                        requests.append(message[2])
                        if message[2] == "SetChargingProfile":
                            profiles.append(message[3])
                            await link.send(json.dumps([3, message[1], {"status": "Accepted"}]))
                        else:  # nothing else is understood here, ClearChargingProfile included
                            await link.send(json.dumps([4, message[1], "NotImplemented", "", {}]))
                    else:
                        answers[message[1]] = message
                return answers[uid]

            await send("b", "BootNotification", {"chargingStation": {"model": "m", "vendorName": "v"},
                                                 "reason": "PowerUp"})
            hostile = {"requestedEnergyTransfer": "DC_BPT", "departureTime": "2999-01-01T00:00:00Z",
                       "v2xChargingParameters": {"maxChargePower": float("nan"), "maxDischargePower": float("inf"),
                                                 "evTargetEnergyRequest": "__1e400__", "minChargePower": -5,
                                                 "evMinV2XEnergyRequest": -8000}}
            answer = await send("n1", "NotifyEVChargingNeeds", {"evseId": 1, "chargingNeeds": hostile})
            assert answer[:1] == [3] and answer[2] == {"status": "Accepted"}
            needs = drivers["v"].session.ev.needs
            assert needs.max_charge_kw is None and needs.max_discharge_kw is None and needs.departure_s is None
            assert needs.energy_request_kwh is None and needs.min_v2x_energy_kwh == -8.0
            assert (await send("n2", "NotifyEVChargingNeeds", {"evseId": 2, "chargingNeeds": hostile}))[2] == {
                "status": "Rejected"}
            assert (await send("n3", "NotifyEVChargingNeeds", {"evseId": 1, "chargingNeeds": {
                "requestedEnergyTransfer": "WPT", "availableEnergyTransfer": ["WPT"]}}))[2] == {"status": "Accepted"}
            schedule = {"id": 1, "chargingRateUnit": "W", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 7000}]}
            assert (await send("s", "NotifyEVChargingSchedule", {"timeBase": "2026-12-04T10:00:00Z", "evseId": 1,
                                                                "chargingSchedule": schedule}))[2] == {
                "status": "Accepted"}
            assert (await send("h", "Heartbeat", {}))[0] == 3  # the link is fine

            # A charger that refuses ClearChargingProfile is released with a limit at its rating.
            async def pump(predicate, what: str) -> None:
                """Heartbeats, reading what the central system sends meanwhile, until ``predicate()``."""
                deadline = time.monotonic() + 3.0
                for n in range(1000):
                    await send(f"{what}{n}", "Heartbeat", {})
                    if predicate():
                        return
                    assert time.monotonic() < deadline, f"timed out waiting for {what}"
                    await asyncio.sleep(0.02)

            drivers["v"].set_target_kw(-7.0)
            await pump(lambda: len(profiles) == 1, "the limit")
            drivers["v"].set_target_kw(None)
            await pump(lambda: len(profiles) == 2, "the release")
            assert "ClearChargingProfile" in requests
            assert period0(profiles[-1]) == {"startPeriod": 0, "limit": 32.0, "numberPhases": 3,
                                             "operationMode": "ChargingOnly"}


async def test_a_refused_failsafe_is_one_event_and_a_fallback_clears_the_old_purpose_first(tmp_path):
    events = Events()
    chargers = [charger("x", "CPX", ocpp_version="2.0.1", profile_purpose="ChargingStationExternalConstraints")]
    async with site(tmp_path, chargers, events, import_limit_kw=11.0) as (cfg, drivers):
        spec = StationSpec("CPX", "2.0.1", reject_purposes=("ChargingStationMaxProfile",
                                                            "ChargingStationExternalConstraints"))
        async with OcppSimulator(url(cfg), [spec]) as sim:
            station = sim.stations[0]
            failed = await events.wait("command_failed")
            assert failed["purpose"] == "ChargingStationMaxProfile" and failed["limit"] == 15.9
            assert not drivers["x"].reading().degraded  # the failsafe is not the asset's target
            drivers["x"].set_target_kw(-7.0)
            await events.wait("charging_profile_fallback")
            record = await station.next_profile(after=2)
            assert (record.purpose, record.accepted) == ("TxDefaultProfile", True)
            actions = [r.action for r in station.requests]
            refused_at = [i for i, a in enumerate(actions) if a == "SetChargingProfile"][1]
            assert actions[refused_at + 1] == "ClearChargingProfile"  # then the fallback profile
            await asyncio.sleep(0.3)
            assert len(events.of("command_failed")) == 1 and len(station.profiles) == 3  # no retry of the failsafe


async def test_the_probe_shows_a_2_1_chargers_v2x_features():
    class Report:
        def __init__(self):
            self.lines, self.fragments = [], []

        def line(self, text=""):
            self.lines.append(text)

        def fail(self, text):
            raise AssertionError(text)

        def fragment(self, partial_profile, check_with=None):
            self.fragments.append(partial_profile)

    port, report = free_port(), Report()
    args = argparse.Namespace(host="127.0.0.1", port=port, path="/ocpp", timeout_s=5.0)
    spec = StationSpec("CP-21", "2.1", bidirectional=True, afrr_signal=True, nameplate_kw=11.0)
    probing = asyncio.create_task(probe(args, report))
    await asyncio.sleep(0.2)
    async with OcppSimulator(f"ws://127.0.0.1:{port}/ocpp", [spec]):
        assert await asyncio.wait_for(probing, 10.0) == 1
    text = "\n".join(report.lines)
    assert "OCPP 2.1 (subprotocol ocpp2.1)" in text
    assert "bidirectional (CentralSetpoint): yes; aFRR signal (CentralFrequency): yes" in text
    asset = report.fragments[0]["assets"][0]
    assert asset["ocpp_version"] == "2.1" and asset["v2x"] == {"bidirectional": True, "afrr_signal": True}
