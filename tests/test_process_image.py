"""One cycle, one process image (issue #11): polls land just before the tick they are for,
telemetry says how old each value is, and a grid order shows in the first telemetry after the
devices obeyed it.

The clock is tested on its own; the rest on the wire: SunSpec simulators, the gateway
in-process, a real Mosquitto, the VPP simulator and the grid operator's station.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest

from edge.runtime.cycle_clock import CycleClock
from edge.uplink.messages import Telemetry
from edge.config.profile import Profile
from simulators.deie import Confirmation, DeieOperator
from simulators.sunspec import DeviceSpec, SunSpecSimulator
from simulators.vpp import VppSimulator
from tests.conftest import free_port, wait_port
from tests.test_gateway import SITE, make_profile, online, running_gateway, until


def wall(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------ the clock alone


async def test_each_member_is_woken_once_per_tick_in_the_window_before_it():
    clock = CycleClock(0.2)
    wakes: list[tuple[int, int, float]] = []
    for member in range(10):
        clock.join(lambda k, member=member: wakes.append((member, k, time.monotonic())))
    task = asyncio.create_task(clock.run())
    await asyncio.sleep(1.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    ticks = sorted({k for _, k, _ in wakes})
    assert len(ticks) >= 4
    for k in ticks[:-1]:  # the last tick may have been cut short by the cancel
        woken = [(member, t) for member, kk, t in wakes if kk == k]
        assert sorted(member for member, _ in woken) == list(range(10)), f"tick {k}: each member once"
        window_s = clock.lead_s(0) + 0.005  # the guard may have moved a little; never past the tick
        for member, t in woken:
            assert clock.tick_at(k) - window_s - 0.02 <= t < clock.tick_at(k), (member, k, clock.tick_at(k) - t)
    # the groups are woken one after another, the first the furthest ahead of the tick
    first_tick = [(member, t) for member, k, t in wakes if k == ticks[0]]
    by_group = {}
    for member, t in first_tick:
        by_group.setdefault(member % 4, []).append(t)
    assert max(by_group[0]) <= min(by_group[3])


async def test_the_guard_follows_how_long_polls_take_and_is_capped():
    clock = CycleClock(1.0)
    slot = clock.join(lambda k: None)
    for _ in range(3):
        clock.poll_done(slot, 1, 0.040)
        clock._end_cycle()
    assert clock.guard_s == pytest.approx(1.5 * 0.040 + 0.005)
    clock.poll_done(slot, 2, 5.0)  # a poll stuck behind a timeout
    clock._end_cycle()
    assert clock.guard_s == pytest.approx(0.25)  # at most a quarter of the cycle
    for _ in range(8):  # the slow poll ages out of the history
        clock.poll_done(slot, 3, 0.001)
        clock._end_cycle()
    assert clock.guard_s == pytest.approx(0.015)  # never less than the floor


async def test_the_watchdog_checks_every_member_and_one_failing_check_stops_nothing():
    clock = CycleClock(0.1)
    checks = {"good": 0, "watched": 0}
    woken = []

    def bad() -> None:
        raise RuntimeError("a driver bug")

    clock.join(lambda k: woken.append(k), bad)
    clock.join(lambda k: None, lambda: checks.__setitem__("good", checks["good"] + 1))
    clock.watch(lambda: checks.__setitem__("watched", checks["watched"] + 1))
    task = asyncio.create_task(clock.run())
    await asyncio.sleep(0.55)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert checks["good"] >= 30 and checks["watched"] >= 30  # eight times a cycle
    assert len(woken) >= 4  # the failing member is still woken to poll


# ------------------------------------------------------------------ on the wire


async def test_telemetry_carries_fresh_values_and_their_age(tmp_path, mosquitto):
    cycle_s = 0.5
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=4.0 + i, ramp_pct_per_s=0) for i in range(6)]
    async with SunSpecSimulator(specs, tick_s=0.005) as sim:
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=cycle_s)
        async with running_gateway(profile) as gateway, \
                VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 6), 10, "all six online")
            await asyncio.sleep(3 * cycle_s)  # the guard has settled on the polls' duration
            start = len(vpp.telemetry)
            await until(lambda: len(vpp.telemetry) >= start + 6, 6 * cycle_s + 2, "six more telemetry messages")
            messages = list(vpp.telemetry)[start:start + 6]
            read_at_before: dict[str, float] = {}
            for message in messages:
                Telemetry.model_validate(message)
                tick_wall = wall(message["ts"])
                for asset_id, values in message["assets"].items():
                    assert values["read_at"] is not None and values["age_ms"] is not None, (asset_id, values)
                    read_at = wall(values["read_at"])
                    assert values["age_ms"] == pytest.approx((tick_wall - read_at) * 1000, abs=1.5)
                    # read in the window before this tick: never older than the window, never after the tick
                    assert 0 <= values["age_ms"] <= cycle_s / 4 * 1000 + 40, (asset_id, values["age_ms"])
                    if asset_id in read_at_before:  # a new poll every cycle
                        assert read_at - read_at_before[asset_id] == pytest.approx(cycle_s, abs=0.1)
                    read_at_before[asset_id] = read_at

            # a value that changes shows in the first telemetry whose polls came after the change
            device = sim.devices[2]
            offset = time.time() - time.monotonic()
            changed_at = time.monotonic()
            device.set_sun(9.25)
            window_s = gateway.clock.lead_s(0) + 0.01  # polls for a tick start at most this long before it
            await until(lambda: vpp.telemetry and wall(vpp.telemetry[-1]["ts"]) > changed_at + offset + window_s + cycle_s,
                        3 * cycle_s + 2, "two ticks after the change")
            first = next(m for m in vpp.telemetry if wall(m["ts"]) - window_s > changed_at + offset + 0.01)
            assert first["assets"]["pv2"]["p_kw"] == pytest.approx(9.25, abs=0.01)
            assert wall(first["ts"]) - (changed_at + offset) <= cycle_s + window_s + 0.05


async def test_one_clock_serves_the_site_and_the_image_holds_every_asset(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=5.0) for _ in range(4)]
    async with SunSpecSimulator(specs) as sim:
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5)
        async with running_gateway(profile) as gateway, \
                VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 4), 10, "all four online")
            names = sorted(task.get_name() for task in asyncio.all_tasks())
            assert not [name for name in names if "liveness" in name], names
            assert sum(name == "cycle-clock" for name in names) == 1
            clock = gateway.clock
            image = gateway.controller.process_image
            assert set(image) == {a.id for a in gateway.assets} and all(r.online for r in image.values())
            assert clock.running


async def test_a_grid_order_shows_in_the_first_telemetry_after_the_devices_obeyed(tmp_path, mosquitto):
    """Orders at several phases of the cycle, inside the poll window too (the driver reads the
    device again after the command): the next telemetry and the operator's P show the site under it."""
    cycle_s = 0.5
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0, ramp_pct_per_s=0) for _ in range(2)]
    async with SunSpecSimulator(specs, tick_s=0.005) as sim:
        deie_port = free_port()
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=cycle_s,
                               grid={"deie": {"host": "127.0.0.1", "port": deie_port, "installed_kw": 20.0}})
        async with running_gateway(profile) as gateway, \
                VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 2), 10, "both online")
            await asyncio.to_thread(wait_port, deie_port, 10.0)
            async with DeieOperator("127.0.0.1", deie_port, command_timeout_s=2.0) as operator:
                clock = gateway.clock
                offset = time.time() - time.monotonic()
                limits = [12.0, 6.0, 10.0, 4.0, 9.0]
                # phases before the tick the order lands at: early in the cycle, mid, and inside the
                # poll window after the first group's poll (the re-read path)
                leads_s = [0.4, 0.25, None, 0.15, None]
                for limit_kw, lead_s in zip(limits, leads_s):
                    k = clock.upcoming_tick() + 1
                    if lead_s is None:  # just after the polls, before the guard
                        lead_s = clock.guard_s + 0.012
                    await asyncio.sleep(max(0.0, clock.tick_at(k) - lead_s - time.monotonic()))
                    sent_at = time.monotonic()
                    assert await operator.send_limit_kw(limit_kw) is Confirmation.POSITIVE
                    await until(lambda: sum(d.power_kw for d in sim.devices) <= limit_kw + 0.05, 2, "devices obeyed",
                                interval_s=0.002)
                    obeyed_at = time.monotonic()
                    await until(lambda: vpp.telemetry and wall(vpp.telemetry[-1]["ts"]) > obeyed_at + offset,
                                3 * cycle_s, "a telemetry after the devices obeyed")
                    first = next(m for m in vpp.telemetry if wall(m["ts"]) > obeyed_at + offset)
                    assert first["site"]["p_kw"] <= limit_kw + 0.05, (limit_kw, lead_s, first["site"], first["ts"])
                    assert first["grid_orders"]["export_limit_kw"] == limit_kw
                    report = await operator.wait_measurement("p_measured", lambda v: v <= limit_kw + 0.05,
                                                             timeout_s=3 * cycle_s, after=sent_at)
                    assert report.received_at - obeyed_at <= cycle_s + 0.1
                    assert await operator.send_limit(None) is Confirmation.POSITIVE
                    await until(lambda: sum(d.power_kw for d in sim.devices) > 15.5, 3, "limit lifted")


# ------------------------------------------------------------------ a driver on its own clock


async def test_a_stalled_loop_delays_the_polls_but_takes_no_device_offline():
    """A loop blocked across the poll window (a GC pass, a large schedule): the polls come late,
    none is skipped, so a healthy device is never two cycles silent."""
    from tests.test_sunspec_driver import driving, simulated, tcp_asset

    cycle_s = 0.5
    async with simulated(DeviceSpec(kind="pv", sun_kw=6.0)) as sim:
        async with driving(tcp_asset(sim.device()), cycle_s=cycle_s) as (driver, events):
            clock = driver.clock
            await asyncio.sleep(2 * cycle_s)
            for _ in range(2):
                k = clock.upcoming_tick() + 1
                await asyncio.sleep(clock.tick_at(k) - clock.lead_s(0) - 0.01 - time.monotonic())
                time.sleep(clock.lead_s(0) + 0.03)  # blocks the loop across the whole window and the tick
                await asyncio.sleep(2 * cycle_s)
            assert not events.of("asset_offline"), events.of("asset_offline")
            assert driver.reading().online


async def test_the_periodic_rescan_runs_after_the_tick_and_does_not_widen_the_window():
    from tests.test_sunspec_driver import driving, simulated, tcp_asset

    cycle_s = 0.5
    async with simulated(DeviceSpec(kind="pv", sun_kw=6.0)) as sim:
        async with driving(tcp_asset(sim.device()), cycle_s=cycle_s) as (driver, events):
            real_read = driver.link.read

            async def slow_read(address, count):  # 20 ms a request, as on a 9600 baud RS-485 line
                await asyncio.sleep(0.02)
                return await real_read(address, count)

            driver.link.read = slow_read
            clock = driver.clock
            await asyncio.sleep(4 * cycle_s)
            guard_polls_only = clock.guard_s
            driver._next_rescan = 0.0  # the rescan (every ~10 min) falls due
            await asyncio.sleep(3 * cycle_s)
            assert driver._next_rescan > time.monotonic() + 60  # it ran, and set the next one
            assert clock.guard_s == pytest.approx(guard_polls_only, abs=0.015)
            assert not events.of("asset_offline")
