"""The IEC 104 unit simulators on the wire: c104 client commands, physics, and tshark's dissector view."""

import asyncio
import shutil
import subprocess
import time

import c104
import pytest

from simulators.bess import BessSimulator, BessSpec
from simulators.p2h import P2hSimulator, P2hSpec
from tests.conftest import free_port


def client_for(unit, ioa: int = 1000):
    client = c104.Client(tick_rate_ms=50, command_timeout_ms=500)
    connection = client.add_connection(ip="127.0.0.1", port=unit.port, init=c104.Init.ALL)
    station = connection.add_station(common_address=unit.common_address)
    setpoint = station.add_point(io_address=ioa, type=c104.Type.C_SE_NC_1)
    client.start()
    deadline = time.monotonic() + 5
    unmuted = False
    while connection.state != c104.ConnectionState.OPEN:
        if connection.state == c104.ConnectionState.OPEN_MUTED and time.monotonic() > deadline - 4 and not unmuted:
            unmuted = connection.unmute()  # c104 2.2.1 now and then leaves a new connection muted
        assert time.monotonic() < deadline, f"client did not connect: {connection.state}"
        time.sleep(0.01)
    return client, setpoint


def send(point, value: float) -> bool:
    point.value = value
    return point.transmit(cause=c104.Cot.ACTIVATION)


def test_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="min_load_kw"):
        P2hSpec(min_load_kw=600, max_load_kw=500)
    with pytest.raises(ValueError, match="kind"):
        BessSpec.func("pv")


async def test_bess_ramps_and_integrates_soc_and_refuses_beyond_rating():
    async with BessSimulator([BessSpec(capacity_kwh=0.1, soc_pct=50, ramp_kw_per_s=500, soc_min_pct=40)]) as sim:
        unit = sim.units[0]
        client, setpoint = await asyncio.to_thread(client_for, unit)
        try:
            assert await asyncio.to_thread(send, setpoint, 100.0)
            await asyncio.sleep(0.15)
            assert 0 < unit.power_kw <= 100  # ramping, not jumping
            deadline = time.monotonic() + 5
            while unit.soc_pct > 40 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            assert unit.soc_pct == pytest.approx(40, abs=1.5) and unit.power_kw <= 0.0  # stopped at soc_min
            assert not await asyncio.to_thread(send, setpoint, 150.0)  # beyond max_discharge_kw
            assert [r.accepted for r in unit.commands] == [True, False]
        finally:
            await asyncio.to_thread(client.stop)


async def test_boiler_heats_until_limit_then_stops():
    async with P2hSimulator([P2hSpec(storage_temp_c=94.5, storage_temp_max_c=95, heat_capacity_kwh_per_c=0.01,
                                     draw_kw=0, ramp_kw_per_s=0)]) as sim:
        unit = sim.units[0]
        client, point = await asyncio.to_thread(client_for, unit, unit.points["p_setpoint"].ioa)
        try:
            assert await asyncio.to_thread(send, point, 30.0)  # below min load: accepted, unit off
            await asyncio.sleep(0.25)
            assert unit.power_kw == 0.0 and unit.commands[-1].accepted
            assert await asyncio.to_thread(send, point, 200.0)
            deadline = time.monotonic() + 3
            while unit.storage_temp_c < 95 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.25)
            assert unit.heat_blocked and unit.power_kw == 0.0
        finally:
            await asyncio.to_thread(client.stop)


@pytest.mark.skipif(not shutil.which("tshark"), reason="tshark not installed (apt-get install -y tshark)")
async def test_setpoint_frames_on_the_wire_with_tshark(tmp_path):
    port = free_port()
    capture = tmp_path / "iec104.pcap"
    tshark = subprocess.Popen(["tshark", "-i", "lo", "-f", f"tcp port {port}", "-w", str(capture)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not capture.exists() or capture.stat().st_size == 0:  # pcap header written once capturing
            if tshark.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"tshark cannot capture on lo here: {tshark.stderr.read().decode(errors='replace')[-300:]}")
            await asyncio.sleep(0.05)
        async with BessSimulator([BessSpec(port=port, common_address=7)]) as sim:
            unit = sim.units[0]
            client, setpoint = await asyncio.to_thread(client_for, unit)
            try:
                assert await asyncio.to_thread(send, setpoint, 42.5)
                await asyncio.sleep(0.3)  # its ACT_TERM first: c104 would take it as the next command's answer
                unit.reply = "negative"
                assert not await asyncio.to_thread(send, setpoint, -12.25)
                await asyncio.sleep(0.3)
            finally:
                await asyncio.to_thread(client.stop)
    finally:
        tshark.terminate()
        tshark.wait(5)
    out = subprocess.run(
        ["tshark", "-r", str(capture), "-d", f"tcp.port=={port},iec60870_104", "-Y", "iec60870_asdu.typeid == 50",
         "-T", "fields", "-e", "iec60870_asdu.typeid", "-e", "iec60870_asdu.causetx", "-e", "iec60870_asdu.nega",
         "-e", "iec60870_asdu.addr", "-e", "iec60870_asdu.ioa", "-e", "iec60870_asdu.float"],
        capture_output=True, text=True, timeout=20,
    ).stdout.split("\n")
    rows = [line.split("\t") for line in out if line.strip()]
    # type 50 = C_SE_NC_1; COT 6 activation, 7 ACT_CON, 10 ACT_TERM; P/N bit on the refusal
    summary = [(r[1], str(r[2] in ("1", "True")), r[3], r[4], float(r[5])) for r in rows]
    assert ("6", "False", "7", "1000", 42.5) in summary
    assert ("7", "False", "7", "1000", 42.5) in summary
    assert ("10", "False", "7", "1000", 42.5) in summary
    assert ("6", "False", "7", "1000", -12.25) in summary
    assert ("7", "True", "7", "1000", -12.25) in summary
