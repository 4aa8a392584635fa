"""EV smart charging on the wire: plans against tariffs and the driver's needs, shortfalls reported.

One OCPP 2.0.1 charger (11 kW, 6 A minimum) with an EV plugged in, the
gateway in process with `ev_charging` in its profile, the VPP publishing a
tariff schedule and the driver's preferences over a real Mosquitto.
"""

from __future__ import annotations

import json
import time

import pytest

from edge.config.profile import Profile
from simulators.ocpp import EvSpec, OcppSimulator, StationSpec
from simulators.vpp import VppSimulator
from tests.conftest import free_port
from tests.test_gateway import SITE, running_gateway, until
from simulators.vpp import utc_iso_ms


def profile_with_charger(tmp_path, broker_port: int, ocpp_port: int, grid: dict | None = None) -> Profile:
    return Profile.model_validate({
        "grid": grid or {},
        "site": {"id": SITE},
        "control": {"cycle_s": 0.5},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": broker_port},
                   "spool": {"path": str(tmp_path / "spool.sqlite"), "max_mb": 16}},
        "ocpp": {"host": "127.0.0.1", "port": ocpp_port, "authorize": {"mode": "accept_all"},
                 "id_tag_salt_file": str(tmp_path / "salt")},
        "ev_charging": {"default_departure_after_h": 8, "default_energy_kwh": 20},
        "assets": [{"id": "ev1", "kind": "ev_charger", "driver": "ocpp", "charge_point_id": "CP1",
                    "ocpp_version": "2.0.1", "max_current_a": 16, "deadband_kw": 0.1}],
    })


def plans(vpp):
    return [e["detail"] for e in vpp.events if e["type"] == "ev_plan"]


async def test_charging_follows_the_cheapest_slots_and_the_drivers_departure(tmp_path, mosquitto):
    ocpp_port = free_port()
    profile = profile_with_charger(tmp_path, mosquitto.port, ocpp_port)
    async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
        await until(lambda: vpp.telemetry, 5, "the gateway publishing")
        # Expensive now and for the next hour, cheap after: with 8 h to go the plan waits.
        now = time.time()
        start = now - now % 900
        sent = await vpp.send_schedule("tariff", [0.40] * 5 + [0.10] * 40, resolution_s=900, start=utc_iso_ms(start),
                                       currency="EUR")
        assert (await vpp.wait_schedule_ack(sent["id"]))["status"] == "accepted"
        async with OcppSimulator(f"ws://127.0.0.1:{ocpp_port}/ocpp",
                                 [StationSpec("CP1", "2.0.1", max_current_a=16, meter_interval_s=0.2)]) as sim:
            station = sim.stations[0]
            await station.wait_connected()
            assert await station.plug_in(EvSpec(id_tag="TAG1", max_power_kw=11.0, soc_pct=20, capacity_kwh=60))
            first = await until(lambda: plans(vpp), 5, "a plan for the session")
            assert first[-1]["departure_source"] == "default" and first[-1]["energy_needed_kwh"] == pytest.approx(20.0, abs=0.1)
            assert first[-1]["shortfall_kwh"] == 0.0 and first[-1]["charge_kw_now"] == 0.0
            await until(lambda: station.profiles and station.profiles[-1].limit == 0.0, 3, "charging paused (dear slot)")
            await until(lambda: station.power_w == 0.0, 3, "the EV stops drawing")
            message = await until(lambda: vpp.telemetry[-1]["assets"]["ev1"]["baseline_method"] == "ev_plan"
                                  and vpp.telemetry[-1], 3, "the plan is the baseline")
            assert message["assets"]["ev1"]["baseline_kw"] == 0.0

            # The driver leaves in 45 min and needs 6 kWh: now it must charge (at least 8 kW).
            departure = utc_iso_ms(time.time() + 45 * 60)
            await vpp.send_raw(json.dumps({"asset_id": "ev1", "departure": departure, "energy_kwh": 6.0}),
                               leaf="ev/preferences")
            plan = await until(lambda: [p for p in plans(vpp) if p["departure_source"] == "driver"], 5, "replanned")
            assert plan[-1]["shortfall_kwh"] == 0.0 and plan[-1]["charge_kw_now"] >= 4.14
            await until(lambda: station.profiles[-1].limit >= 6.0, 3, "charging again")

            # 30 kWh in 45 min cannot be had from an 11 kW charger: the shortfall is reported.
            await vpp.send_raw(json.dumps({"asset_id": "ev1", "departure": departure, "energy_kwh": 30.0}),
                               leaf="ev/preferences")
            short = await until(lambda: [p for p in plans(vpp) if p["shortfall_kwh"] > 0], 5, "shortfall reported")
            assert short[-1]["shortfall_kwh"] == pytest.approx(30.0 - short[-1]["expected_energy_kwh"], abs=0.05)
            assert short[-1]["expected_energy_kwh"] <= 11.04 * 0.75 + 0.1 and short[-1]["reason"]
            await until(lambda: station.profiles[-1].limit == pytest.approx(16.0, abs=0.1), 3, "full current")

            # Preferences for a charger without an EV, or malformed, are refused with the reason.
            await vpp.send_raw(json.dumps({"asset_id": "ev9", "energy_kwh": 5}), leaf="ev/preferences")
            await vpp.send_raw(json.dumps({"asset_id": "ev1", "energy_kwh": -5}), leaf="ev/preferences")
            rejected = await until(lambda: [e for e in vpp.events if e["type"] == "ev_preferences_rejected"], 3,
                                   "rejections") and await until(
                lambda: len([e for e in vpp.events if e["type"] == "ev_preferences_rejected"]) == 2 and
                [e for e in vpp.events if e["type"] == "ev_preferences_rejected"], 3, "both rejections")
            assert "no EV is plugged in" in rejected[0]["detail"]["reason"]
            assert "energy_kwh" in rejected[1]["detail"]["reason"]


async def test_plans_keep_within_the_sites_import_limit_and_report_what_it_costs(tmp_path, mosquitto):
    ocpp_port = free_port()
    profile = profile_with_charger(tmp_path, mosquitto.port, ocpp_port, grid={"import_limit_kw": 8.0})
    async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
        await until(lambda: vpp.telemetry, 5, "the gateway publishing")
        async with OcppSimulator(f"ws://127.0.0.1:{ocpp_port}/ocpp",
                                 [StationSpec("CP1", "2.0.1", max_current_a=16, meter_interval_s=0.2)]) as sim:
            station = sim.stations[0]
            await station.wait_connected()
            assert await station.plug_in(EvSpec(id_tag="TAG1", max_power_kw=11.0, soc_pct=20, capacity_kwh=60))
            await until(lambda: plans(vpp), 5, "a plan for the session")
            departure = utc_iso_ms(time.time() + 45 * 60)
            await vpp.send_raw(json.dumps({"asset_id": "ev1", "departure": departure, "energy_kwh": 5.0}),
                               leaf="ev/preferences")
            plan = await until(lambda: [p for p in plans(vpp) if p["departure_source"] == "driver"], 5, "replanned")
            # 8 kW of import at most: the plan charges below the charger's 11 kW
            assert plan[-1]["shortfall_kwh"] == 0.0 and 4.14 <= plan[-1]["charge_kw_now"] <= 8.0 + 1e-6

            # The DSO cuts the import to 3 kW for the next hours: below the charger's minimum.
            sent = await vpp.send_schedule("connection_limits", [{"import_limit_kw": 3.0}] * 4, resolution_s=3600)
            assert (await vpp.wait_schedule_ack(sent["id"]))["status"] == "accepted"
            short = await until(lambda: [p for p in plans(vpp) if p["shortfall_kwh"] > 0], 5, "shortfall reported")
            assert short[-1]["expected_energy_kwh"] == 0.0 and short[-1]["shortfall_kwh"] == pytest.approx(5.0, abs=0.2)
            await until(lambda: station.profiles and station.profiles[-1].limit == 0.0, 3, "charging stopped")
