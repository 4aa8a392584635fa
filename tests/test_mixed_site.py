"""A site of IEC 104 and OCPP assets under VPP control, on the wire.

The gateway runs in process on a profile with an IEC 104 battery, an IEC 104
electric boiler (off, or between its minimum and maximum load) and two EV
chargers (OCPP 1.6 and 2.0.1, each off or between 6 A and its rating); the
bundled simulators play the devices and a real Mosquitto carries the VPP's
setpoints.  Assertions are on what the simulators received.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from edge.uplink.messages import Telemetry
from edge.config.profile import Profile
from simulators.bess import BessSimulator, BessSpec
from simulators.ocpp import EvSpec, OcppSimulator, StationSpec
from simulators.p2h import P2hSimulator, P2hSpec
from simulators.vpp import VppSimulator
from tests.conftest import free_port
from tests.test_gateway import SITE, running_gateway, until

CYCLE_S = 1.0
BOILER_MIN_KW, BOILER_MAX_KW = 10.0, 40.0
CHARGER_MIN_KW = 6 * 230 * 3 / 1000  # 4.14 kW: 6 A on three phases
CHARGER_MAX_KW = 16 * 230 * 3 / 1000  # 11.04 kW


def mixed_profile(tmp_path: Path, broker_port: int, bess, boiler, ocpp_port: int, control: dict | None = None,
                  assets: dict[str, dict] | None = None) -> Profile:
    """The site's profile; ``assets`` adds keys to assets by id (priorities, ramp rates ...)."""
    common = {"driver": "iec104", "host": "127.0.0.1", "connect_timeout_s": 1.0, "command_timeout_s": 1.0}
    chargers = [
        {"id": f"ev-{name}", "kind": "ev_charger", "driver": "ocpp", "charge_point_id": f"CP-{name}",
         "ocpp_version": version, "max_current_a": 16, "deadband_kw": 0.1}
        for name, version in (("16", "1.6"), ("201", "2.0.1"))
    ]
    site_assets = [
        {"id": "bess", "kind": "bess", "port": bess.port, "common_address": bess.common_address,
         "template": "bess-generic", "max_charge_kw": 20, "max_discharge_kw": 20, **common},
        {"id": "boiler", "kind": "p2h", "port": boiler.port, "common_address": boiler.common_address,
         "template": "electric-boiler", "min_load_kw": BOILER_MIN_KW, "max_load_kw": BOILER_MAX_KW,
         "storage_temp_max_c": 95, **common},
        *chargers,
    ]
    return Profile.model_validate({
        "site": {"id": SITE},
        "control": {"cycle_s": CYCLE_S, **(control or {})},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": broker_port},
                   "spool": {"path": str(tmp_path / "spool.sqlite"), "max_mb": 16}},
        "ocpp": {"host": "127.0.0.1", "port": ocpp_port, "authorize": {"mode": "accept_all"},
                 "id_tag_salt_file": str(tmp_path / "salt")},
        "assets": [{**asset, **(assets or {}).get(asset["id"], {})} for asset in site_assets],
    })


class MixedSite:
    """Simulators, gateway and VPP for one test; ``async with`` starts and stops them all."""

    def __init__(self, tmp_path: Path, broker_port: int, bess_spec=None, control: dict | None = None,
                 assets: dict[str, dict] | None = None):
        self.tmp_path, self.broker_port = tmp_path, broker_port
        self.control, self.asset_settings = control, assets
        self.bess_spec = bess_spec or BessSpec(max_charge_kw=20, max_discharge_kw=20, soc_pct=50)
        self.stack = AsyncExitStack()

    async def __aenter__(self):
        stack = self.stack
        self.bess = (await stack.enter_async_context(BessSimulator([self.bess_spec]))).units[0]
        boiler_spec = P2hSpec(min_load_kw=BOILER_MIN_KW, max_load_kw=BOILER_MAX_KW, storage_temp_c=50, draw_kw=0)
        self.boiler = (await stack.enter_async_context(P2hSimulator([boiler_spec]))).units[0]
        ocpp_port = free_port()
        profile = mixed_profile(self.tmp_path, self.broker_port, self.bess, self.boiler, ocpp_port, self.control,
                                self.asset_settings)
        self.gateway = await stack.enter_async_context(running_gateway(profile))
        self.vpp = await stack.enter_async_context(VppSimulator("127.0.0.1", self.broker_port, "flexedge", SITE))
        stations = [StationSpec("CP-16", "1.6", max_current_a=16, meter_interval_s=0.2),
                    StationSpec("CP-201", "2.0.1", max_current_a=16, meter_interval_s=0.2)]
        url = f"ws://127.0.0.1:{ocpp_port}/ocpp"
        self.chargers = (await stack.enter_async_context(OcppSimulator(url, stations))).stations
        for station in self.chargers:
            await station.wait_connected()
            assert await station.plug_in(EvSpec(id_tag="TAG1", max_power_kw=11.0, soc_pct=20))
        await until(self.all_ready, 15, "every asset online, both EVs charging")
        return self

    async def __aexit__(self, *exc):
        await self.stack.aclose()

    def all_ready(self):
        if not self.vpp.telemetry:
            return False
        assets = self.vpp.telemetry[-1]["assets"]
        return (len(assets) == 4 and all(a["online"] for a in assets.values())
                and all((assets[f"ev-{n}"]["p_kw"] or 0) < -10 for n in ("16", "201")))

    def last(self, asset_id: str) -> dict:
        return self.vpp.telemetry[-1]["assets"][asset_id]


async def test_setpoints_reach_battery_boiler_and_chargers_within_a_cycle(tmp_path, mosquitto):
    async with MixedSite(tmp_path, mosquitto.port) as site:
        assert site.last("boiler")["band_gap_kw"] == [-BOILER_MIN_KW, 0.0]
        assert site.last("ev-16")["band_gap_kw"] == pytest.approx([-CHARGER_MIN_KW, 0.0])
        assert site.last("bess")["band_gap_kw"] is None

        # Upward 15 kW: the battery discharges and both chargers slow down (the
        # boiler is off, it has no upward band).  Pro rata to the upward bands.
        profiles_before = [len(s.profiles) for s in site.chargers]
        bess_before = len(site.bess.commands)
        published_at = time.time()
        sent = await site.vpp.send_setpoint(15.0, valid_s=60)
        await site.vpp.wait_ack(sent["id"])
        discharge = await site.bess.wait_command(CYCLE_S, count=bess_before + 1)
        assert discharge.accepted and discharge.at - published_at < CYCLE_S
        assert discharge.value == pytest.approx(15.0 * 20 / (20 + 2 * CHARGER_MAX_KW), abs=0.3)
        for station, before in zip(site.chargers, profiles_before):
            record = await until(lambda s=station, b=before: len(s.profiles) > b and s.profiles[-1], CYCLE_S,
                                 f"{station.spec.charge_point_id} profile within one cycle")
            assert record.received_at - published_at < CYCLE_S and record.accepted
            # about 7.1 kW left per charger, sent in A: 7.1 kW / 690 V
            assert record.unit == "A" and 9.5 <= record.limit <= 11.0

        # Downward 12 kW: the battery's (20 kW) and the boiler's (40 kW) bands
        # share it pro rata, which would run the boiler at 8 kW, below its
        # 10 kW minimum.  It runs at its minimum instead; the 2 kW it takes too
        # many come back from the assets with room upward: the battery and the
        # chargers (still in their continuous part, above 6 A).
        boiler_before = len(site.boiler.commands)
        published_at = time.time()
        sent = await site.vpp.send_setpoint(-12.0, valid_s=60)
        await site.vpp.wait_ack(sent["id"])
        heat = await site.boiler.wait_command(CYCLE_S, count=boiler_before + 1)
        assert heat.accepted and heat.at - published_at < CYCLE_S
        assert heat.value == pytest.approx(BOILER_MIN_KW)  # the unit's convention: + consumption
        charge = await until(lambda: site.bess.commands[-1].value < 0 and site.bess.commands[-1], CYCLE_S, "charge")
        assert -4.0 < charge.value < 0.0
        message = await until(lambda: site.last("boiler")["setpoint_kw"] == -BOILER_MIN_KW and site.vpp.telemetry[-1],
                              3 * CYCLE_S, "telemetry of the new targets")
        Telemetry.model_validate(message)
        assert message["site"]["activation_kw"] == pytest.approx(-12.0, abs=0.05)
        assert message["site"]["limited_by"] is None

        # Downward 5 kW: the boiler's share (3.3 kW) is nearer off than its
        # minimum, so it stops and the battery charges 5 kW.
        sent = await site.vpp.send_setpoint(-5.0, valid_s=60)
        await site.vpp.wait_ack(sent["id"])
        stop = await until(lambda: site.boiler.commands[-1].value == 0.0 and site.boiler.commands[-1], CYCLE_S, "off")
        assert stop.accepted
        await until(lambda: site.bess.commands[-1].value == pytest.approx(-5.0, abs=0.3), CYCLE_S, "battery charges 5 kW")
        for record in site.boiler.commands:
            assert record.value == 0.0 or BOILER_MIN_KW <= record.value <= BOILER_MAX_KW, record


async def test_a_full_battery_and_an_unplugged_charger_are_routed_around(tmp_path, mosquitto):
    full = BessSpec(max_charge_kw=20, max_discharge_kw=20, soc_pct=96, soc_max_pct=100)  # above soc_max_pct 95
    async with MixedSite(tmp_path, mosquitto.port, bess_spec=full) as site:
        assert site.last("bess")["band_down_kw"] == 0.0  # cannot charge
        await site.chargers[0].unplug()
        await until(lambda: site.last("ev-16")["band_up_kw"] == 0.0 and site.last("ev-16")["band_gap_kw"] is None,
                    3 * CYCLE_S, "unplugged charger leaves the band")

        # Downward 20 kW: only the boiler can take more power (the other
        # charger already charges at its EV's maximum).
        boiler_before = len(site.boiler.commands)
        sent = await site.vpp.send_setpoint(-20.0, valid_s=60)
        await site.vpp.wait_ack(sent["id"])
        heat = await site.boiler.wait_command(CYCLE_S, count=boiler_before + 1)
        assert heat.value == pytest.approx(20.0, abs=0.5)
        assert all(record.value >= 0 for record in site.bess.commands), "a full battery was told to charge"

        # Upward 6 kW: the battery discharges and the charging EV slows down; the
        # unplugged charger gets no share.
        before = len(site.chargers[0].profiles)
        sent = await site.vpp.send_setpoint(6.0, valid_s=60)
        await site.vpp.wait_ack(sent["id"])
        discharge = await until(lambda: site.bess.commands and site.bess.commands[-1].value > 0 and site.bess.commands[-1],
                                CYCLE_S, "discharge")
        assert discharge.value == pytest.approx(6.0 * 20 / (20 + CHARGER_MAX_KW), abs=0.3)
        message = await until(lambda: site.last("ev-201")["setpoint_kw"] is not None
                              and site.last("ev-201")["setpoint_kw"] > -CHARGER_MAX_KW + 0.5 and site.vpp.telemetry[-1],
                              3 * CYCLE_S, "the plugged-in charger slowed down")
        assert message["assets"]["ev-16"]["activation_kw"] in (0.0, None)
        assert len(site.chargers[0].profiles) - before <= 1  # at most a release, never a share
