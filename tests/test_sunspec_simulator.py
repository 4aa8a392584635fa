"""The SunSpec simulator, checked over the wire with a real pymodbus client (and pysunspec2 as decoder)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from contextlib import asynccontextmanager

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from sunspec2.device import Model, get_model_def

from simulators.sunspec import DeviceSpec, SunSpecSimulator
from conftest import free_port

pytestmark = pytest.mark.timeout(30)

SUNS = [0x5375, 0x6E53]


@asynccontextmanager
async def tcp_client(port: int, timeout_s: float = 1.0):
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=timeout_s, retries=0)
    assert await asyncio.wait_for(client.connect(), 3)
    try:
        yield client
    finally:
        client.close()


async def read(client, address: int, count: int, unit: int = 1) -> list[int]:
    response = await asyncio.wait_for(client.read_holding_registers(address, count=count, device_id=unit), 5)
    assert not response.isError(), f"read {address}+{count}: {response}"
    return response.registers


async def write(client, address: int, values: list[int] | int, unit: int = 1):
    if isinstance(values, int):
        return await asyncio.wait_for(client.write_register(address, values, device_id=unit), 5)
    return await asyncio.wait_for(client.write_registers(address, values, device_id=unit), 5)


async def scan(client, base: int, unit: int = 1) -> dict[int, Model]:
    """Walk the model chain like a driver and decode every block with pysunspec2."""
    assert await read(client, base, 2, unit) == SUNS
    models: dict[int, Model] = {}
    address = base + 2
    for _ in range(50):
        model_id, length = await read(client, address, 2, unit)
        if model_id == 0xFFFF:
            assert length == 0
            return models
        regs: list[int] = []
        start, left = address, length + 2
        while left:
            count = min(left, 125)
            regs += await read(client, start, count, unit)
            start, left = start + count, left - count
        data = b"".join(r.to_bytes(2, "big") for r in regs)
        models[model_id] = Model(model_id, address, length, get_model_def(model_id), data=data)
        address += length + 2
    raise AssertionError("no end marker")


def s16(raw: int) -> int:
    return raw - 0x10000 if raw & 0x8000 else raw


async def wait_until(predicate, timeout_s: float = 3.0, step_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step_s)


@pytest.mark.parametrize("base", [40000, 0, 50000])
async def test_suns_marker_and_model_chain_at_each_base(base):
    spec = DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0, base_address=base, unit_id=3)
    async with SunSpecSimulator([spec]) as sim, tcp_client(sim.devices[0].port) as client:
        models = await scan(client, base, unit=3)
        assert list(models) == [1, 103, 120, 121, 123, 704]
        assert models[1].Mn.value == "flexedge" and models[1].DA.value == 3
        assert models[120].WRtg.cvalue == 10000
        assert models[103].W.cvalue == pytest.approx(8000)
        # nothing outside the map: other bases and past the end marker are illegal addresses
        for other in {40000, 0, 50000} - {base}:
            response = await client.read_holding_registers(other, count=2, device_id=3)
            assert response.isError() and response.exception_code == 2
        end = base + 2 + sum(m.len for m in models.values())  # pysunspec2 len includes ID and L
        assert await read(client, end, 2, 3) == [0xFFFF, 0]
        response = await client.read_holding_registers(end, count=3, device_id=3)
        assert response.isError()


async def test_scale_factors_on_read_default_and_override():
    specs = [
        DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=7.25),
        DeviceSpec(kind="pv", rated_kw=3.0, sun_kw=2.5, scale_factors={"W_SF": -1, "WRtg_SF": 0}),
    ]
    async with SunSpecSimulator(specs) as sim:
        first, second = sim.devices
        async with tcp_client(first.port) as client:
            address = first.image.address_of(103, "W")
            raw_w, raw_sf = await read(client, address, 2)
            assert (s16(raw_w), s16(raw_sf)) == (725, 1)  # 7250 W = 725 * 10**1
            pct_sf = await read(client, first.image.address_of(704, "WMaxLimPct_SF"), 1)
            assert s16(pct_sf[0]) == -2
            assert (await read(client, first.image.address_of(103, "Hz"), 2)) == [5000, 0xFFFE]
        async with tcp_client(second.port) as client:
            raw_w, raw_sf = await read(client, second.image.address_of(103, "W"), 2)
            assert (s16(raw_w), s16(raw_sf)) == (25000, -1)
            models = await scan(client, 40000)
            assert models[120].WRtg.value == 3000 and models[120].WRtg_SF.value == 0


async def test_704_limit_follows_with_ramp_and_records_raw_and_scaled():
    spec = DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0, ramp_pct_per_s=50.0)  # 5 kW/s
    async with SunSpecSimulator([spec]) as sim, tcp_client(sim.devices[0].port) as client:
        pv = sim.devices[0]
        image = pv.image
        sent_at = time.monotonic()
        await write(client, image.address_of(704, "WMaxLimPctEna"), [1, 2000])  # Ena, WMaxLimPct 20.00 %
        assert [(r.point, r.raw, r.value) for r in pv.writes] == [("WMaxLimPctEna", 1, 1.0), ("WMaxLimPct", 2000, 20.0)]
        assert all(r.accepted and r.model_id == 704 and r.t_s >= sent_at for r in pv.writes)
        assert pv.limit_pct == pytest.approx(20.0) and pv.control_source == "704"
        w_address = image.address_of(103, "W")
        samples: list[int] = []
        while not samples or samples[-1] != 200:  # 20 % of 10 kW with W_SF 1
            assert time.monotonic() - sent_at < 4.0, f"no 2 kW after 4 s: {samples}"
            samples.append(s16((await read(client, w_address, 1))[0]))
            await asyncio.sleep(0.1)
        assert time.monotonic() - sent_at > 1.0  # 6 kW at 5 kW/s takes 1.2 s
        assert any(200 < raw < 800 for raw in samples), f"output jumped instead of ramping: {samples}"
        assert samples == sorted(samples, reverse=True)
        st = await read(client, image.address_of(103, "St"), 1)
        assert st == [5]  # THROTTLED
        # release
        await write(client, image.address_of(704, "WMaxLimPctEna"), 0)
        await wait_until(lambda: pv.power_kw == pytest.approx(8.0), timeout_s=2.5)
        assert pv.limit_pct is None


async def test_123_limit_is_percent_of_wmax_and_reverts():
    spec = DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=9.0, ramp_pct_per_s=0, models=[1, 103, 120, 121, 123])
    async with SunSpecSimulator([spec]) as sim, tcp_client(sim.devices[0].port) as client:
        pv = sim.devices[0]
        image = pv.image
        await write(client, image.address_of(123, "WMaxLimPct"), 5000)  # 50.00 %
        await write(client, image.address_of(123, "WMaxLimPct_RvrtTms"), 1)
        await write(client, image.address_of(121, "WMax"), 800)  # 8000 W with WMax_SF 1
        # The timer runs from the enable write: bracket it by the times around that write
        # (not by when the test saw the power move, which a busy machine delays).
        before_write = time.monotonic()
        await write(client, image.address_of(123, "WMaxLim_Ena"), 1)
        after_write = time.monotonic()
        await wait_until(lambda: pv.power_kw == pytest.approx(4.0), timeout_s=1.0)
        await wait_until(lambda: pv.reverts, timeout_s=2.5)
        assert pv.reverts[0].t_s - before_write > 0.9 and pv.reverts[0].t_s - after_write < 1.6
        assert pv.reverts[0].timer == "WMaxLimPct_RvrtTms"
        assert await read(client, image.address_of(123, "WMaxLim_Ena"), 1) == [0]
        await wait_until(lambda: pv.power_kw == pytest.approx(8.0), timeout_s=1.0)  # WMax caps it now


async def test_704_revert_timer_is_refreshed_by_each_write():
    spec = DeviceSpec(kind="storage", rated_kw=10.0, capacity_kwh=50.0, ramp_pct_per_s=0)
    async with SunSpecSimulator([spec]) as sim, tcp_client(sim.devices[0].port) as client:
        bess = sim.devices[0]
        image = bess.image
        wset = image.address_of(704, "WSet")
        await write(client, image.address_of(704, "WSetRvrtTms"), [0, 1])
        await write(client, wset, [0xFFFF, 0xFFFF - 30000 + 1])  # -30000 raw = -3000 W with WSet_SF -1
        await write(client, image.address_of(704, "WSetEna"), 1)
        await wait_until(lambda: bess.power_kw == pytest.approx(-3.0), timeout_s=1.0)
        assert bess.writes[1].point == "WSet" and bess.writes[1].raw == -30000 and bess.writes[1].value == -3000.0
        for _ in range(4):  # refresh every 0.5 s for 2 s: no revert
            await asyncio.sleep(0.5)
            await write(client, wset, [0xFFFF, 0xFFFF - 30000 + 1])
        assert not bess.reverts and bess.power_kw == pytest.approx(-3.0)
        remaining = await read(client, image.address_of(704, "WSetRvrtRem"), 2)
        assert remaining == [0, 1]
        await wait_until(lambda: bess.reverts, timeout_s=2.0)
        assert await read(client, image.address_of(704, "WSetEna"), 1) == [0]
        await wait_until(lambda: bess.power_kw == 0.0, timeout_s=1.0)


async def test_storage_soc_integrates_and_soc_limit_stops_discharge():
    # 100 Wh battery discharging at 3.6 kW loses 1 % per second
    spec = DeviceSpec(kind="storage", rated_kw=5.0, capacity_kwh=0.1, soc_pct=3.0, soc_min_pct=1.5, ramp_pct_per_s=0)
    async with SunSpecSimulator([spec]) as sim, tcp_client(sim.devices[0].port) as client:
        bess = sim.devices[0]
        image = bess.image
        await write(client, image.address_of(704, "WSet"), [0, 36000])  # 3600.0 W
        await write(client, image.address_of(704, "WSetEna"), 1)
        start = time.monotonic()
        await asyncio.sleep(0.5)
        assert bess.power_kw == pytest.approx(3.6)
        soc_raw = (await read(client, image.address_of(802, "SoC"), 1))[0]  # SoC_SF -1
        expected = 3.0 - (time.monotonic() - start)
        assert soc_raw / 10 == pytest.approx(expected, abs=0.25)
        await wait_until(lambda: bess.power_kw == 0.0, timeout_s=2.5)
        assert bess.soc_pct == pytest.approx(1.5, abs=0.15)
        assert await read(client, image.address_of(802, "ChaSt"), 1) == [2]  # EMPTY
        # charging is still allowed
        await write(client, image.address_of(704, "WSet"), [0xFFFF, 0x10000 - 20000])  # -2000.0 W
        await wait_until(lambda: bess.power_kw == pytest.approx(-2.0), timeout_s=1.0)
        await wait_until(lambda: bess.soc_pct > 1.7, timeout_s=1.5)


async def test_124_storage_path_without_704():
    spec = DeviceSpec(kind="storage", rated_kw=10.0, capacity_kwh=20.0, ramp_pct_per_s=0,
                      models=[1, 103, 120, 121, 124, 802])
    async with SunSpecSimulator([spec]) as sim, tcp_client(sim.devices[0].port) as client:
        bess = sim.devices[0]
        image = bess.image
        assert s16((await read(client, image.address_of(124, "InOutWRte_SF"), 1))[0]) == -2
        assert await read(client, image.address_of(124, "WChaMax"), 1) == [1000]  # 10 kW, SF 1
        # discharge 4 kW: OutWRte = 40 %, InWRte = -40 %, both limit bits
        await write(client, image.address_of(124, "OutWRte"), [4000, 0x10000 - 4000, 0, 1])  # + RvrtTms 1 s
        await write(client, image.address_of(124, "StorCtl_Mod"), 3)
        await wait_until(lambda: bess.power_kw == pytest.approx(4.0), timeout_s=1.0)
        assert bess.control_source == "124"
        assert [r.point for r in bess.writes[:4]] == ["OutWRte", "InWRte", "InOutWRte_WinTms", "InOutWRte_RvrtTms"]
        assert bess.writes[1].value == pytest.approx(-40.0)
        await wait_until(lambda: bess.reverts, timeout_s=2.0)
        assert await read(client, image.address_of(124, "StorCtl_Mod"), 1) == [0]
        assert bess.power_kw == 0.0
        # charge 2.5 kW
        await write(client, image.address_of(124, "OutWRte"), [0x10000 - 2500, 2500])
        await write(client, image.address_of(124, "StorCtl_Mod"), 3)
        await wait_until(lambda: bess.power_kw == pytest.approx(-2.5), timeout_s=1.0)
        chast = await read(client, image.address_of(124, "ChaSt"), 1)
        assert chast == [4]  # CHARGING


async def test_hybrid_setpoint_uses_battery_then_curtails_pv():
    spec = DeviceSpec(kind="hybrid", rated_kw=10.0, sun_kw=6.0, max_charge_kw=3.0, ramp_pct_per_s=0)
    async with SunSpecSimulator([spec]) as sim, tcp_client(sim.devices[0].port) as client:
        hybrid = sim.devices[0]
        assert hybrid.power_kw == pytest.approx(6.0)
        image = hybrid.image
        await write(client, image.address_of(704, "WSet"), [0, 10000])  # 1000.0 W at the AC side
        await write(client, image.address_of(704, "WSetEna"), 1)
        await wait_until(lambda: hybrid.power_kw == pytest.approx(1.0), timeout_s=1.0)
        assert hybrid.battery_kw == pytest.approx(-3.0)  # charges at its maximum
        assert hybrid.pv_kw == pytest.approx(4.0)  # the rest of the PV is curtailed
        await write(client, image.address_of(704, "WSet"), [80000 >> 16, 80000 & 0xFFFF])  # 8 kW: battery adds 2
        await wait_until(lambda: hybrid.battery_kw == pytest.approx(2.0), timeout_s=1.0)
        models = await scan(client, 40000)
        assert models[103].W.cvalue == pytest.approx(8000)
        assert models[802].W.cvalue == pytest.approx(2000)


async def test_meter_sign_convention():
    specs = [
        DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=5.0, port=0),
        DeviceSpec(kind="meter", load_kw=2.0, unit_id=2),
        DeviceSpec(kind="meter", load_kw=2.0, unit_id=3, meter_import_positive=False),
    ]
    async with SunSpecSimulator(specs) as sim:
        _, import_positive, export_positive = sim.devices
        assert import_positive.power_kw == pytest.approx(3.0)  # the site exports 3 kW
        async with tcp_client(import_positive.port) as client:
            models = await scan(client, 40000, unit=2)
            assert list(models) == [1, 203]
            assert models[203].W.cvalue == pytest.approx(-3000)
            assert models[203].Hz.cvalue == pytest.approx(50.0)
        async with tcp_client(export_positive.port) as client:
            models = await scan(client, 40000, unit=3)
            assert models[203].W.cvalue == pytest.approx(3000)
        import_positive.set_load(7.5)
        await asyncio.sleep(0.25)
        async with tcp_client(import_positive.port) as client:
            raw = await read(client, import_positive.image.address_of(203, "W"), 1, unit=2)
            assert s16(raw[0]) == 250  # 2.5 kW import, W_SF 1


async def test_grid_values_are_reported():
    async with SunSpecSimulator([DeviceSpec(kind="pv", sun_kw=1.0)]) as sim, tcp_client(sim.devices[0].port) as client:
        pv = sim.devices[0]
        pv.set_grid(voltage_v=241.3, frequency_hz=49.85)
        models = await scan(client, 40000)
        assert models[103].PhVphA.cvalue == pytest.approx(241.3)
        assert models[103].Hz.cvalue == pytest.approx(49.85)


async def test_invalid_writes_are_rejected_and_recorded():
    async with SunSpecSimulator([DeviceSpec(kind="pv", sun_kw=5.0)]) as sim, tcp_client(sim.devices[0].port) as client:
        pv = sim.devices[0]
        image = pv.image
        response = await write(client, image.address_of(704, "WMaxLimPct"), 10001)  # 100.01 %
        assert response.isError() and response.exception_code == 3
        response = await write(client, image.address_of(704, "WMaxLimPctEna"), 2)  # not an enum value
        assert response.isError() and response.exception_code == 3
        response = await write(client, image.address_of(103, "W"), 1)  # read-only
        assert response.isError() and response.exception_code == 2
        response = await write(client, image.address_of(704, "ID"), 704)  # model header
        assert response.isError() and response.exception_code == 2
        assert [r.accepted for r in pv.writes] == [False] * 4
        assert "outside" in pv.writes[0].reason and pv.writes[0].raw == 10001
        assert await read(client, image.address_of(704, "WMaxLimPct"), 1) == [10000]
        assert pv.limit_pct is None


async def test_next_write_measures_setpoint_to_register_latency():
    async with SunSpecSimulator([DeviceSpec(kind="pv", sun_kw=5.0)]) as sim, tcp_client(sim.devices[0].port) as client:
        pv = sim.devices[0]
        waiter = asyncio.create_task(pv.next_write("WMaxLimPct", timeout_s=2.0))
        await asyncio.sleep(0)
        sent = time.monotonic()
        await write(client, pv.image.address_of(704, "WMaxLimPct"), 5000)
        record = await waiter
        assert record.raw == 5000 and 0 <= record.t_s - sent < 0.5
        with pytest.raises(TimeoutError):
            await pv.next_write("WSet", timeout_s=0.2)
        await write(client, pv.image.address_of(704, "WMaxLimPct"), 6000)
        later = await pv.next_write("WMaxLimPct", after_s=sent, where=lambda r: r.raw == 6000, timeout_s=1.0)
        assert later.raw == 6000 and later.t_s > record.t_s


async def test_silent_garbage_and_busy_faults():
    async with SunSpecSimulator([DeviceSpec(kind="pv", sun_kw=5.0)]) as sim:
        pv = sim.devices[0]
        async with tcp_client(pv.port, timeout_s=0.3) as client:
            pv.set_silent(True)
            started = time.monotonic()
            with pytest.raises((ModbusException, asyncio.TimeoutError)):
                await asyncio.wait_for(client.read_holding_registers(40000, count=2, device_id=1), 3)
            assert time.monotonic() - started >= 0.25
            with pytest.raises((ModbusException, asyncio.TimeoutError)):
                await asyncio.wait_for(client.write_register(pv.image.address_of(704, "WMaxLimPctEna"), 1,
                                                             device_id=1), 3)
            assert pv.writes == [] and pv.limit_pct is None  # a silent device processes nothing
        pv.set_silent(False)
        async with tcp_client(pv.port) as client:
            assert await read(client, 40000, 2) == SUNS
            pv.set_fault("busy")
            response = await client.read_holding_registers(40000, count=2, device_id=1)
            assert response.isError() and response.exception_code == 6
        pv.set_fault("garbage")
        async with tcp_client(pv.port, timeout_s=0.3) as client:
            for _ in range(3):  # random replies: an error or a wrong answer, never the real data
                try:
                    response = await asyncio.wait_for(client.read_holding_registers(40000, count=2, device_id=1), 3)
                except (ModbusException, asyncio.TimeoutError):
                    continue
                assert response.isError() or response.registers != SUNS
        pv.set_fault(None)
        async with tcp_client(pv.port) as client:
            assert await read(client, 40000, 2) == SUNS


async def test_offline_device_refuses_connections_then_comes_back():
    async with SunSpecSimulator([DeviceSpec(kind="pv", sun_kw=1.0)]) as sim:
        pv = sim.devices[0]
        port = pv.port
        await sim.set_offline(pv)
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.3, retries=0)
        assert not await asyncio.wait_for(client.connect(), 3)
        client.close()
        await sim.set_offline(pv, False)
        assert pv.port == port
        async with tcp_client(port) as client:
            assert await read(client, 40000, 2) == SUNS


async def test_unknown_unit_gets_gateway_exception():
    async with SunSpecSimulator([DeviceSpec(kind="pv", sun_kw=1.0, unit_id=1)]) as sim:
        async with tcp_client(sim.devices[0].port) as client:
            response = await client.read_holding_registers(40000, count=2, device_id=9)
            assert response.isError() and response.exception_code == 0x0B


async def test_replace_models_hot_and_with_new_base():
    async with SunSpecSimulator([DeviceSpec(kind="pv", sun_kw=4.0)]) as sim:
        pv = sim.devices[0]
        async with tcp_client(pv.port) as client:
            assert list(await scan(client, 40000)) == [1, 103, 120, 121, 123, 704]
            await pv.replace_models([1, 103, 120, 121, 123])  # firmware drops 704, same connection
            assert list(await scan(client, 40000)) == [1, 103, 120, 121, 123]
            await pv.replace_models([1, 103, 120, 121, 704, 123])  # and brings it back elsewhere
            models = await scan(client, 40000)
            assert list(models) == [1, 103, 120, 121, 704, 123]
            assert models[704].model_addr == pv.image.address_of(704)
        port = pv.port
        await pv.replace_models([1, 103, 120, 123], base_address=0)
        assert pv.port == port
        async with tcp_client(pv.port) as client:
            assert list(await scan(client, 0)) == [1, 103, 120, 123]
            response = await client.read_holding_registers(40000, count=2, device_id=1)
            assert response.isError()


async def test_many_devices_and_shared_port():
    port = free_port()
    specs = [DeviceSpec(kind="pv", rated_kw=5.0 + i, sun_kw=1.0 + i * 0.1) for i in range(20)]
    specs += [DeviceSpec(kind="storage", unit_id=unit, port=port) for unit in (1, 2, 3)]
    async with SunSpecSimulator(specs) as sim:
        ports = {d.port for d in sim.devices[:20]}
        assert len(ports) == 20
        for device in sim.devices[:20:5]:
            async with tcp_client(device.port) as client:
                raw = await read(client, device.image.address_of(103, "W"), 1)
                assert raw[0] * 10 == pytest.approx(device.power_kw * 1000, abs=10)
        async with tcp_client(port) as client:
            for unit in (1, 2, 3):
                assert (await read(client, sim.device(unit).image.address_of(1, "DA"), 1, unit))[0] == unit
            await write(client, sim.device(2).image.address_of(704, "WSetEna"), 1, unit=2)
            assert [r.unit_id for d in sim.devices for r in d.writes] == [2]
            assert [d.requests for d in sim.devices[20:]] == [1, 2, 1]  # reads and the accepted write
    with pytest.raises(ValueError, match="unit id"):
        SunSpecSimulator([DeviceSpec(unit_id=1, port=port), DeviceSpec(unit_id=1, port=port)])


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match=r"DeviceSpec.rated_kw=nan"):
        DeviceSpec(rated_kw=float("nan"))
    with pytest.raises(ValueError, match=r"DeviceSpec.kind"):
        DeviceSpec(kind="wind")
    with pytest.raises(ValueError, match=r"DeviceSpec.soc_min_pct"):
        DeviceSpec(kind="storage", soc_min_pct=60, soc_max_pct=40)
    with pytest.raises(ValueError, match=r"no SunSpec model definition for model 999"):
        DeviceSpec(models=[1, 103, 999])
    with pytest.raises(ValueError, match=r"meter needs"):
        DeviceSpec(kind="meter", models=[1, 103])


@pytest.fixture
def pty_pair():
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat is not installed")
    proc = subprocess.Popen(
        [socat, "-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"], stderr=subprocess.PIPE, text=True
    )
    paths: list[str] = []
    deadline = time.monotonic() + 5
    while len(paths) < 2 and time.monotonic() < deadline:
        line = proc.stderr.readline()
        paths += re.findall(r"PTY is (\S+)", line)
    if len(paths) < 2:
        proc.kill()
        pytest.fail("socat did not report two ptys")
    yield paths
    proc.terminate()
    proc.wait(5)


async def test_rtu_over_a_pty_pair(pty_pair):
    server_end, client_end = pty_pair
    specs = [
        DeviceSpec(kind="pv", sun_kw=3.0, unit_id=1, serial_port=server_end, baudrate=115200),
        DeviceSpec(kind="storage", unit_id=2, serial_port=server_end, baudrate=115200, ramp_pct_per_s=0),
    ]
    async with SunSpecSimulator(specs) as sim:
        client = AsyncModbusSerialClient(client_end, baudrate=115200, timeout=0.5, retries=0)
        assert await asyncio.wait_for(client.connect(), 3)
        try:
            models = await scan(client, 40000, unit=1)
            assert list(models) == [1, 103, 120, 121, 123, 704]
            assert models[103].W.cvalue == pytest.approx(3000)
            storage = sim.device(2)
            await write(client, storage.image.address_of(704, "WSet"), [0, 15000], unit=2)
            await write(client, storage.image.address_of(704, "WSetEna"), 1, unit=2)
            await wait_until(lambda: storage.power_kw == pytest.approx(1.5), timeout_s=1.0)
            assert storage.writes[0].raw == 15000 and storage.writes[0].value == 1500.0
            # an absent unit on an RS485 line does not answer
            with pytest.raises((ModbusException, asyncio.TimeoutError)):
                await asyncio.wait_for(client.read_holding_registers(40000, count=2, device_id=7), 3)
        finally:
            client.close()


def test_cli_help_and_serving(tmp_path):
    env_cmd = [sys.executable, "-m", "simulators.sunspec"]
    help_text = subprocess.run([*env_cmd, "--help"], capture_output=True, text=True, timeout=20, check=True).stdout
    assert "--no-704" in help_text and "--serial" in help_text
    port = free_port()
    proc = subprocess.Popen(
        [*env_cmd, "--kind", "pv", "--port", str(port), "--count", "2", "--no-704", "--sun-kw", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert f"127.0.0.1:{port}," in lines[0] and f"127.0.0.1:{port + 1}," in lines[1]
        assert "704" not in lines[0].split("models")[1]
        from pymodbus.client import ModbusTcpClient

        client = ModbusTcpClient("127.0.0.1", port=port + 1, timeout=1)
        assert client.connect()
        assert client.read_holding_registers(40000, count=2, device_id=1).registers == SUNS
        client.write_register(40182 + 9, 1, device_id=1)  # 123 WMaxLim_Ena (models 1, 103, 120, 121 before it)
        client.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "write 123.WMaxLim_Ena raw=1" in err
