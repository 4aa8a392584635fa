"""SunSpec driver: codec and planning on pysunspec2-encoded registers, then the real simulator over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import select
import shutil
import struct
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sunspec2.device import Model

from drivers.sunspec import create
from drivers.sunspec.codec import EncodeError, ModelBlock, encode, layout_for
from drivers.sunspec.control import CommandError, build_writes, choose_path, choose_var_path
from drivers.sunspec.discovery import MAX_REGISTERS_PER_READ, plan_reads
from drivers.sunspec.driver import Backoff
from drivers.sunspec.measure import build_reading
from drivers.sunspec.config import SunSpecAsset
from simulators.sunspec import DeviceSpec, SunSpecSimulator

# ---------------------------------------------------------------- helpers


def sunspec_block(model_id: int, address: int = 40002, **raw) -> ModelBlock:
    """A model encoded by pysunspec2 (the reference codec) from raw point values."""
    model = Model(model_id=model_id)
    for name, value in raw.items():
        model.points[name].set_value(value)
    data = model.get_mb()
    registers = list(struct.unpack(f">{len(data) // 2}H", data))
    return ModelBlock(layout_for(model_id, registers[1]), registers, address)


def pysunspec_decode(block: ModelBlock, name: str, registers: list[int]):
    """Raw value of ``registers`` written to point ``name``, as pysunspec2 decodes it."""
    model = Model(model_id=block.model_id)
    point = model.points[name]
    point.set_mb(struct.pack(f">{len(registers)}H", *registers))
    return point.value


def asset(kind="pv", **overrides) -> SunSpecAsset:
    fields = dict(id=f"{kind}1", kind=kind, driver="sunspec", host="127.0.0.1", port=502, timeout_s=0.3)
    fields.update(overrides)
    return SunSpecAsset(**fields)


# ------------------------------------------------------------------ codec


def test_scale_factors_applied_on_read():
    block = sunspec_block(103, W=12345, W_SF=-1, Hz=5001, Hz_SF=-2, VAr=-12, VAr_SF=2, PhVphA=2301, V_SF=-1)
    assert block.value("W") == pytest.approx(1234.5)
    assert block.value("Hz") == pytest.approx(50.01)
    assert block.value("VAr") == pytest.approx(-1200.0)
    assert block.value("PhVphA") == pytest.approx(230.1)


@pytest.mark.parametrize(
    "model_id, point",
    [(103, "W"), (103, "A"), (103, "WH"), (103, "St"), (704, "WSet"), (704, "WMaxLimPctRvrtTms"), (113, "W")],
)
def test_not_implemented_markers_read_as_none(model_id, point):
    # pysunspec2 encodes an unset point as the type's "not implemented" marker
    block = sunspec_block(model_id)
    assert block.raw(point) is None
    assert block.value(point) is None


def test_unimplemented_scale_factor_makes_the_value_unknown():
    block = sunspec_block(103, W=100)  # W_SF left at 0x8000
    assert block.raw("W") == 100
    assert block.value("W") is None


def test_absurd_scale_factor_is_a_problem_not_a_number():
    block = sunspec_block(103, W=100, W_SF=30)
    with pytest.raises(ValueError, match="W_SF=30"):
        block.value("W")


def test_float_model_reads_without_scale_factor():
    block = sunspec_block(113, W=-2500.5, Hz=49.95)
    assert block.value("W") == pytest.approx(-2500.5)
    assert block.value("Hz") == pytest.approx(49.95)


def test_short_model_revision_lacks_trailing_points():
    layout = layout_for(704, 22)  # ends before WSet
    assert layout.has("WSetEna") and not layout.has("WSet")
    assert layout_for(64999, 10) is None


@pytest.mark.parametrize("value, sf, raw", [(-1234.5, -1, -12345), (55.55, -2, 5555), (3000, 1, 300), (60, 0, 60)])
def test_encode_applies_scale_factor_and_matches_pysunspec2(value, sf, raw):
    block = sunspec_block(704)
    name = {-1: "WSet", -2: "WMaxLimPct", 1: "WSet", 0: "WSetRvrtTms"}[sf]
    registers = encode(block.layout.points[name], value, sf)
    assert pysunspec_decode(block, name, registers) == raw


def test_encode_refuses_values_the_type_cannot_hold():
    spec = layout_for(123, 24).points["WMaxLimPct"]
    with pytest.raises(EncodeError, match="WMaxLimPct.*outside 0..65534"):
        encode(spec, -5.0, -2)
    with pytest.raises(EncodeError, match="WMaxLimPct.*finite"):
        encode(spec, math.nan, -2)


# --------------------------------------------------------------- planning


def test_plan_merges_adjacent_models_into_full_requests():
    blocks = [(40002, 68), (40070, 52), (40122, 28), (40150, 155), (40400, 2)]
    spans = plan_reads(blocks)
    assert [(s.address, s.count) for s in spans] == [(40002, 125), (40127, 125), (40252, 53), (40400, 2)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(2, 300)), min_size=1, max_size=8))
def test_plan_covers_everything_in_few_small_requests(raw_blocks):
    blocks, address = [], 0
    for gap, count in raw_blocks:  # non-overlapping, as in a model chain
        address += gap
        blocks.append((address, count))
        address += count
    spans = plan_reads(blocks)
    covered = {a for s in spans for a in range(s.address, s.end)}
    assert all(a in covered for start, count in blocks for a in range(start, start + count))
    assert all(0 < s.count <= MAX_REGISTERS_PER_READ for s in spans)
    assert len(spans) <= sum(-(-c // MAX_REGISTERS_PER_READ) for _, c in blocks)


def test_backoff_is_capped_exponential_with_jitter():
    backoff = Backoff(first_s=0.1, cap_s=30.0)
    delays = [backoff.next_delay() for _ in range(20)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(d <= 30.0 for d in delays) and delays[-1] >= 15.0
    backoff.reset()
    assert backoff.next_delay() <= 0.1


# ---------------------------------------------------------------- control


def test_pv_limit_through_704_in_percent_of_wmaxrtg():
    blocks = {
        704: sunspec_block(704, address=40200, WMaxLimPct_SF=-2),
        702: sunspec_block(702, WMaxRtg=1000, W_SF=1),
    }
    assert choose_path("pv", blocks) == "704-limit"
    writes = build_writes("704-limit", 4.0, 60, blocks)
    tms = blocks[704].address_of("WMaxLimPctRvrtTms")
    ena = blocks[704].address_of("WMaxLimPctEna")
    assert [(w.address, w.values) for w in writes] == [(tms, (0, 60)), (ena, (1, 4000))]
    assert [(w.address, w.values) for w in build_writes("704-limit", None, 60, blocks)] == [(ena, (0,))]


def test_storage_without_704_uses_124_rates_of_wchamax():
    blocks = {124: sunspec_block(124, address=40300, WChaMax=500, WChaMax_SF=1, InOutWRte_SF=-2)}
    assert choose_path("bess", blocks) == "124-rate"
    writes = build_writes("124-rate", -2.5, 30, blocks)
    b = blocks[124]
    assert [w.points for w in writes] == [
        ("124.InOutWRte_RvrtTms",), ("124.OutWRte", "124.InWRte"), ("124.StorCtl_Mod",)
    ]
    out_raw, in_raw = struct.unpack(">hh", struct.pack(">HH", *writes[1].values))
    assert (out_raw, in_raw) == (-5000, 5000)  # -50 % and +50 % of 5 kW
    assert writes[1].address == b.address_of("OutWRte") and writes[2].values == (3,)


def test_reactive_power_through_704_varset_in_vars():
    blocks = {704: sunspec_block(704, address=40200, VarSet_SF=0)}
    assert choose_var_path("pv", blocks) == "704-var" and choose_var_path("meter", blocks) is None
    assert choose_var_path("pv", {}) is None
    writes = build_writes("704-var", -2.5, 60, blocks)
    b = blocks[704]
    labels = [label for w in writes for label in w.points]
    assert labels == ["704.VarSetRvrtTms", "704.VarSetEna", "704.VarSetMod", "704.VarSet"]
    varset = next(w for w in writes if "704.VarSet" in w.points)
    raw = struct.unpack(">i", struct.pack(">HH", *varset.values[-2:]))[0]
    assert raw == -2500  # var, absorbing
    assert [(w.address, w.values) for w in build_writes("704-var", None, 60, blocks)] == [(b.address_of("VarSetEna"), (0,))]


def test_command_without_scale_factor_is_refused_with_the_reason():
    blocks = {123: sunspec_block(123), 121: sunspec_block(121, WMax=1000, WMax_SF=1)}
    with pytest.raises(CommandError, match="WMaxLimPct_SF"):
        build_writes("123-limit", 5.0, 60, blocks)


# -------------------------------------------------------------- readings


def test_meter_sign_is_converted_to_export_positive():
    blocks = {203: sunspec_block(203, W=-350, W_SF=1, Hz=5000, Hz_SF=-2, PhV=2300, V_SF=-1)}
    reading = build_reading(asset("meter"), blocks, None, 0.0)
    assert reading.p_kw == pytest.approx(3.5)  # SunSpec meter: -3.5 kW import = 3.5 kW export
    assert (reading.voltage_v, reading.frequency_hz) == (pytest.approx(230.0), pytest.approx(50.0))
    assert reading.p_min_kw is None and reading.p_max_kw is None and not reading.degraded


def test_implausible_power_degrades_and_is_not_passed_on():
    blocks = {103: sunspec_block(103, W=30000, W_SF=1), 120: sunspec_block(120, WRtg=1000, WRtg_SF=1)}
    reading = build_reading(asset("pv"), blocks, "123-limit", 0.0)
    assert reading.p_kw is None and reading.degraded
    assert "implausible active power 300 kW" in reading.detail
    assert (reading.p_min_kw, reading.p_max_kw) == (0.0, 10.0)


def test_storage_range_blocked_by_soc_and_profile_limits():
    blocks = {
        103: sunspec_block(103, W=0, W_SF=0),
        802: sunspec_block(802, SoC=40, SoC_SF=0, WChaRteMax=800, WDisChaRteMax=900, WChaDisChaMax_SF=1),
        704: sunspec_block(704),
    }
    normal = build_reading(asset("bess", soc_min_pct=5, soc_max_pct=95), blocks, "704-set", 0.0)
    assert (normal.p_min_kw, normal.p_max_kw, normal.soc_pct) == (-8.0, 9.0, 40.0)
    full = build_reading(asset("bess", soc_max_pct=40, soc_min_pct=5, max_discharge_kw=6), blocks, "704-set", 0.0)
    assert (full.p_min_kw, full.p_max_kw) == (0.0, 6.0)
    empty = build_reading(asset("bess", soc_min_pct=40), blocks, "704-set", 0.0)
    assert (empty.p_min_kw, empty.p_max_kw) == (-8.0, 0.0)


# ====================================================== against the simulator

CYCLE_S = 0.3


class EventLog:
    """Events the driver emitted, with their monotonic arrival time."""

    def __init__(self):
        self.items: list[tuple[float, str, str | None, dict]] = []

    def __call__(self, kind, asset_id, detail):
        self.items.append((time.monotonic(), kind, asset_id, detail))

    def of(self, kind):
        return [(t, detail) for t, k, _, detail in self.items if k == kind]

    async def next(self, kind, timeout_s=3.0, after=0.0):
        async def wait():
            while True:
                for t, detail in self.of(kind):
                    if t >= after:
                        return t, detail
                await asyncio.sleep(0.01)

        return await asyncio.wait_for(wait(), timeout_s)


async def until(predicate, timeout_s=3.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.01)


async def written(device, point, raw, after_s, timeout_s=1.0):
    """The first write of ``raw`` to ``point`` received after ``after_s`` (an earlier command may still be in flight)."""

    def found():
        return next((w for w in device.writes if w.point == point and w.raw == raw and w.t_s >= after_s), None)

    await until(found, timeout_s, what=f"write {point}={raw}")
    return found()


@contextlib.asynccontextmanager
async def simulated(*specs: DeviceSpec):
    sim = SunSpecSimulator(list(specs), tick_s=0.05)
    await asyncio.wait_for(sim.start(), 5)
    try:
        yield sim
    finally:
        await asyncio.wait_for(sim.stop(), 5)


@contextlib.asynccontextmanager
async def driving(profile_asset: SunSpecAsset, cycle_s: float = CYCLE_S, online_within_s: float = 3.0):
    events = EventLog()
    driver = create(profile_asset, cycle_s, events)
    task = asyncio.create_task(driver.run())
    try:
        if online_within_s:
            await events.next("asset_online", online_within_s)
        yield driver, events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 3)


def tcp_asset(device, kind=None, **overrides) -> SunSpecAsset:
    kind = kind or {"hybrid": "bess", "storage": "bess"}.get(device.kind, device.kind)
    return asset(kind, port=device.port, unit_id=device.unit_id, **overrides)


@pytest.mark.parametrize("base", [40000, 0, 50000])
async def test_discovers_the_map_at_each_base(base):
    async with simulated(DeviceSpec(kind="pv", base_address=base, sun_kw=6.0)) as sim:
        device = sim.device()
        async with driving(tcp_asset(device)) as (driver, events):
            [(_, found)] = events.of("models_discovered")
            assert found["base_address"] == base
            assert found["model_ids"] == device.models == [1, 103, 120, 121, 123, 704]
            assert found["manufacturer"] == "flexedge"
            reading = driver.reading()
            assert reading.online and not reading.degraded, reading.detail
            assert reading.p_kw == pytest.approx(6.0, abs=0.01)
            assert (reading.p_min_kw, reading.p_max_kw) == (0.0, 10.0)


async def test_configured_base_address_is_used_without_probing():
    async with simulated(DeviceSpec(kind="pv", base_address=50000)) as sim:
        device = sim.device()
        async with driving(tcp_asset(device, base_address=50000)) as (driver, events):
            assert driver.model_map.base_address == 50000
        async with driving(tcp_asset(device, base_address=40000), online_within_s=0) as (driver, events):
            _, offline = await events.next("asset_offline", 2)
            assert "no SunSpec marker 'SunS' at 40000" in offline["reason"]


async def test_scale_factors_on_read_and_on_write():
    spec = DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=2.55, scale_factors={"W_SF": -1, "WMaxLimPct_SF": -1})
    async with simulated(spec) as sim:
        device = sim.device()
        async with driving(tcp_asset(device)) as (driver, _):
            assert device.image.get_raw(103, "W") == 25500  # 2.55 kW at W_SF -1
            assert driver.reading().p_kw == pytest.approx(2.55)
            driver.set_target_kw(3.33)
            record = await device.next_write("WMaxLimPct", model_id=704, timeout_s=1)
            assert record.raw == 333 and record.value == pytest.approx(33.3)  # 33.3 % at SF -1


async def test_target_reaches_704_within_a_fraction_of_the_cycle():
    async with simulated(DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=9.0)) as sim:
        device = sim.device()
        async with driving(tcp_asset(device), cycle_s=1.0) as (driver, _):
            assert driver.control_path == "704-limit"
            latencies = []
            for target_kw in (4.0, 2.5, 6.0):
                await asyncio.sleep(0.1)
                sent = time.monotonic()
                driver.set_target_kw(target_kw)
                # percent of the 10 kW WMaxRtg at WMaxLimPct_SF -2
                record = await written(device, "WMaxLimPct", round(target_kw * 10 * 100), sent)
                latencies.append(record.t_s - sent)
            assert max(latencies) < 0.1, latencies  # the 1 s poll cycle is not waited for
            assert device.image.get_raw(704, "WMaxLimPctEna") == 1
            await until(lambda: driver.reading().p_kw == pytest.approx(6.0, abs=0.05), what="PV follows the limit")
            released = time.monotonic()
            driver.set_target_kw(None)
            record = await written(device, "WMaxLimPctEna", 0, released)
            assert record.t_s - released < 0.1
            await until(lambda: device.limit_kw is None, what="limit released")


async def test_target_through_123_when_the_device_has_no_704():
    spec = DeviceSpec(kind="pv", rated_kw=8.0, sun_kw=8.0, models=[103, 120, 121, 123])
    async with simulated(spec) as sim:
        device = sim.device()
        async with driving(tcp_asset(device), cycle_s=1.0) as (driver, _):
            assert driver.control_path == "123-limit"
            assert driver.var_control_path is None and driver.reading().q_max_kvar is None  # no 704: no Q control
            sent = time.monotonic()
            driver.set_target_kw(2.0)
            enable = await device.next_write("WMaxLim_Ena", model_id=123, timeout_s=1, after_s=sent)
            assert enable.raw == 1 and enable.t_s - sent < 0.1
            assert device.image.get(123, "WMaxLimPct") == pytest.approx(25.0)  # of WMax 8 kW
            assert device.image.get_raw(123, "WMaxLimPct_RvrtTms") == 60
            await until(lambda: abs(device.power_kw - 2.0) < 0.05, what="device at 2 kW")


async def test_storage_setpoint_through_704_wset_is_signed():
    async with simulated(DeviceSpec(kind="storage", rated_kw=5.0, soc_pct=50.0)) as sim:
        device = sim.device()
        async with driving(tcp_asset(device)) as (driver, _):
            assert driver.control_path == "704-set"
            reading = driver.reading()
            assert (reading.p_min_kw, reading.p_max_kw, reading.soc_pct) == (-5.0, 5.0, 50.0)
            sent = time.monotonic()
            driver.set_target_kw(-2.5)  # charge
            record = await device.next_write("WSet", model_id=704, timeout_s=1, after_s=sent)
            assert record.raw == -25000 and record.value == pytest.approx(-2500.0)  # WSet_SF -1
            assert device.image.get_raw(704, "WSetEna") == 1 and device.image.get_raw(704, "WSetMod") == 1
            await until(lambda: driver.reading().p_kw == pytest.approx(-2.5, abs=0.05), what="charging at 2.5 kW")


async def test_storage_without_704_uses_124():
    spec = DeviceSpec(kind="storage", rated_kw=5.0, models=[103, 120, 121, 124, 802])
    async with simulated(spec) as sim:
        device = sim.device()
        async with driving(tcp_asset(device), cycle_s=1.0) as (driver, _):
            assert driver.control_path == "124-rate"
            sent = time.monotonic()
            driver.set_target_kw(2.0)  # discharge 2 of WChaMax 5 kW
            mode = await device.next_write("StorCtl_Mod", model_id=124, timeout_s=1, after_s=sent)
            assert mode.raw == 3 and mode.t_s - sent < 0.1
            assert device.image.get(124, "OutWRte") == pytest.approx(40.0)
            assert device.image.get(124, "InWRte") == pytest.approx(-40.0)
            await until(lambda: driver.reading().p_kw == pytest.approx(2.0, abs=0.05), what="discharging at 2 kW")
            released = time.monotonic()
            driver.set_target_kw(None)
            await written(device, "StorCtl_Mod", 0, released)
            await until(lambda: device.setpoint_kw is None, what="storage released")


async def test_revert_timer_is_refreshed_while_a_target_is_in_force():
    async with simulated(DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=9.0)) as sim:
        device = sim.device()
        async with driving(tcp_asset(device, revert_timeout_s=1)) as (driver, _):
            driver.set_target_kw(3.0)
            await device.next_write("WMaxLimPctRvrtTms", timeout_s=1)
            await asyncio.sleep(2.5)  # 2.5 revert periods
            assert device.reverts == []
            assert device.image.get_raw(704, "WMaxLimPctEna") == 1
            refreshes = [w for w in device.writes if w.point == "WMaxLimPctRvrtTms"]
            assert len(refreshes) >= 2.5 / CYCLE_S - 1 and all(w.raw == 1 for w in refreshes)
        # Driver gone: nothing refreshes the timer, and the device reverts on its own.
        await until(lambda: device.reverts, timeout_s=2.5, what="device revert")
        assert device.image.get_raw(704, "WMaxLimPctEna") == 0


async def test_refresh_follows_the_revert_timer_not_the_cycle():
    async with simulated(DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=9.0)) as sim:
        device = sim.device()
        # A 4 s timer is refreshed about every second (a quarter), not every 0.3 s cycle,
        # even while new targets (written without the timer) arrive every cycle.
        async with driving(tcp_asset(device, revert_timeout_s=4)) as (driver, _):
            driver.set_target_kw(3.0)
            await device.next_write("WMaxLimPctRvrtTms", timeout_s=1)
            started = time.monotonic()
            for step in range(10):
                driver.set_target_kw(3.0 + 0.5 * (step % 2))
                await asyncio.sleep(CYCLE_S)
            timer_writes = [w for w in device.writes if w.point == "WMaxLimPctRvrtTms" and w.t_s >= started]
            limit_writes = [w for w in device.writes if w.point == "WMaxLimPct" and w.t_s >= started]
            assert 2 <= len(timer_writes) <= 5, [round(w.t_s - started, 2) for w in timer_writes]
            assert len(limit_writes) >= 10
            assert device.reverts == []


async def test_silent_device_goes_offline_within_two_cycles_and_comes_back():
    async with simulated(DeviceSpec(kind="pv", sun_kw=5.0)) as sim:
        device = sim.device()
        async with driving(tcp_asset(device, timeout_s=0.2)) as (driver, events):
            driver.set_target_kw(4.0)
            await device.next_write("WMaxLimPct", timeout_s=1)
            silent_at = time.monotonic()
            device.set_silent(True)
            offline_at, detail = await events.next("asset_offline", 2 * CYCLE_S + 0.5, after=silent_at)
            assert offline_at - silent_at <= 2 * CYCLE_S + 0.02
            assert not driver.reading().online and driver.reading().p_kw is None
            assert "no answer" in detail["reason"]
            back_at = time.monotonic()
            device.set_silent(False)
            online_at, _ = await events.next("asset_online", 3.0, after=back_at)
            assert driver.reading().online
            # the target is written again after the outage
            record = await device.next_write("WMaxLimPct", timeout_s=1, after_s=back_at)
            assert record.value == pytest.approx(40.0)


async def test_dead_device_does_not_delay_another_driver():
    async with simulated(DeviceSpec(kind="pv", sun_kw=5.0), DeviceSpec(kind="pv", sun_kw=3.0)) as sim:
        dead, alive = sim.devices
        dead.set_silent(True)
        async with driving(tcp_asset(dead, timeout_s=1.0), online_within_s=0) as (_, dead_events):
            async with driving(tcp_asset(alive)) as (driver, _):
                sent = time.monotonic()
                driver.set_target_kw(1.0)
                record = await alive.next_write("WMaxLimPct", timeout_s=1, after_s=sent)
                assert record.t_s - sent < 0.1
                first = driver.reading().read_at
                await asyncio.sleep(3 * CYCLE_S)
                assert driver.reading().read_at - first >= 2 * CYCLE_S - 0.05
            assert dead_events.of("asset_offline") and not dead_events.of("asset_online")


async def test_rescan_after_firmware_update_changes_the_control_path():
    async with simulated(DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=9.0)) as sim:
        device = sim.device()
        async with driving(tcp_asset(device)) as (driver, events):
            driver.set_target_kw(5.0)
            await device.next_write("WMaxLimPct", model_id=704, timeout_s=1)
            changed_at = time.monotonic()
            await device.replace_models([103, 120, 121, 123])  # firmware without 704
            _, changed = await events.next("models_changed", 2 * CYCLE_S + 0.5, after=changed_at)
            assert changed["model_ids"] == [1, 103, 120, 121, 123]
            assert changed["previous_model_ids"] == [1, 103, 120, 121, 123, 704]
            # the target in force moves to the 123 limit without a new set_target_kw
            record = await device.next_write("WMaxLimPct", model_id=123, timeout_s=1, after_s=changed_at)
            assert record.value == pytest.approx(50.0) and driver.control_path == "123-limit"
            moved_at = time.monotonic()
            await device.replace_models([103, 120, 121, 123, 704], base_address=0)  # and it moved
            _, moved = await events.next("models_changed", 3.0, after=moved_at)
            assert (moved["base_address"], moved["previous_base_address"]) == (0, 40000)
            await until(lambda: driver.reading().online and driver.control_path == "704-limit", what="704 again")


async def test_command_rejected_by_the_device_is_an_event_and_degrades():
    async with simulated(DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=9.0)) as sim:
        device = sim.device()
        async with driving(tcp_asset(device)) as (driver, events):
            device.set_fault("busy")
            driver.set_target_kw(5.0)
            _, failed = await events.next("command_failed", 1.0)
            assert failed["target_kw"] == 5.0 and "exception 6" in failed["answer"]
            assert failed["written"].startswith("704.WMaxLimPctRvrtTms @40226=[0, 60]")
            reading = driver.reading()
            assert reading.online and reading.degraded and "command failed" in reading.detail
            device.set_fault(None)
            await until(lambda: not driver.reading().degraded, what="recovery")  # the refresh succeeds
            assert device.image.get(704, "WMaxLimPct") == pytest.approx(50.0)
            assert len(events.of("command_failed")) == 1  # identical refresh failures are not repeated


async def test_meter_reading_is_export_positive():
    pv = DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0, unit_id=1)
    meter = DeviceSpec(kind="meter", unit_id=2, load_kw=3.0)
    async with simulated(pv, meter) as sim:
        device = sim.device(2)
        async with driving(tcp_asset(device, connection_point=True)) as (driver, events):
            assert events.of("models_discovered")[0][1]["model_ids"] == [1, 203]
            await until(lambda: driver.reading().p_kw == pytest.approx(5.0, abs=0.05), what="5 kW export")
            assert device.image.get(203, "W") == pytest.approx(-5000.0)  # SunSpec meters: + is import
            reading = driver.reading()
            assert reading.voltage_v == pytest.approx(230.0) and reading.frequency_hz == pytest.approx(50.0)
            assert (reading.p_min_kw, reading.p_max_kw, reading.degraded) == (None, None, False)
            device.set_load(12.0)
            await until(lambda: driver.reading().p_kw == pytest.approx(-4.0, abs=0.05), what="4 kW import")
            driver.set_target_kw(1.0)
            assert events.of("command_failed")[-1][1]["reason"] == "asset is not controllable"


async def test_storage_range_follows_state_of_charge():
    async with simulated(DeviceSpec(kind="storage", rated_kw=5.0, soc_pct=97.0)) as sim:
        device = sim.device()
        async with driving(tcp_asset(device, soc_max_pct=95.0, soc_min_pct=10.0)) as (driver, _):
            assert (driver.reading().p_min_kw, driver.reading().p_max_kw) == (0.0, 5.0)
            device.set_soc(5.0)
            await until(lambda: driver.reading().soc_pct == pytest.approx(5.0), what="SoC 5 %")
            assert (driver.reading().p_min_kw, driver.reading().p_max_kw) == (-5.0, 0.0)


# ------------------------------------------------------------------- RTU


@pytest.fixture
def pty_pair():
    if not shutil.which("socat"):
        pytest.fail("socat is not installed (Debian package socat)")
    proc = subprocess.Popen(["socat", "-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"], stderr=subprocess.PIPE)
    # Raw reads with select: a buffered readline could swallow the second line.
    output, ptys = b"", []
    deadline = time.monotonic() + 5
    while len(ptys) < 2 and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
        if not chunk:
            break
        output += chunk
        ptys = [p.decode() for p in re.findall(rb"PTY is (\S+)", output)]
    if len(ptys) < 2:
        proc.kill()
        proc.wait(5)
        pytest.fail(f"socat did not report two ptys: {output.decode(errors='replace')!r}")
    yield ptys
    proc.terminate()
    proc.wait(5)


async def test_rtu_over_a_serial_line(pty_pair):
    device_end, driver_end = pty_pair
    spec = DeviceSpec(kind="storage", rated_kw=5.0, serial_port=device_end, baudrate=115200, unit_id=3)
    async with simulated(spec) as sim:
        device = sim.device(3)
        rtu = SunSpecAsset(
            id="bess-rtu", kind="bess", driver="sunspec", unit_id=3, timeout_s=0.5,
            serial={"port": driver_end, "baudrate": 115200},
        )
        async with driving(rtu, cycle_s=0.5, online_within_s=5) as (driver, events):
            assert events.of("models_discovered")[0][1]["base_address"] == 40000
            assert driver.control_path == "704-set"
            sent = time.monotonic()
            driver.set_target_kw(1.5)
            record = await device.next_write("WSet", timeout_s=1, after_s=sent)
            assert record.value == pytest.approx(1500.0) and record.t_s - sent < 0.3
            await until(lambda: driver.reading().p_kw == pytest.approx(1.5, abs=0.05), what="1.5 kW over RTU")
