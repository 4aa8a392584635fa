"""Schedules on the wire: the VPP's activation and site-power schedules, the DSO's connection limits.

The gateway runs in process on SunSpec simulators; a real Mosquitto carries
the schedules (`<prefix>/<site>/schedule`) and their acks.
"""

from __future__ import annotations


from edge.uplink.messages import ScheduleAck, Telemetry
from simulators.sunspec import DeviceSpec, SunSpecSimulator
from simulators.vpp import VppSimulator
from tests.test_gateway import SITE, make_profile, online, running_gateway, until


async def test_schedules_drive_the_site_and_a_setpoint_overrides_them(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="pv", rated_kw=20.0, sun_kw=12.0), DeviceSpec(kind="storage", rated_kw=10.0)]
    async with SunSpecSimulator(specs) as sim:
        pv, bess = sim.devices
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5, setpoint_timeout_s=2)
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 2), 10, "assets online")

            # An activation schedule: +6 kW in this slot and the next.
            sent = await vpp.send_schedule("activation", [6.0, 6.0], resolution_s=3600)
            ack = await vpp.wait_schedule_ack(sent["id"])
            ScheduleAck.model_validate(ack)
            assert ack["status"] == "accepted" and ack["kind"] == "activation"
            await until(lambda: abs(bess.power_kw - 6.0) < 0.1, 3, "battery follows the schedule")
            message = await until(lambda: vpp.telemetry[-1]["mode"] == "schedule" and vpp.telemetry[-1], 3, "mode schedule")
            Telemetry.model_validate(message)
            assert message["schedule_id"] == sent["id"]

            # A real-time setpoint overrides it while valid; then the schedule again.
            setpoint = await vpp.send_setpoint(-4.0, valid_s=1.5)
            await vpp.wait_ack(setpoint["id"])
            await until(lambda: abs(pv.power_kw + bess.power_kw - 8.0) < 0.2, 3, "the setpoint's -4 kW")
            await until(lambda: vpp.telemetry[-1]["mode"] == "schedule", 5, "back to the schedule")
            await until(lambda: abs(bess.power_kw - 6.0) < 0.1, 3, "battery back on the schedule")

            # A site-power schedule (newer, so it decides): the site at 5 kW.
            sent = await vpp.send_schedule("site_power", [5.0], resolution_s=3600)
            assert (await vpp.wait_schedule_ack(sent["id"]))["status"] == "accepted"
            await until(lambda: abs(pv.power_kw + bess.power_kw - 5.0) < 0.2, 3, "site at 5 kW")

            # The DSO's connection-limits schedule tightens the export limit to 3 kW.
            sent = await vpp.send_schedule("connection_limits", [{"import_limit_kw": None, "export_limit_kw": 3.0}],
                                           resolution_s=3600)
            assert (await vpp.wait_schedule_ack(sent["id"]))["status"] == "accepted"
            await until(lambda: pv.power_kw + bess.power_kw <= 3.1, 3, "site capped at 3 kW")
            message = await until(lambda: vpp.telemetry[-1]["site"]["export_limit_kw"] == 3.0 and vpp.telemetry[-1],
                                  3, "limit in telemetry")
            assert message["site"]["limited_by"] == "export_limit"

            # Invalid schedules are refused with a reason naming the field, and change nothing.
            sent = await vpp.send_schedule("activation", [1.0, "x"], resolution_s=3600)
            ack = await vpp.wait_schedule_ack(sent["id"])
            assert ack["status"] == "rejected" and "values" in ack["reason"]
            await vpp.send_raw(b"{not json", leaf="schedule")
            assert await until(lambda: any(e["type"] == "schedule_rejected" for e in vpp.events), 3, "rejection event")
            assert pv.power_kw + bess.power_kw <= 3.1


async def test_a_baseline_schedule_is_the_assets_plan_and_activations_move_it_from_there(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="pv", rated_kw=20.0, sun_kw=12.0), DeviceSpec(kind="storage", rated_kw=10.0)]
    async with SunSpecSimulator(specs) as sim:
        pv, bess = sim.devices
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5)
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 2), 10, "assets online")
            # The prosumption plan: the battery charges 3 kW this hour.
            sent = await vpp.send_schedule("baseline", [-3.0], resolution_s=3600, asset_id="storage1")
            assert (await vpp.wait_schedule_ack(sent["id"]))["status"] == "accepted"
            await until(lambda: abs(bess.power_kw + 3.0) < 0.1, 3, "battery follows its plan with no activation")
            message = await until(lambda: vpp.telemetry[-1]["assets"]["storage1"]["baseline_method"] == "schedule"
                                  and vpp.telemetry[-1], 3, "baseline method in telemetry")
            Telemetry.model_validate(message)
            assert message["assets"]["storage1"]["baseline_kw"] == -3.0 and message["mode"] == "idle"

            # +5 kW of activation: shared from the baselines (battery plan -3, PV 12).
            setpoint = await vpp.send_setpoint(5.0, valid_s=30)
            await vpp.wait_ack(setpoint["id"])
            await until(lambda: abs(bess.power_kw - 2.0) < 0.1, 3, "battery at plan + 5 kW")

            sent = await vpp.send_schedule("baseline", [1.0], resolution_s=3600, asset_id="nope")
            ack = await vpp.wait_schedule_ack(sent["id"])
            assert ack["status"] == "rejected" and "nope" in ack["reason"]


async def test_a_week_of_one_minute_limits_is_checked_off_the_loop_and_takes_effect(tmp_path, mosquitto):
    """The largest schedule accepted (about 565 KB) is structure-checked in a worker thread: acked,
    in force, and a bad value at its very end still refused naming the slot."""
    import time

    async with SunSpecSimulator([DeviceSpec(kind="pv", rated_kw=20.0, sun_kw=12.0)]) as sim:
        pv = sim.devices[0]
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5)
        async with running_gateway(profile) as gateway, \
                VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 1), 10, "inverter online")
            now = time.time()
            week = [{"import_limit_kw": 1234.5, "export_limit_kw": 4.0}] * 10080
            sent = await vpp.send_schedule("connection_limits", week, resolution_s=60, start=now - now % 60)
            ack = await vpp.wait_schedule_ack(sent["id"], timeout_s=10)
            assert ack["status"] == "accepted", ack
            await until(lambda: pv.power_kw <= 4.1, 5, "site capped at 4 kW by the week's schedule")
            bad = week[:-1] + [{"import_limit_kw": -1.0, "export_limit_kw": 4.0}]
            sent = await vpp.send_schedule("connection_limits", bad, resolution_s=60, start=now - now % 60)
            ack = await vpp.wait_schedule_ack(sent["id"], timeout_s=10)
            assert ack["status"] == "rejected" and ack["reason"].startswith("values[10079].import_limit_kw"), ack
            assert not gateway.controller._tasks  # nothing left running
