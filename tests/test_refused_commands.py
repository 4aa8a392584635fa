"""A command the device refuses is an incapacity, not an accepted activation (issue #10, item 3).

On the wire: SunSpec batteries that answer their control writes with Modbus exception 4 (a
unit in local mode), the real gateway, Mosquitto and the VPP simulator.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import pytest

from simulators.sunspec import DeviceSpec, SunSpecSimulator
from simulators.vpp import VppSimulator
from tests.test_gateway import SITE, make_profile, online, running_gateway, until

CYCLE_S = 0.5


@asynccontextmanager
async def refusing_battery(tmp_path, broker_port: int):
    """One SunSpec battery that refuses every control write, behind the gateway; (device, VPP)."""
    async with SunSpecSimulator([DeviceSpec(kind="storage", rated_kw=10.0)]) as sim:
        bess = sim.devices[0]
        bess.set_refuse_control(True)
        profile = make_profile(tmp_path, broker_port, sim.devices, cycle_s=CYCLE_S)
        async with running_gateway(profile), VppSimulator("127.0.0.1", broker_port, "flexedge", SITE) as vpp:
            await until(online(vpp, 1), 10, "battery online")
            yield bess, vpp


def incapacities(vpp: VppSimulator) -> list[dict]:
    return [e for e in vpp.events if e["type"] == "incapacity"]


async def test_a_refused_share_goes_to_the_other_battery_within_the_cycle(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="storage", rated_kw=10.0), DeviceSpec(kind="storage", rated_kw=10.0)]
    async with SunSpecSimulator(specs) as sim:
        refusing, willing = sim.devices
        refusing.set_refuse_control(True)
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=CYCLE_S)
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 2), 10, "both batteries online")
            sent_at = time.monotonic()
            sent = await vpp.send_setpoint(6.0, valid_s=60)
            assert (await vpp.wait_ack(sent["id"]))["status"] == "accepted"
            # the refusal is seen at once: the willing battery is asked for all 6 kW before the next tick
            all_of_it = await willing.next_write("WSet", model_id=704, where=lambda r: r.value == pytest.approx(6000, abs=2),
                                                 after_s=sent_at, timeout_s=2 * CYCLE_S)
            assert all_of_it.t_s - sent_at < CYCLE_S
            message = await until(lambda: vpp.telemetry and vpp.telemetry[-1]["assets"]["storage0"]["degraded"]
                                  and vpp.telemetry[-1]["site"]["p_kw"] > 5.9 and vpp.telemetry[-1], 5, "site at 6 kW")
            assert message["site"]["limited_by"] is None
            assert message["assets"]["storage0"]["band_up_kw"] == pytest.approx(0.0, abs=0.05)
            assert message["site"]["band_up_kw"] == pytest.approx(10.0, abs=0.2)  # the willing one alone (was 20)
            assert not incapacities(vpp)


async def test_a_refused_command_is_an_incapacity_at_once_until_the_device_accepts_again(tmp_path, mosquitto):
    async with refusing_battery(tmp_path, mosquitto.port) as (bess, vpp):
        sent_at = time.monotonic()
        sent = await vpp.send_setpoint(6.0, valid_s=60)
        await vpp.wait_ack(sent["id"])
        started = await until(lambda: incapacities(vpp), 2 * CYCLE_S, "incapacity event")
        assert time.monotonic() - sent_at < 2 * CYCLE_S
        detail = started[0]["detail"]
        assert detail["state"] == "started" and detail["causes"] == ["command_refused"], detail
        assert detail["shortfall_kw"] == pytest.approx(6.0, abs=0.2) and detail["refusing_assets"] == ["storage0"]
        message = await until(lambda: vpp.telemetry and vpp.telemetry[-1]["site"]["limited_by"] == "command_refused"
                              and vpp.telemetry[-1], 3 * CYCLE_S, "telemetry says why")
        assert message["site"]["activation_requested_kw"] == pytest.approx(6.0)
        assert message["site"]["activation_kw"] == pytest.approx(0.0, abs=0.2)
        assert message["site"]["band_up_kw"] == pytest.approx(0.0, abs=0.05)
        assert message["assets"]["storage0"]["degraded"]
        # the device is asked again, paced (not every cycle for ever), and trusted as soon as it accepts
        refused_writes = [w for w in bess.writes if not w.accepted]
        bess.set_refuse_control(False)
        await until(lambda: bess.setpoint_kw == pytest.approx(6.0, abs=0.01), 10, "6 kW once it accepts")
        ended = await until(lambda: [e for e in incapacities(vpp) if e["detail"]["state"] == "ended"], 3 * CYCLE_S,
                            "incapacity ended")
        assert ended[0]["detail"]["causes"] == ["command_refused"]
        assert len(refused_writes) < 20, len(refused_writes)
        await until(lambda: vpp.telemetry[-1]["site"]["limited_by"] is None
                    and not vpp.telemetry[-1]["assets"]["storage0"]["degraded"], 3 * CYCLE_S, "degraded cleared")


async def test_a_device_that_keeps_refusing_is_asked_again_with_backoff(tmp_path, mosquitto):
    async with refusing_battery(tmp_path, mosquitto.port) as (bess, vpp):
        sent = await vpp.send_setpoint(4.0, valid_s=60)
        await vpp.wait_ack(sent["id"])
        started = time.monotonic()
        await asyncio.sleep(7.5)  # 15 cycles
        attempts = [w.t_s for w in bess.writes if not w.accepted and w.t_s >= started]
        # asked again at about 1, 2, 4 s (the controller's backoff), not once per cycle
        assert 2 <= len(attempts) <= 5, attempts
        gaps_s = [b - a for a, b in zip(attempts, attempts[1:])]
        assert gaps_s == sorted(gaps_s) or max(gaps_s) > 1.5, gaps_s
        assert len(incapacities(vpp)) == 1  # started once, not repeated every cycle


async def test_a_battery_refusing_with_a_negative_act_con_is_shared_out_then_an_incapacity(tmp_path, mosquitto):
    """IEC 104: the battery answers its setpoint with a negative ACT_CON; the chargers take what they can."""
    from tests.test_mixed_site import CHARGER_MAX_KW, CYCLE_S as MIXED_CYCLE_S, MixedSite

    async with MixedSite(tmp_path, mosquitto.port) as site:
        site.bess.reply = "negative"
        # 30 kW upward: the battery's 20 kW and the chargers' 2 x 11 kW could cover it; with the battery
        # refusing, the chargers take their whole upward band and 8 kW is an incapacity, at once.
        published_at = time.monotonic()
        sent = await site.vpp.send_setpoint(30.0, valid_s=60)
        assert (await site.vpp.wait_ack(sent["id"]))["status"] == "accepted"
        started = await until(lambda: incapacities(site.vpp), 2 * MIXED_CYCLE_S, "incapacity event")
        assert time.monotonic() - published_at < 2 * MIXED_CYCLE_S
        detail = started[0]["detail"]
        assert detail["causes"] == ["command_refused"] and detail["refusing_assets"] == ["bess"], detail
        assert detail["shortfall_kw"] == pytest.approx(30.0 - 2 * CHARGER_MAX_KW, abs=1.0)
        message = await until(lambda: site.vpp.telemetry[-1]["site"]["limited_by"] == "command_refused"
                              and site.vpp.telemetry[-1], 3 * MIXED_CYCLE_S, "limited_by command_refused")
        assert message["assets"]["bess"]["degraded"] and message["assets"]["bess"]["band_up_kw"] == pytest.approx(0, abs=0.1)
        for charger in ("ev-16", "ev-201"):  # stopped: their whole upward band
            assert message["assets"][charger]["setpoint_kw"] == pytest.approx(0.0, abs=0.1)
        # the battery accepts again: it is asked again, and the shortfall ends
        site.bess.reply = "positive"
        ended = await until(lambda: [e for e in incapacities(site.vpp) if e["detail"]["state"] == "ended"],
                            10 * MIXED_CYCLE_S, "incapacity ended")
        assert ended
        assert site.bess.commands[-1].accepted and site.bess.commands[-1].value > 5.0


# ------------------------------------------------- the controller's pacing, with scripted devices


class ScriptedBattery:
    """A battery driver whose answers the test scripts: it refuses targets above ``accepts_up_to_kw``
    and reads its power with noise; every target it is sent is recorded."""

    def __init__(self, accepts_up_to_kw: float | None = None):
        self.accepts_up_to_kw = accepts_up_to_kw
        self.sent: list[float | None] = []
        self.p_kw, self.refused, self.noise_kw = 0.0, False, 0.0

    def reading(self):
        from edge.asset import AssetReading

        return AssetReading(online=True, p_kw=self.p_kw + self.noise_kw, p_min_kw=-10.0, p_max_kw=10.0,
                            command_refused=self.refused)

    def set_target_kw(self, target_kw):
        self.sent.append(target_kw)
        refused = (target_kw is not None and self.accepts_up_to_kw is not None
                   and target_kw > self.accepts_up_to_kw + 1e-6)
        self.refused = refused
        if not refused and target_kw is not None:
            self.p_kw = target_kw

    def set_target_kvar(self, target_kvar):
        pass


def scripted_controller(tmp_path, *drivers):
    from edge.control.cycle import ControlledAsset, Controller
    from edge.config.profile import Profile

    profile = Profile.model_validate({
        "site": {"id": SITE}, "control": {"cycle_s": 1.0},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": 1883}, "spool": {"path": str(tmp_path / "s.sqlite")}},
        "assets": [{"id": f"b{i}", "kind": "bess", "driver": "sunspec", "host": "127.0.0.1", "port": 1502 + i}
                   for i in range(len(drivers))],
    })
    events: list[tuple[str, dict]] = []
    assets = [ControlledAsset(f"b{i}", "bess", "sunspec", True, False, driver) for i, driver in enumerate(drivers)]
    controller = Controller(profile, assets, lambda *a: None, lambda *a: None,
                            lambda kind, asset_id, detail: events.append((kind, detail)))
    return controller, events


def _setpoint(activation_kw: float, index: int) -> bytes:
    import json

    from edge.control.setpoints import iso_time

    return json.dumps({"id": f"sp-{index}", "ts": iso_time(time.time()), "valid_s": 60,
                       "activation_kw": activation_kw}).encode()


async def test_a_refusing_device_reading_with_noise_is_not_sent_a_target_every_cycle(tmp_path):
    refusing, willing = ScriptedBattery(accepts_up_to_kw=-1.0), ScriptedBattery()
    controller, _ = scripted_controller(tmp_path, refusing, willing)
    controller.on_setpoint(_setpoint(6.0, 1))
    for cycle in range(10):  # 10 cycles of a device whose reading moves by 50 W each time
        refusing.noise_kw = 0.05 * (-1) ** cycle
        controller.step(time.time())
    assert refusing.refused
    assert len(refusing.sent) <= 3, refusing.sent  # its share, then the paced hold retries (1 s apart at first)
    assert willing.p_kw == pytest.approx(6.0, abs=0.1)


async def test_a_device_that_holds_but_refuses_its_share_is_asked_ever_less_often(tmp_path):
    from edge.control import cycle as control

    unit = ScriptedBattery(accepts_up_to_kw=2.0)  # an unreported local limit: 0 kW is fine, 3 kW is not
    controller, events = scripted_controller(tmp_path, unit)
    clock = [1000.0]
    original = control.time.monotonic
    control.time.monotonic = lambda: clock[0]
    try:
        controller.on_setpoint(_setpoint(3.0, 1))
        for _ in range(120):  # two minutes at 1 s
            clock[0] += 1.0
            controller.step(time.time())
    finally:
        control.time.monotonic = original
    refused_sends = [t for t in unit.sent if t is not None and t > 2.0]
    # the full share again only after the growing, jittered backoff (ceilings 1, 2, 4, 8, 16, 30 ... s,
    # each delay half to all of it): at most about 13 in two minutes, where every other cycle made 60
    assert len(refused_sends) <= 16, unit.sent
    started = [d for kind, d in events if kind == "incapacity" and d["state"] == "started"]
    assert len(started) <= 16


async def test_nothing_is_commanded_after_the_controller_stops(tmp_path):
    unit = ScriptedBattery(accepts_up_to_kw=-1.0)
    controller, _ = scripted_controller(tmp_path, unit)
    controller.on_setpoint(_setpoint(3.0, 1))
    controller.stop()
    sent = len(unit.sent)
    controller.step_soon()
    await asyncio.sleep(0.3)
    controller.on_setpoint(_setpoint(-3.0, 2))
    controller.step(time.time())
    assert len(unit.sent) == sent
