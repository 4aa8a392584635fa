"""Shared field links (#11): several SunSpec assets behind one TCP endpoint or on one RS-485 bus
use one Modbus client, on the wire with the bundled simulator.

The simulator serves several unit ids on one TCP port (specs with the same ``port``) or one
serial line (the same ``serial_port``); the bus is a socat pty pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from drivers.sunspec import create
from drivers.sunspec.hub import hubs
from drivers.sunspec.link import LinkFailure, ModbusLink
from drivers.sunspec.config import Serial, SunSpecAsset
from edge.config.profile import Profile, load_profile
from simulators.sunspec import DeviceSpec
from tests.conftest import DriverTask, free_port
from tests.test_profile import check
from tests.test_sunspec_driver import EventLog, pty_pair, simulated, until  # noqa: F401  (pty_pair: fixture)

CYCLE_S = 0.5
UNITS = (1, 2, 3, 4)


# ---------------------------------------------------------------- helpers


def established(port: int) -> int:
    """Established TCP connections to 127.0.0.1:``port`` (client ends), from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


def open_fds_to(path: str) -> int:
    """How many file descriptors of this process are open on ``path``."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == target
    return count


class Driven(DriverTask):
    """One SunSpec driver task and the events it emitted."""

    def __init__(self, asset: SunSpecAsset, cycle_s: float = CYCLE_S):
        self.asset = asset
        self.events = EventLog()
        self.driver = create(asset, cycle_s, self.events)


@contextlib.asynccontextmanager
async def driving_all(assets: list[SunSpecAsset], cycle_s: float = CYCLE_S, online_within_s: float | None = 5.0):
    async with contextlib.AsyncExitStack() as stack:
        driven = [await stack.enter_async_context(Driven(asset, cycle_s)) for asset in assets]
        if online_within_s:
            await until(lambda: all(d.driver.reading().online for d in driven), online_within_s, "all assets online")
        yield driven


def tcp_asset(port: int, unit: int, **extra) -> SunSpecAsset:
    fields = dict(id=f"pv{unit}", kind="pv", driver="sunspec", host="127.0.0.1", port=port, unit_id=unit,
                  timeout_s=0.3, revert_timeout_s=1)
    fields.update(extra)
    return SunSpecAsset(**fields)


def only_hub():
    [hub] = hubs()
    return hub


async def commanded_every_cycle(sim, driven, targets: dict[int, float], cycles: int = 4) -> None:
    """Each unit gets its own target, and every cycle its own revert-timer refresh and nothing else's."""
    for d in driven:
        d.driver.set_target_kw(targets[d.asset.unit_id])
    for d in driven:
        device = sim.device(d.asset.unit_id)
        await until(lambda: device.limit_kw == pytest.approx(targets[d.asset.unit_id], abs=0.01), 2,
                    f"unit {d.asset.unit_id} limited")
    start = time.monotonic()
    requests = {unit: sim.device(unit).requests for unit in targets}
    await asyncio.sleep(cycles * CYCLE_S)
    for d in driven:
        unit = d.asset.unit_id
        device = sim.device(unit)
        mine = [w for w in device.writes if w.t_s >= start]
        limits = {round(w.value, 2) for w in mine if w.point == "WMaxLimPct"}
        timers = [w for w in mine if w.point == "WMaxLimPctRvrtTms"]
        assert limits == {targets[unit] * 10}, (unit, limits)  # percent of the 10 kW rating
        assert len(timers) >= cycles - 1, (unit, [round(w.t_s - start, 2) for w in timers])
        # and polled every cycle: 2 reads per poll with the default PV map
        assert device.requests - requests[unit] >= 2 * (cycles - 1), unit
        reading = d.driver.reading()
        assert reading.online and reading.p_kw == pytest.approx(targets[unit], abs=0.05), (unit, reading)


# ------------------------------------------------------------------- TCP


async def test_four_inverters_behind_one_endpoint_share_one_tcp_connection():
    port = free_port()
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=1.5 * unit, unit_id=unit, port=port) for unit in UNITS]
    async with simulated(*specs) as sim:
        async with driving_all([tcp_asset(port, unit) for unit in UNITS]) as driven:
            assert established(port) == 1
            hub = only_hub()
            assert hub.describe() == f"tcp:127.0.0.1:{port}" and hub.opened == 1
            assert sorted(h.unit_id for h in hub.handles) == list(UNITS)
            for d in driven:  # each reads its own device
                unit = d.asset.unit_id
                assert d.driver.reading().p_kw == pytest.approx(1.5 * unit, abs=0.02)
                [(_, found)] = d.events.of("models_discovered")
                assert found["serial"] == f"SIM{port}-{unit:03d}"
            await commanded_every_cycle(sim, driven, {1: 0.5, 2: 1.0, 3: 2.5, 4: 4.0})
            assert established(port) == 1 and hub.opened == 1 and hub.losses == 0


async def test_a_silent_or_missing_unit_does_not_close_the_link_for_the_others():
    port = free_port()
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=2.0, unit_id=unit, port=port) for unit in (1, 2, 3)]
    async with simulated(*specs) as sim:
        missing = tcp_asset(port, 9)  # nothing behind unit 9: the simulator answers as a gateway, 0x0B
        async with driving_all([tcp_asset(port, unit) for unit in (1, 2, 3)]) as driven:
            async with driving_all([missing], online_within_s=None) as [ghost]:
                _, offline = await ghost.events.next("asset_offline", 3 * CYCLE_S)
                assert "exception 11 (gateway target failed to respond)" in offline["reason"]
                silent_at = time.monotonic()
                sim.device(2).set_silent(True)
                _, offline = await driven[1].events.next("asset_offline", 2 * CYCLE_S + 0.5, after=silent_at)
                assert "no answer" in offline["reason"]
                requests = {unit: sim.device(unit).requests for unit in (1, 3)}
                await asyncio.sleep(4 * CYCLE_S)
                for d in (driven[0], driven[2]):
                    assert not d.events.of("asset_offline") and d.driver.reading().online
                    assert sim.device(d.asset.unit_id).requests - requests[d.asset.unit_id] >= 6
                hub = only_hub()
                assert established(port) == 1 and hub.opened == 1 and hub.losses == 0
                back_at = time.monotonic()
                sim.device(2).set_silent(False)
                await driven[1].events.next("asset_online", 3.0, after=back_at)
                assert established(port) == 1 and hub.opened == 1
                assert not ghost.events.of("asset_online")


async def test_a_link_on_which_no_unit_answers_is_given_up_and_opened_again(caplog):
    # What a half-open connection or a hung gateway looks like: the socket stays up, nothing answers.
    port = free_port()
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=2.0, unit_id=unit, port=port) for unit in (1, 2)]
    async with simulated(*specs) as sim:
        async with driving_all([tcp_asset(port, unit) for unit in (1, 2)]) as driven:
            hub = only_hub()
            for device in sim.devices:
                device.set_silent(True)
            await until(lambda: hub.losses >= 1 and hub.opened >= 2, 5.0, "link given up and opened again")
            assert "no answer from units 1, 2 since the last answer" in caplog.text
            assert all(not d.driver.reading().online for d in driven)
            assert established(port) <= 1
            back_at = time.monotonic()
            for device in sim.devices:
                device.set_silent(False)
            for d in driven:
                await d.events.next("asset_online", 10.0, after=back_at)
            assert hub.opened >= 2 and established(port) == 1


async def test_a_dead_link_takes_all_its_assets_offline_at_once_and_one_reconnect_brings_them_back():
    port = free_port()
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=2.0 + unit, unit_id=unit, port=port) for unit in UNITS]
    cycle_s = 1.0  # the liveness verdict would take two cycles: the link's comes at once
    async with simulated(*specs) as sim:
        async with driving_all([tcp_asset(port, unit) for unit in UNITS], cycle_s=cycle_s) as driven:
            hub = only_hub()
            assert established(port) == 1 and hub.opened == 1
            attempts = hub.attempts
            down_at = time.monotonic()
            await sim.set_offline(sim.devices[0], True)  # the endpoint closes: connections drop, new ones refused
            offline = [await d.events.next("asset_offline", 1.0, after=down_at) for d in driven]
            times = [t for t, _ in offline]
            assert max(times) - down_at < 0.5 * cycle_s and max(times) - min(times) < 0.05, times
            assert all("lost" in detail["reason"] for _, detail in offline), offline
            assert all(not d.driver.reading().online for d in driven)
            await asyncio.sleep(2.0)
            assert established(port) == 0
            # at most one connect per back-off step of the link, not one per asset
            tried = hub.attempts - attempts
            assert 1 <= tried <= 8, tried
            up_at = time.monotonic()
            await sim.set_offline(sim.devices[0], False)
            for d in driven:
                await d.events.next("asset_online", 10.0, after=up_at)
            assert hub.opened == 2, "one reconnect for all four"
            assert established(port) == 1
            for d in driven:
                assert d.driver.reading().p_kw == pytest.approx(2.0 + d.asset.unit_id, abs=0.02)


# ------------------------------------------------------------------- RTU


async def test_two_inverters_on_one_serial_bus_share_one_client(pty_pair):
    device_end, driver_end = pty_pair
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=3.0 * unit, unit_id=unit, serial_port=device_end,
                        baudrate=19200) for unit in (1, 2)]
    assets = [SunSpecAsset(id=f"rtu{unit}", kind="pv", driver="sunspec", unit_id=unit, timeout_s=0.5, revert_timeout_s=1,
                           serial={"port": driver_end, "baudrate": 19200}) for unit in (1, 2)]
    async with simulated(*specs) as sim:
        async with driving_all(assets) as driven:
            assert open_fds_to(driver_end) == 1
            hub = only_hub()
            assert hub.describe() == f"rtu:{driver_end}@19200 8N1" and hub.opened == 1
            assert hub.inter_frame_s() == pytest.approx(3.5 * 10 / 19200)  # 3.5 characters of 10 bits
            for d in driven:
                assert d.driver.reading().p_kw == pytest.approx(3.0 * d.asset.unit_id, abs=0.02)
            await commanded_every_cycle(sim, driven, {1: 1.0, 2: 2.0})
            assert open_fds_to(driver_end) == 1 and hub.opened == 1 and hub.losses == 0


async def test_the_bus_is_quiet_between_frames_for_the_longest_delay_of_its_assets(pty_pair):
    device_end, driver_end = pty_pair
    specs = [DeviceSpec(kind="pv", unit_id=unit, serial_port=device_end, baudrate=9600) for unit in (1, 2)]
    line = {"port": driver_end, "baudrate": 9600}
    fast = SunSpecAsset(id="a", kind="pv", driver="sunspec", unit_id=1, serial=line)
    slow = SunSpecAsset(id="b", kind="pv", driver="sunspec", unit_id=2, serial={**line, "inter_frame_delay_ms": 80})
    async with simulated(*specs):
        links = [ModbusLink(fast), ModbusLink(slow)]
        try:
            await asyncio.gather(*(link.connect() for link in links))
            assert links[0].hub is links[1].hub and links[0].hub.opened == 1
            done = []
            for link in links * 3:  # one unit after the other, as polls of two assets interleave
                assert await link.read(40000, 2) == [0x5375, 0x6E53]
                done.append(time.monotonic())
            gaps = [b - a for a, b in zip(done, done[1:])]
            assert min(gaps) >= 0.08, gaps
        finally:
            for link in links:
                link.close()
        assert not links[0].connected and open_fds_to(driver_end) == 0  # closed with its last asset


async def test_a_second_client_with_other_settings_is_refused_at_run_time(pty_pair):
    device_end, driver_end = pty_pair
    async with simulated(DeviceSpec(kind="pv", unit_id=1, serial_port=device_end, baudrate=9600)):
        first = ModbusLink(SunSpecAsset(id="a", kind="pv", driver="sunspec", unit_id=1,
                                        serial={"port": driver_end, "baudrate": 9600}))
        other = ModbusLink(SunSpecAsset(id="b", kind="pv", driver="sunspec", unit_id=2,
                                        serial={"port": driver_end, "baudrate": 19200}))
        await first.connect()
        try:
            with pytest.raises(LinkFailure, match=r"opened for asset 'a'.*asset 'b' asks for rtu:.*@192008N1"):
                await other.connect()
            assert await first.read(40000, 2) == [0x5375, 0x6E53]
        finally:
            first.close()
            other.close()


# ------------------------------------------------------------- profile


SHARED = """\
site:
  id: s
assets:
  - id: inv-a
    kind: pv
    driver: sunspec
    serial: {port: /dev/ttyUSB0, baudrate: 9600, inter_frame_delay_ms: 5}
    unit_id: 1
  - id: inv-b
    kind: pv
    driver: sunspec
    serial:
      port: /dev/ttyUSB0
      baudrate: 19200
      parity: E
    unit_id: 2
  - id: inv-c
    kind: pv
    driver: sunspec
    serial: {port: /dev/ttyUSB0, baudrate: 9600}
    unit_id: 1
  - id: dm-1
    kind: pv
    driver: sunspec
    host: DataManager.local
    unit_id: 3
  - id: dm-2
    kind: pv
    driver: sunspec
    host: datamanager.local
    port: 502
    unit_id: 3
"""


def test_check_refuses_conflicting_serial_settings_and_a_unit_id_used_twice_on_one_link(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(SHARED)
    result = check(path)
    assert result.returncode == 2, result.stdout
    lines = result.stderr.splitlines()
    assert lines[0].endswith("4 problems"), result.stderr
    assert (
        "site.yaml:14 assets[1].serial.baudrate: asset 'inv-b' sets baudrate 19200 on serial port /dev/ttyUSB0, "
        "asset 'inv-a' (assets[0]) sets 9600 on the same port" in result.stderr
    )
    assert "site.yaml:15 assets[1].serial.parity: asset 'inv-b' sets parity E" in result.stderr
    assert "asset 'inv-a' (assets[0]) sets N on the same port" in result.stderr
    assert (
        "site.yaml:21 assets[2].unit_id: asset 'inv-c' and asset 'inv-a' (assets[0]) both use unit id 1 on "
        "serial port /dev/ttyUSB0" in result.stderr
    )
    # host names are not case-sensitive, and 502 is the default port
    assert (
        "site.yaml:32 assets[4].unit_id: asset 'dm-2' and asset 'dm-1' (assets[3]) both use unit id 3 on "
        "datamanager.local:502" in result.stderr
    )


def test_a_meter_may_share_its_unit_id_with_the_inverter_whose_chain_carries_it():
    base = {"site": {"id": "s"}, "uplink": {"mqtt": {"host": "127.0.0.1"}}}
    inverter = {"id": "inv", "kind": "pv", "driver": "sunspec", "host": "10.0.0.5", "unit_id": 1}
    meter = {"id": "grid", "kind": "meter", "driver": "sunspec", "host": "10.0.0.5", "unit_id": 1,
             "connection_point": True}
    Profile.model_validate({**base, "assets": [inverter, meter]})
    with pytest.raises(ValueError, match="asset 'inv2' and asset 'inv' .* both use unit id 1 on 10.0.0.5:502"):
        Profile.model_validate({**base, "assets": [inverter, meter, {**inverter, "id": "inv2"}]})


def test_shared_links_that_agree_pass(tmp_path):
    text = SHARED.replace("      baudrate: 19200\n      parity: E\n", "      inter_frame_delay_ms: 20\n")
    text = text.replace("    serial: {port: /dev/ttyUSB0, baudrate: 9600}\n    unit_id: 1\n",
                        "    serial: {port: /dev/ttyUSB0, baudrate: 9600}\n    unit_id: 3\n")
    text = text.replace("    port: 502\n    unit_id: 3\n", "    port: 502\n    unit_id: 4\n")
    path = tmp_path / "site.yaml"
    path.write_text(text)
    profile = load_profile(path)  # a different inter_frame_delay_ms is fine: the line uses the largest
    assert [a.link_key for a in profile.assets[:3]] == [("rtu", "/dev/ttyUSB0")] * 3
    assert profile.assets[3].link_key == profile.assets[4].link_key == ("tcp", "datamanager.local", 502)
    # one unit id on two links is no conflict
    Profile.model_validate({"site": {"id": "s"}, "assets": [
        {"id": "a", "kind": "pv", "driver": "sunspec", "host": "10.0.0.1", "unit_id": 1},
        {"id": "b", "kind": "pv", "driver": "sunspec", "host": "10.0.0.1", "port": 1502, "unit_id": 1},
        {"id": "c", "kind": "pv", "driver": "sunspec", "serial": {"port": "/dev/ttyUSB1"}, "unit_id": 1},
    ]})


def test_a_symlinked_serial_name_is_the_same_line(tmp_path):
    device = tmp_path / "ttyUSB0"
    device.touch()
    alias = tmp_path / "usb-FTDI-if00-port0"
    alias.symlink_to(device)
    assets = [{"id": name, "kind": "pv", "driver": "sunspec", "serial": {"port": str(port), "stopbits": stop}}
              for name, port, stop in (("a", device, 1), ("b", alias, 2))]
    with pytest.raises(ValidationError, match=r"asset 'b' sets stopbits 2 .* asset 'a'"):
        Profile.model_validate({"site": {"id": "s"}, "assets": assets})


@pytest.mark.parametrize("settings, gap_ms", [
    ({}, 3.5 * 10 / 9.6),  # 9600 8N1: 10 bits a character
    ({"parity": "E"}, 3.5 * 11 / 9.6),
    ({"baudrate": 1200, "stopbits": 2}, 3.5 * 11 / 1.2),
    ({"baudrate": 38400}, 1.75),  # above 19200 baud the spec fixes t3.5 at 1.75 ms
    ({"baudrate": 115200, "inter_frame_delay_ms": 0}, 0.0),
    ({"inter_frame_delay_ms": 50}, 50.0),
])
def test_inter_frame_delay_defaults_to_three_and_a_half_characters(settings, gap_ms):
    assert Serial(port="/dev/ttyS0", **settings).inter_frame_s * 1000 == pytest.approx(gap_ms)


# ------------------------------------------------------------- gateway


async def test_gateway_drives_three_units_behind_one_endpoint_over_one_connection(tmp_path, mosquitto):
    from simulators.sunspec import SunSpecSimulator
    from simulators.vpp import VppSimulator
    from tests.test_gateway import SITE, make_profile, online, running_gateway

    port = free_port()
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0, unit_id=unit, port=port) for unit in (1, 2, 3)]
    async with SunSpecSimulator(specs) as sim:
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5)
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 3), 10, "three assets online")
            assert established(port) == 1
            sent_at = time.monotonic()
            sent = await vpp.send_setpoint(-6.0, valid_s=30)
            assert (await vpp.wait_ack(sent["id"], timeout_s=2))["status"] == "accepted"
            for device in sim.devices:  # pro rata: 2 kW down each, from 8 to 6 kW = 60 % of 10 kW
                write = await device.next_write("WMaxLimPct", model_id=704, after_s=sent_at, timeout_s=2.0)
                assert write.unit_id == device.unit_id and write.value == pytest.approx(60.0, abs=0.05)
            assert established(port) == 1


async def test_an_endpoint_that_accepts_and_drops_at_once_is_retried_at_the_backoffs_pace():
    """A data manager over its connection limit accepts and resets: one attempt per connect()
    call, the next after the back-off, not a reconnect in a tight loop."""
    accepts = 0

    async def accept_and_reset(reader, writer):
        nonlocal accepts
        accepts += 1
        writer.transport.abort()

    server = await asyncio.start_server(accept_and_reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    links = [ModbusLink(SunSpecAsset(id=f"pv{u}", kind="pv", driver="sunspec", host="127.0.0.1", port=port,
                                     unit_id=u, timeout_s=0.3)) for u in (1, 2)]
    try:
        deadline = time.monotonic() + 2.0
        failures = 0
        while (left_s := deadline - time.monotonic()) > 0:
            # a connect() that finds the last attempt failed moments ago waits for the next one
            results = await asyncio.gather(*(asyncio.wait_for(link.connect(), left_s) for link in links),
                                           return_exceptions=True)
            assert all(isinstance(r, (LinkFailure, TimeoutError)) for r in results), results  # never connects
            failures += sum(isinstance(r, LinkFailure) for r in results)
        assert failures >= 4  # each attempt's failure reaches every asset waiting for it
        assert accepts <= 6, f"{accepts} connections in 2 s"  # 0.1, 0.2, 0.4, 0.8 s apart at most
    finally:
        for link in links:
            link.close()
        server.close()
        await server.wait_closed()
