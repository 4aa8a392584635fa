"""Dispatch on the wire: merit order, incapacity, ramp rates, on the bundled simulators.

The site is the one of tests/test_mixed_site.py (an IEC 104 battery and
boiler, two OCPP chargers) with dispatch settings from the profile.
"""

from __future__ import annotations

import pytest

from simulators.bess import BessSpec
from tests.test_gateway import until
from tests.test_mixed_site import BOILER_MIN_KW, CYCLE_S, MixedSite


def events_of(vpp, kind):
    return [e for e in vpp.events if e["type"] == kind]


async def test_merit_order_fills_the_battery_first_then_the_boiler(tmp_path, mosquitto):
    priorities = {"bess": {"priority": 1}, "boiler": {"priority": 2}, "ev-16": {"priority": 3}, "ev-201": {"priority": 3}}
    async with MixedSite(tmp_path, mosquitto.port, control={"allocation": "merit_order"}, assets=priorities) as site:
        # Downward 15 kW: the battery alone (priority 1, 20 kW of charge).
        sent = await site.vpp.send_setpoint(-15.0, valid_s=60)
        await site.vpp.wait_ack(sent["id"])
        await until(lambda: site.bess.commands and site.bess.commands[-1].value == pytest.approx(-15.0, abs=0.05),
                    CYCLE_S, "battery charges 15 kW")
        assert all(record.value == 0.0 for record in site.boiler.commands)

        # Downward 32 kW: battery full 20 kW, the boiler takes the next 12 kW
        # (above its 10 kW minimum), the chargers (priority 3) nothing.
        before = [len(s.profiles) for s in site.chargers]
        sent = await site.vpp.send_setpoint(-32.0, valid_s=60)
        await site.vpp.wait_ack(sent["id"])
        await until(lambda: site.boiler.commands and site.boiler.commands[-1].value == pytest.approx(12.0, abs=0.05),
                    CYCLE_S, "boiler runs at 12 kW")
        assert site.bess.commands[-1].value == pytest.approx(-20.0, abs=0.05)

        # Downward 25 kW: the boiler's share would be 5 kW, below its minimum:
        # it runs at 10 kW and the battery, the better merit, gives back 5.
        sent = await site.vpp.send_setpoint(-25.0, valid_s=60)
        await site.vpp.wait_ack(sent["id"])
        await until(lambda: site.boiler.commands[-1].value == pytest.approx(BOILER_MIN_KW, abs=0.05), CYCLE_S,
                    "boiler at its minimum")
        await until(lambda: site.bess.commands[-1].value == pytest.approx(-15.0, abs=0.3), CYCLE_S, "battery 15 kW")
        assert [len(s.profiles) for s in site.chargers] == before  # priority 3 never needed


async def test_incapacity_is_reported_at_once_and_when_it_clears(tmp_path, mosquitto):
    full = BessSpec(max_charge_kw=20, max_discharge_kw=20, soc_pct=96, soc_max_pct=100)  # cannot charge
    async with MixedSite(tmp_path, mosquitto.port, bess_spec=full) as site:
        # The boiler's 40 kW are all the downward band there is; 44 kW asked
        # (within the 10 % tolerance of the band, so accepted): 4 kW short.
        sent = await site.vpp.send_setpoint(-44.0, valid_s=60)
        await site.vpp.wait_ack(sent["id"])
        started = await until(lambda: events_of(site.vpp, "incapacity"), 3 * CYCLE_S, "incapacity event")
        assert started[0]["detail"]["state"] == "started" and started[0]["detail"]["causes"] == ["band"]
        assert started[0]["detail"]["shortfall_kw"] == pytest.approx(4.0, abs=0.5)
        assert started[0]["detail"]["requested_kw"] == -44.0
        await until(lambda: site.vpp.telemetry[-1]["site"]["limited_by"] == "band", 3 * CYCLE_S, "limited_by in telemetry")

        sent = await site.vpp.send_setpoint(-20.0, valid_s=60)
        await site.vpp.wait_ack(sent["id"])
        ended = await until(lambda: [e for e in events_of(site.vpp, "incapacity") if e["detail"]["state"] == "ended"],
                            3 * CYCLE_S, "incapacity ended")
        assert ended[0]["detail"]["causes"] == ["band"]
        assert len(events_of(site.vpp, "incapacity")) == 2  # not repeated every cycle


async def test_a_committed_band_not_available_is_an_incapacity_from_the_start(tmp_path, mosquitto):
    full = BessSpec(max_charge_kw=20, max_discharge_kw=20, soc_pct=96, soc_max_pct=100)
    async with MixedSite(tmp_path, mosquitto.port, bess_spec=full, control={"committed_band_down_kw": 50.0}) as site:
        started = await until(lambda: events_of(site.vpp, "incapacity"), 3 * CYCLE_S, "incapacity event")
        assert started[0]["detail"]["state"] == "started"
        assert started[0]["detail"]["causes"] == ["committed_band_down"]
        assert started[0]["detail"]["band_shortfall_down_kw"] == pytest.approx(10.0, abs=0.5)


async def test_an_order_right_after_a_release_keeps_the_baselines_of_before(tmp_path, mosquitto):
    """Devices released a moment ago still carry the old activation: a grid order then must not
    freeze that as their baseline (it would hold the site low for the whole order)."""
    from edge.gridorders import GridOrders
    from simulators.sunspec import DeviceSpec, SunSpecSimulator
    from simulators.vpp import VppSimulator
    from tests.test_gateway import SITE, make_profile, online, running_gateway

    # A slow battery: 0.8 kW/s, so 8 kW of activation takes 10 s to undo.
    specs = [DeviceSpec(kind="pv", rated_kw=20.0, sun_kw=12.0), DeviceSpec(kind="storage", rated_kw=8.0, ramp_pct_per_s=10)]
    async with SunSpecSimulator(specs) as sim:
        pv, bess = sim.devices
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5)
        async with running_gateway(profile) as gateway, VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 2), 10, "assets online")
            sent = await vpp.send_setpoint(8.0, valid_s=60)
            await vpp.wait_ack(sent["id"])
            await until(lambda: bess.power_kw > 7.9, 15, "battery discharges 8 kW")
            sent = await vpp.send_setpoint(0.0, valid_s=60)  # released ...
            await vpp.wait_ack(sent["id"])
            await until(lambda: gateway.controller.state.active is False, 3, "devices released")
            assert bess.power_kw > 6.0  # ... but the battery is still on its way back
            gateway.controller.apply_grid_orders(GridOrders(export_limit_kw=30.0, source="deie"))
            message = await until(lambda: vpp.telemetry[-1]["grid_orders"]["export_limit_kw"] == 30.0 and vpp.telemetry[-1],
                                  3, "order in telemetry")
            assert message["assets"]["storage1"]["baseline_kw"] == pytest.approx(0.0, abs=0.1)
            assert message["site"]["baseline_kw"] == pytest.approx(12.0, abs=0.2)
            await until(lambda: abs(bess.power_kw) < 0.1, 15, "battery back at its own power (0 kW)")
