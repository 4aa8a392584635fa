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
