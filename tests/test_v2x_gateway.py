"""Bidirectional EVs as VPP assets, on the wire: the gateway in process, simulated OCPP 2.1,
2.0.1 and 1.6 stations, the VPP over a real Mosquitto.

- An upward activation makes a 2.1 bidirectional EV discharge and a downward one makes it
  charge, within one cycle; an EV at its minimum state of charge is never discharged, one
  whose departure energy leaves no room keeps charging; the 2.0.1 and 1.6 chargers on the
  same site get single-period limits as before.
- The car's charging needs (ISO 15118, NotifyEVChargingNeeds) make the plan, and new needs
  change it; when the gateway stops, the station follows its last multi-period profile on
  its own clock.
"""

from __future__ import annotations

import time

import pytest

from edge.config.profile import Profile
from simulators.ocpp import EvSpec, OcppSimulator, StationSpec
from simulators.vpp import VppSimulator
from tests.conftest import free_port
from tests.test_gateway import SITE, running_gateway, until

CYCLE_S = 1.0


def site_profile(tmp_path, broker_port: int, ocpp_port: int, chargers: list[dict]) -> Profile:
    return Profile.model_validate({
        "site": {"id": SITE},
        "control": {"cycle_s": CYCLE_S},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": broker_port},
                   "spool": {"path": str(tmp_path / "spool.sqlite"), "max_mb": 16}},
        "ocpp": {"host": "127.0.0.1", "port": ocpp_port, "authorize": {"mode": "accept_all"},
                 "id_tag_salt_file": str(tmp_path / "salt")},
        "ev_charging": {"default_departure_after_h": 8, "default_energy_kwh": 10, "v2x_min_soc_pct": 30},
        "assets": [{"kind": "ev_charger", "driver": "ocpp", "max_current_a": 16, "deadband_kw": 0.1, **c}
                   for c in chargers],
    })


def ev_block(vpp, asset_id: str):
    return vpp.telemetry[-1]["assets"][asset_id].get("ev") if vpp.telemetry else None


def plans(vpp, asset_id: str):
    return [e["detail"] for e in vpp.events if e["type"] == "ev_plan" and e.get("asset_id") == asset_id]


async def test_a_bidirectional_ev_discharges_up_and_charges_down_within_its_battery_rules(tmp_path, mosquitto):
    ocpp_port = free_port()
    now = time.time()
    profile = site_profile(tmp_path, mosquitto.port, ocpp_port, [
        {"id": "v2x", "charge_point_id": "CP21", "ocpp_version": "2.1"},
        {"id": "v2x_low", "charge_point_id": "CP22", "ocpp_version": "2.1"},
        {"id": "v2x_leaving", "charge_point_id": "CP23", "ocpp_version": "2.1"},
        {"id": "ev201", "charge_point_id": "CP201", "ocpp_version": "2.0.1"},
        {"id": "ev16", "charge_point_id": "CP16", "ocpp_version": "1.6"},
    ])
    specs = [StationSpec(cp, version, max_current_a=16, meter_interval_s=0.2, bidirectional=version == "2.1")
             for cp, version in (("CP21", "2.1"), ("CP22", "2.1"), ("CP23", "2.1"), ("CP201", "2.0.1"), ("CP16", "1.6"))]
    async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp, \
            OcppSimulator(f"ws://127.0.0.1:{ocpp_port}/ocpp", specs) as sim:
        for station in sim.stations:
            await station.wait_connected()
        v2x, low, leaving, cp201, cp16 = sim.stations
        # Plenty above the 30 % floor and at its target (no plan to charge: room down), leaving in
        # 4 h; at the floor; leaving in 20 min needing 6 kWh, more than 11 kW can charge by then.
        assert await v2x.plug_in(EvSpec(id_tag="T1", capacity_kwh=60, soc_pct=60, target_soc_pct=60, bidirectional=True,
                                        min_soc_pct=20, departure_s=now + 4 * 3600))
        assert await low.plug_in(EvSpec(id_tag="T2", capacity_kwh=60, soc_pct=30, target_soc_pct=40, bidirectional=True,
                                        min_soc_pct=20, departure_s=now + 4 * 3600))
        assert await leaving.plug_in(EvSpec(id_tag="T3", capacity_kwh=60, soc_pct=50, target_soc_pct=60,
                                            bidirectional=True, min_soc_pct=20, departure_s=now + 20 * 60))
        assert await cp201.plug_in(EvSpec(id_tag="T4"))
        assert await cp16.plug_in(EvSpec(id_tag="T5"))

        await until(lambda: (ev_block(vpp, "v2x") or {}).get("discharge_max_kw", 0) > 5, 10,
                    "the bidirectional EV's discharge band in telemetry")
        block = ev_block(vpp, "v2x")
        assert block["bidirectional"] is True
        assert block["soc_pct"] == pytest.approx(60, abs=1) and block["min_soc_pct"] == 30
        await until(lambda: (ev_block(vpp, "v2x_low") or {}).get("limited_by") == "minimum_soc", 5, "the floor reached")
        assert ev_block(vpp, "v2x_low")["discharge_max_kw"] == 0
        await until(lambda: (ev_block(vpp, "v2x_leaving") or {}).get("limited_by") == "departure_energy", 5,
                    "the departure rule")
        assert ev_block(vpp, "v2x_leaving")["discharge_max_kw"] == 0
        assert plans(vpp, "v2x")[-1]["departure_source"] == "ev"

        # Upward, more than the site can give: everybody stops charging, the EV with energy to
        # spare discharges at its maximum within one cycle.
        sent_mono = time.monotonic()
        await vpp.send_setpoint(60.0, valid_s=60)
        await until(lambda: v2x.power_w < -5000, 2 * CYCLE_S, "the V2X EV discharging")
        assert time.monotonic() - sent_mono <= CYCLE_S + 0.3
        discharging = v2x.profiles[-1]
        assert discharging.operation_mode == "CentralSetpoint" and discharging.setpoint < 0
        await until(lambda: cp201.power_w < 100 and cp16.power_w < 100, 3, "the one-way chargers off")
        for one_way in (cp201, cp16):  # as before: a limit (then its plan's quarter hours), no V2X
            record = one_way.profiles[-1]
            assert (record.limit, record.operation_mode, record.setpoint) == (0.0, None, None)
        assert low.power_w >= 0 and low.min_soc_seen_pct >= 30 - 0.01
        assert leaving.power_w > 8000, "the EV leaving soon keeps charging"
        await until(lambda: ev_block(vpp, "v2x")["energy_discharged_kwh"] > 0, 5, "discharged energy in telemetry")
        assert ev_block(vpp, "v2x")["operation_mode"] == "CentralSetpoint"

        # Downward: the V2X EV, the only one not charging at its maximum already, charges.
        sent_mono = time.monotonic()
        await vpp.send_setpoint(-8.0, valid_s=60)
        await until(lambda: v2x.power_w > 5000, 2 * CYCLE_S, "the V2X EV charging")
        assert time.monotonic() - sent_mono <= CYCLE_S + 0.3
        assert low.min_soc_seen_pct >= 30 - 0.01


async def test_the_cars_needs_make_the_plan_and_the_station_keeps_it_when_the_gateway_stops(tmp_path, mosquitto):
    ocpp_port = free_port()
    now = time.time()
    profile = site_profile(tmp_path, mosquitto.port, ocpp_port, [
        {"id": "v2x", "charge_point_id": "CP21", "ocpp_version": "2.1"}])
    spec = StationSpec("CP21", "2.1", max_current_a=16, meter_interval_s=0.2, bidirectional=True)
    async with OcppSimulator(f"ws://127.0.0.1:{ocpp_port}/ocpp", [spec]) as sim:
        station = sim.stations[0]
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await station.wait_connected()
            ev = EvSpec(id_tag="T1", capacity_kwh=60, soc_pct=50, target_soc_pct=60, bidirectional=True,
                        departure_s=now + 6 * 3600)
            assert await station.plug_in(ev)
            first = await until(lambda: [p for p in plans(vpp, "v2x") if p["departure_source"] == "ev"], 10,
                                "a plan on the car's needs")
            assert first[-1]["energy_source"] == "ev" and first[-1]["energy_needed_kwh"] == pytest.approx(6.0, abs=0.3)
            # The car now wants to leave in 1 h: a new plan for the new departure.
            ev.departure_s = now + 3600
            assert await station.send_charging_needs() == "Accepted"
            replanned = await until(lambda: [p for p in plans(vpp, "v2x")
                                             if p["departure"] != first[-1]["departure"]], 5, "a new plan")
            assert replanned[-1]["departure_source"] == "ev"
            await until(lambda: len((station.profiles[-1].periods or [])) > 1, 5, "a multi-period profile")
        # The gateway is gone: the station runs the last profile on its own clock.
        installed = station.active_period()
        assert installed.period_index is not None
        station.clock_offset_s = 1800.0  # half an hour later
        await until(lambda: station.active_period().period_index != installed.period_index, 3,
                    "the station moving on through its schedule")
        assert station.active_period().power_w >= 0, "the plan charges, it never discharges"


async def test_a_charger_with_its_own_afrr_loop_gets_the_sites_activation_as_afrr_signal(tmp_path, mosquitto):
    ocpp_port = free_port()
    profile = site_profile(tmp_path, mosquitto.port, ocpp_port, [
        {"id": "v2x", "charge_point_id": "CP21", "ocpp_version": "2.1"}])
    spec = StationSpec("CP21", "2.1", max_current_a=16, meter_interval_s=0.2, bidirectional=True, afrr_signal=True)
    async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp, \
            OcppSimulator(f"ws://127.0.0.1:{ocpp_port}/ocpp", [spec]) as sim:
        station = sim.stations[0]
        await station.wait_connected()
        assert await station.plug_in(EvSpec(id_tag="T1", capacity_kwh=60, soc_pct=60, target_soc_pct=60,
                                            bidirectional=True, departure_s=time.time() + 4 * 3600))
        await until(lambda: (ev_block(vpp, "v2x") or {}).get("discharge_max_kw", 0) > 5, 10, "the V2X band")
        features = [e["detail"] for e in vpp.events if e["type"] == "charger_features"]
        assert features and features[-1]["afrr_signal"] is True and features[-1]["source"] == "device_model"
        # Half the site's upward band: the station runs its curve at signal +500.
        band_up = vpp.telemetry[-1]["site"]["band_up_kw"]
        await vpp.send_setpoint(band_up / 2, valid_s=60)
        signal = await until(lambda: [s for s in station.afrr_signals if s.signal > 0], 3 * CYCLE_S, "an AFRRSignal")
        assert signal[-1].signal == pytest.approx(500, abs=20)
        await until(lambda: station.operation_mode == "CentralFrequency", 1, "the station in CentralFrequency")
        await until(lambda: ev_block(vpp, "v2x")["operation_mode"] == "CentralFrequency", 5, "the mode in telemetry")
        # It follows its curve: half way from its baseline to its maximum discharge.
        baseline_w = -vpp.telemetry[-1]["assets"]["v2x"]["baseline_kw"] * 1000  # OCPP sign: charging +
        await until(lambda: station.power_w < baseline_w - 2000, 3, "the station moving up on the signal")
