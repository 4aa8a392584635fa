"""The profile's ratings against the device's own (issue #10, item 7): the pure comparer, then
each driver on the wire against its simulator, then the whole daemon with Mosquitto."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import drivers.iec104 as iec104_driver
import drivers.sunspec as sunspec_driver
from drivers.iec104 import Iec104Asset
from drivers.ocpp import OcppCharger, OcppChargerDriver, OcppServer
from drivers.ocpp.driver import shared_system
from drivers.ocpp.handlers import evse_max_power_kw
from edge.asset import AssetDriver, AssetReading, DeviceRating
from edge.runtime.daemon import Gateway
from drivers.sunspec.config import SunSpecAsset
from edge.config.profile import Profile
from edge.control.ratings import RatingsWatch, differ, judge, profile_rating_kw
from simulators.bess import BessSimulator, BessSpec
from simulators.ocpp import EvSpec, OcppSimulator, StationSpec
from simulators.sunspec import DeviceSpec, SunSpecSimulator
from simulators.vpp import VppSimulator
from tests.conftest import DriverTask, free_port

CYCLE_S = 0.5
TAG = "04A1B2C3D4"


class Events:
    def __init__(self):
        self.items: list[tuple[str, str | None, dict]] = []

    def __call__(self, event_type, asset_id, detail):
        self.items.append((event_type, asset_id, detail))

    def of(self, event_type):
        return [(asset_id, detail) for t, asset_id, detail in self.items if t == event_type]


async def until(predicate, timeout_s=5.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)
    return result


# ------------------------------------------------------------------ the comparer, pure

kw_values = st.floats(min_value=0.0, max_value=100_000.0, allow_nan=False, allow_infinity=False)


@given(kw_values, kw_values)
def test_differ_is_symmetric_and_tolerates_two_percent_or_a_tenth_of_a_kw(a, b):
    assert differ(a, b) == differ(b, a)
    assert not differ(a, a)
    if abs(a - b) <= 0.1:
        assert not differ(a, b)
    if abs(a - b) > 0.1 and abs(a - b) > 0.02 * max(a, b):
        assert differ(a, b)


@given(kw_values, kw_values, st.booleans())
def test_a_verdict_names_both_figures_and_the_lower_one_is_used(profile_kw, device_kw, at_least):
    verdict = judge("rated_kw", profile_kw, DeviceRating(device_kw, "SunSpec 120 WRtg", at_least=at_least))
    if not differ(profile_kw, device_kw) or (at_least and device_kw < profile_kw):
        assert verdict is None
        return
    assert verdict is not None
    assert (verdict.profile_kw, verdict.device_kw, verdict.source) == (profile_kw, device_kw, "SunSpec 120 WRtg")
    assert verdict.used_kw == min(profile_kw, device_kw)
    assert verdict.used == ("profile" if profile_kw <= device_kw else "device")
    detail = verdict.detail()
    assert set(detail) == {"key", "profile_kw", "device_kw", "source", "used", "used_kw"}
    assert all(math.isfinite(detail[k]) for k in ("profile_kw", "device_kw", "used_kw"))


def test_an_available_power_below_the_rating_is_a_derating_not_a_mismatch():
    assert judge("max_charge_kw", 100.0, DeviceRating(20.0, "IEC 104 p_charge_available", at_least=True)) is None
    verdict = judge("max_charge_kw", 100.0, DeviceRating(150.0, "IEC 104 p_charge_available", at_least=True))
    assert verdict.used == "profile" and verdict.used_kw == 100.0
    assert judge("rated_kw", None, DeviceRating(100.0, "x")) is None  # the profile gives none: the device's is used


def test_device_ratings_must_be_finite_and_not_negative():
    for bad in (math.nan, math.inf, -1.0, True, "5"):
        with pytest.raises(ValueError, match="finite number of kW"):
            DeviceRating(bad, "x")


def test_the_profile_figure_of_a_charger_is_its_effective_rating():
    charger = OcppCharger(id="ev", kind="ev_charger", driver="ocpp", charge_point_id="CP")
    assert profile_rating_kw(charger, "max_power_kw") == pytest.approx(22.08)  # 32 A x 230 V x 3
    capped = OcppCharger(id="ev", kind="ev_charger", driver="ocpp", charge_point_id="CP", max_power_kw=11)
    assert profile_rating_kw(capped, "max_power_kw") == 11.0
    pv = SunSpecAsset(id="pv", kind="pv", driver="sunspec", host="h")
    assert profile_rating_kw(pv, "rated_kw") is None and profile_rating_kw(pv, "no_such_key") is None


class FakeDriver(AssetDriver):
    def __init__(self, ratings=None):
        super().__init__("a", 1.0, lambda *_: None)
        self.ratings = ratings if ratings is not None else {}

    async def run(self):
        pass

    def reading(self):
        return AssetReading()

    def set_target_kw(self, target_kw):
        pass

    def device_ratings(self):
        if isinstance(self.ratings, Exception):
            raise self.ratings
        return self.ratings


def pv_asset(**extra) -> SunSpecAsset:
    return SunSpecAsset(id=extra.pop("id", "pv1"), kind="pv", driver="sunspec", host="127.0.0.1", **extra)


def test_a_mismatch_is_reported_once_per_distinct_pair(caplog):
    caplog.set_level(logging.INFO, logger="flexedge.ratings")
    events = Events()
    driver = FakeDriver({"rated_kw": DeviceRating(100.0, "SunSpec 120 WRtg")})
    watch = RatingsWatch([(pv_asset(rated_kw=30), driver)], events)
    for _ in range(5):
        watch.check()
    assert events.of("rating_mismatch") == [("pv1", {"key": "rated_kw", "profile_kw": 30.0, "device_kw": 100.0,
                                                     "source": "SunSpec 120 WRtg", "used": "profile", "used_kw": 30.0})]
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "30 kW in the profile" in line and "100 kW (SunSpec 120 WRtg)" in line and "using 30 kW" in line
    driver.ratings = {"rated_kw": DeviceRating(101.0, "SunSpec 120 WRtg")}  # within the tolerance: the same pair
    watch.check()
    assert len(events.of("rating_mismatch")) == 1
    driver.ratings = {"rated_kw": DeviceRating(80.0, "SunSpec 121 WMax")}  # a new pair
    watch.check()
    assert len(events.of("rating_mismatch")) == 2 and events.of("rating_mismatch")[-1][1]["device_kw"] == 80.0
    driver.ratings = {"rated_kw": DeviceRating(30.0, "SunSpec 121 WMax")}  # they agree now: nothing to report
    watch.check()
    assert len(events.of("rating_mismatch")) == 2 and not watch.reported
    driver.ratings = {"rated_kw": DeviceRating(80.0, "SunSpec 121 WMax")}  # and disagree again: reported again
    watch.check()
    assert len(events.of("rating_mismatch")) == 3


def test_a_failing_driver_never_stops_the_check(caplog):
    events = Events()
    broken = FakeDriver(RuntimeError("bug"))
    wrong = FakeDriver({"rated_kw": 100.0})  # not a DeviceRating
    good = FakeDriver({"rated_kw": DeviceRating(100.0, "SunSpec 120 WRtg")})
    watch = RatingsWatch([(pv_asset(id="a", rated_kw=30), broken), (pv_asset(id="b", rated_kw=30), wrong),
                          (pv_asset(id="c", rated_kw=30), good)], events)
    watch.check()
    watch.check()
    assert [asset_id for asset_id, _ in events.of("rating_mismatch")] == ["c"]
    assert sum("could not compare" in r.getMessage() for r in caplog.records) == 2  # once per asset


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=200.0, allow_nan=False), min_size=1, max_size=30),
       st.floats(min_value=0.0, max_value=200.0, allow_nan=False))
def test_events_come_only_with_a_change_and_always_name_the_lower_figure(device_kws, profile_kw):
    events = Events()
    driver = FakeDriver()
    watch = RatingsWatch([(pv_asset(rated_kw=profile_kw), driver)], events)
    for device_kw in device_kws:
        driver.ratings = {"rated_kw": DeviceRating(device_kw, "SunSpec 120 WRtg")}
        before = len(events.items)
        watch.check()
        watch.check()  # the same figures again: never a second event
        new = events.items[before:]
        assert len(new) <= 1
        for _, _, detail in new:
            assert detail["used_kw"] == round(min(profile_kw, device_kw), 3)
        assert (("pv1", "rated_kw") in watch.reported) == differ(profile_kw, device_kw)


def test_evse_power_max_limit_is_read_from_a_notify_report():
    def item(evse_id, max_limit, unit=None, name="Power"):
        characteristics = {"data_type": "decimal", "max_limit": max_limit, "supports_monitoring": False}
        if unit:
            characteristics["unit"] = unit
        return {"component": {"name": "EVSE", "evse": {"id": evse_id}}, "variable": {"name": name},
                "variable_characteristics": characteristics}
    assert evse_max_power_kw([item(2, 7400), item(1, 11000, "W")], 1) == 11.0
    assert evse_max_power_kw([item(1, 22, "kW")], 1) == 22.0
    assert evse_max_power_kw([item(1, float("nan")), item(1, -5), item(1, 7, "A"), item(1, 9, name="Voltage")], 1) is None


# ------------------------------------------------------------------ SunSpec on the wire


class Driving(DriverTask):
    """A driver's run() as a task, and a RatingsWatch over it as the daemon would run it."""

    def __init__(self, asset, driver):
        self.events = Events()
        self.driver = driver
        self.watch = RatingsWatch([(asset, driver)], self.events)


    async def mismatches(self, count=1, timeout_s=5.0):
        def found():
            self.watch.check()
            return len(self.events.of("rating_mismatch")) >= count and self.events.of("rating_mismatch")
        return await until(found, timeout_s, "rating_mismatch")


def sunspec_asset(device, **extra) -> SunSpecAsset:
    return SunSpecAsset(id=extra.pop("id", "pv1"), kind=extra.pop("kind", "pv"), driver="sunspec", host="127.0.0.1",
                        port=device.port, unit_id=device.unit_id, timeout_s=0.3, **extra)


async def test_sunspec_nameplate_above_the_profile_the_profile_wins_and_percent_stays_of_the_nameplate():
    async with SunSpecSimulator([DeviceSpec(kind="pv", rated_kw=100.0, sun_kw=80.0)]) as sim:
        device = sim.devices[0]
        asset = sunspec_asset(device, rated_kw=30)
        async with Driving(asset, sunspec_driver.create(asset, CYCLE_S, lambda *_: None)) as run:
            [(asset_id, detail)] = await run.mismatches()
            assert asset_id == "pv1"
            assert detail == {"key": "rated_kw", "profile_kw": 30.0, "device_kw": 100.0, "source": "SunSpec 120 WRtg",
                              "used": "profile", "used_kw": 30.0}
            reading = run.driver.reading()
            assert (reading.p_min_kw, reading.p_max_kw) == (0.0, 30.0)  # the band the VPP is offered
            sent_at = time.monotonic()
            run.driver.set_target_kw(20.0)
            write = await device.next_write("WMaxLimPct", model_id=704, after_s=sent_at, timeout_s=2.0)
            assert write.value == pytest.approx(20.0, abs=0.01)  # 20 kW is 20 % of the device's own 100 kW
            await asyncio.sleep(3 * CYCLE_S)
            run.watch.check()
            assert len(run.events.of("rating_mismatch")) == 1  # once, not every cycle


async def test_sunspec_profile_above_the_device_the_device_wins():
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0),
             DeviceSpec(kind="storage", rated_kw=50.0, max_charge_kw=40.0, max_discharge_kw=50.0, soc_pct=50.0)]
    async with SunSpecSimulator(specs) as sim:
        pv, bess = sim.devices
        pv_cfg = sunspec_asset(pv, rated_kw=15)
        bess_cfg = sunspec_asset(bess, id="bess1", kind="bess", max_charge_kw=60, max_discharge_kw=50)
        async with Driving(pv_cfg, sunspec_driver.create(pv_cfg, CYCLE_S, lambda *_: None)) as pv_run, \
                Driving(bess_cfg, sunspec_driver.create(bess_cfg, CYCLE_S, lambda *_: None)) as bess_run:
            [(_, detail)] = await pv_run.mismatches()
            assert (detail["profile_kw"], detail["device_kw"], detail["used"], detail["used_kw"]) == (15.0, 10.0, "device", 10.0)
            assert pv_run.driver.reading().p_max_kw == 10.0
            [(asset_id, detail)] = await bess_run.mismatches()
            assert asset_id == "bess1"
            assert detail == {"key": "max_charge_kw", "profile_kw": 60.0, "device_kw": 40.0,
                              "source": "SunSpec 802 WChaRteMax", "used": "device", "used_kw": 40.0}
            reading = bess_run.driver.reading()
            assert (reading.p_min_kw, reading.p_max_kw) == (-40.0, 50.0)  # discharge: both say 50, no event


# ------------------------------------------------------------------ IEC 104 on the wire


async def test_iec104_available_power_above_the_profile_is_a_mismatch_and_the_profile_holds():
    async with BessSimulator([BessSpec(max_charge_kw=150.0, max_discharge_kw=100.0, soc_pct=50.0)]) as sim:
        unit = sim.units[0]
        asset = Iec104Asset(id="bess1", kind="bess", driver="iec104", host="127.0.0.1", port=unit.port,
                            common_address=unit.common_address, template="bess-generic", max_charge_kw=100,
                            max_discharge_kw=100, connect_timeout_s=1.0)
        async with Driving(asset, iec104_driver.create(asset, CYCLE_S, lambda *_: None)) as run:
            [(asset_id, detail)] = await run.mismatches()
            assert asset_id == "bess1"
            assert detail == {"key": "max_charge_kw", "profile_kw": 100.0, "device_kw": 150.0,
                              "source": "IEC 104 p_charge_available (IOA 2003)", "used": "profile", "used_kw": 100.0}
            assert run.driver.reading().p_min_kw == -100.0
            assert run.driver.device_ratings()["max_discharge_kw"].power_kw == 100.0  # agrees: no event
            await asyncio.sleep(2 * CYCLE_S)
            run.watch.check()
            assert len(run.events.of("rating_mismatch")) == 1


# ------------------------------------------------------------------ OCPP on the wire


async def test_ocpp_201_evse_maximum_below_the_profile_the_charger_wins_and_16_states_none(tmp_path):
    cfg = OcppServer(host="127.0.0.1", port=free_port(), id_tag_salt_file=tmp_path / "salt",
                     authorize={"mode": "local_list", "id_tags": [TAG]})
    chargers = [OcppCharger(id="ev201", kind="ev_charger", driver="ocpp", charge_point_id="CP201", ocpp_version="2.0.1"),
                OcppCharger(id="ev16", kind="ev_charger", driver="ocpp", charge_point_id="CP16", ocpp_version="1.6")]
    drivers = {c.id: OcppChargerDriver(c, 1.0, lambda *_: None, server=cfg) for c in chargers}
    events = Events()
    watch = RatingsWatch([(c, drivers[c.id]) for c in chargers], events)
    tasks = [asyncio.create_task(d.run()) for d in drivers.values()]
    try:
        await until(lambda: shared_system(cfg) is not None and shared_system(cfg).started.is_set(), what="server")
        specs = [StationSpec("CP201", "2.0.1", nameplate_kw=11.0, meter_interval_s=0.2),
                 StationSpec("CP16", "1.6", meter_interval_s=0.2)]
        async with OcppSimulator(f"ws://127.0.0.1:{cfg.port}{cfg.path}", specs) as sim:
            station201, station16 = sim.stations

            def reported():
                watch.check()
                return events.of("rating_mismatch")
            [(asset_id, detail)] = await until(reported, what="rating_mismatch")
            assert asset_id == "ev201"
            assert detail == {"key": "max_power_kw", "profile_kw": 22.08, "device_kw": 11.0,
                              "source": "OCPP EVSE 1 Power maxLimit", "used": "device", "used_kw": 11.0}
            assert await station201.plug_in(EvSpec(id_tag=TAG, max_power_kw=22.0))
            reading = await until(lambda: drivers["ev201"].reading().p_min_kw, what="EV plugged in")
            assert reading == pytest.approx(-11.0)  # the band offered is the charger's, not the profile's
            await station16.wait_connected()
            await asyncio.sleep(0.5)
            assert drivers["ev16"].device_ratings() == {}
            assert "GetReport" not in [r.action for r in station16.requests]
            watch.check()
            assert len(events.of("rating_mismatch")) == 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------ the daemon, with Mosquitto


async def test_the_daemon_reports_a_mismatch_once_to_the_vpp(tmp_path: Path, mosquitto, caplog):
    caplog.set_level(logging.WARNING, logger="flexedge.ratings")
    site = "ratings-site"
    async with SunSpecSimulator([DeviceSpec(kind="pv", rated_kw=100.0, sun_kw=80.0)]) as sim:
        device = sim.devices[0]
        profile = Profile.model_validate({
            "site": {"id": site},
            "control": {"cycle_s": CYCLE_S},
            "uplink": {"mqtt": {"host": "127.0.0.1", "port": mosquitto.port},
                       "spool": {"path": str(tmp_path / "spool.sqlite"), "max_mb": 16}},
            "assets": [{"id": "pv-roof", "kind": "pv", "driver": "sunspec", "host": "127.0.0.1", "port": device.port,
                        "unit_id": device.unit_id, "timeout_s": 0.3, "rated_kw": 30}],
        })
        stop = asyncio.Event()
        gateway_task = asyncio.create_task(Gateway(profile).run(stop))
        try:
            async with VppSimulator("127.0.0.1", mosquitto.port, "flexedge", site) as vpp:
                def mismatches():
                    return [e for e in vpp.events if e["type"] == "rating_mismatch"]
                [event] = await until(mismatches, 10, "rating_mismatch on MQTT")
                assert event["asset_id"] == "pv-roof"
                assert event["detail"] == {"key": "rated_kw", "profile_kw": 30.0, "device_kw": 100.0,
                                           "source": "SunSpec 120 WRtg", "used": "profile", "used_kw": 30.0}
                await asyncio.sleep(4 * CYCLE_S)
                assert len(mismatches()) == 1
        finally:
            stop.set()
            await asyncio.wait_for(gateway_task, 10)
    [line] = [r.getMessage() for r in caplog.records if r.name == "flexedge.ratings"]
    assert line == ("pv-roof: rated_kw is 30 kW in the profile, but the device states 100 kW (SunSpec 120 WRtg); "
                    "using 30 kW, the profile's (the lower figure)")
