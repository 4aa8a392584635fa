"""The OCPP charge-point simulator, against the real central system on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drivers.ocpp import OcppCentralSystem, OcppCharger, OcppServer
from simulators.ocpp import EvSpec, OcppSimulator, StationSpec
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def charger(n: int, version: str = "auto") -> OcppCharger:
    return OcppCharger(id=f"ev{n}", kind="ev_charger", driver="ocpp", charge_point_id=f"CP{n}", ocpp_version=version)


@contextlib.asynccontextmanager
async def central(tmp_path, chargers, events=None):
    cfg = OcppServer(host="127.0.0.1", port=free_port(), id_tag_salt_file=tmp_path / "salt",
                     authorize={"mode": "accept_all"})
    system = OcppCentralSystem(cfg, chargers, (lambda *e: events.append(e)) if events is not None else None)
    task = asyncio.create_task(system.run())
    try:
        await asyncio.wait_for(system.started.wait(), 3)
        yield system, f"ws://127.0.0.1:{cfg.port}/ocpp"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(predicate, timeout_s=3.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
async def test_ev_charges_at_the_lower_of_profile_and_ev_limits_and_stops_when_full(tmp_path, version):
    async with central(tmp_path, [charger(1)]) as (system, url):
        session = system.session("ev1")
        spec = StationSpec("CP1", version, max_current_a=16, meter_interval_s=0.1, tick_s=0.02)
        async with OcppSimulator(url, [spec]) as sim:
            station = sim.stations[0]
            await station.wait_connected()
            assert station.max_power_w == 16 * 230 * 3
            ev = EvSpec(id_tag="TAG1", capacity_kwh=0.05, soc_pct=90.0, max_power_kw=7.0, target_soc_pct=95.0)
            assert await station.plug_in(ev)
            await until(lambda: station.power_w == 7000.0, what="EV max power")
            session.set_target_kw(-5.0)  # 7.2 A * 690 V = 4968 W, below the EV's 7 kW
            record = await station.next_profile()
            assert record.accepted and record.limit == 7.2 and record.unit == "A"
            assert record.received_at == pytest.approx(time.time(), abs=2)
            await until(lambda: station.power_w == pytest.approx(4968.0), what="profile limit")
            await until(lambda: session.sample.power_w == pytest.approx(4968.0), what="MeterValues at the central")
            # 0.05 kWh battery, 5 % to go at ~5 kW: full in about 1.8 s, then the EV stops drawing.
            await until(lambda: ev.soc_pct >= 95.0 and station.power_w == 0.0, timeout_s=4, what="EV full")
            assert session.sample.soc_pct == pytest.approx(ev.soc_pct, abs=2.0)
            assert station.energy_wh == pytest.approx(0.05 * 1000 * 0.05, rel=0.2)
            await station.unplug()
            assert station.status == "Available" and station.transaction_id is None


async def test_many_stations_of_both_versions_in_one_process_and_reconnection(tmp_path):
    chargers = [charger(n) for n in range(1, 21)]
    async with central(tmp_path, chargers) as (system, url):
        specs = [StationSpec(f"CP{n}", "1.6" if n % 2 else "2.0.1", meter_interval_s=0.2, reconnect_cap_s=0.3)
                 for n in range(1, 21)]
        started = time.monotonic()
        async with OcppSimulator(url, specs) as sim:
            await asyncio.wait_for(asyncio.gather(*(s.wait_connected() for s in sim.stations)), 5)
            await until(lambda: all(s.connected for s in system.sessions.values()), what="all online")
            print(f"20 stations connected in {time.monotonic() - started:.2f} s")
            assert {s.ocpp_version for s in system.sessions.values()} == {"1.6", "2.0.1"}
            await until(lambda: all(s.boot.get("model") == "SimAC" for s in system.sessions.values()), what="boots")
            first = sim.station("CP3")
            await first.drop_link()
            await until(lambda: first.connections == 2 and first.connected.is_set(), what="reconnection")
            await until(lambda: system.sessions["CP3"].connected, what="central sees it back")
            assert [s.connections for s in sim.stations].count(1) == 19


async def test_stations_record_rejections_and_bad_url_errors(tmp_path):
    async with central(tmp_path, [charger(1, "2.0.1")]) as (system, url):
        async with OcppSimulator(url, [StationSpec("CP1", "2.0.1", accept_profiles=False)]) as sim:
            station = sim.stations[0]
            await station.wait_connected()
            system.session("ev1").set_target_kw(-8.0)
            record = await station.next_profile()
            assert not record.accepted and station.limits == {}
            assert station.limit_w() == station.max_power_w
        async with OcppSimulator(url, [StationSpec("NOBODY", "1.6")]) as sim:
            await until(lambda: "HTTP 404" in sim.stations[0].connect_errors, what="404")


def test_invalid_specs_name_the_field():
    with pytest.raises(ValueError, match="ocpp_version"):
        StationSpec("CP1", "3.0")
    with pytest.raises(ValueError, match="max_power_kw"):
        EvSpec(max_power_kw=-1)
    with pytest.raises(ValueError, match="phases"):
        StationSpec("CP1", phases=2)
    with pytest.raises(ValueError, match="base_url"):
        OcppSimulator("http://x", [])
    with pytest.raises(ValueError, match="unique"):
        OcppSimulator("ws://x", [StationSpec("A"), StationSpec("A")])


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "simulators.ocpp", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0 and "--version" in out.stdout and "--arrivals" in out.stdout


async def test_cli_stations_connect_and_start_sessions(tmp_path):
    events: list = []
    async with central(tmp_path, [charger(1), charger(2)], events) as (system, url):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators.ocpp", "--url", url, "--count", "2", "--version", "2.0.1", "--ev",
            "--meter-interval-s", "0.2", cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await until(lambda: len([e for e in events if e[0] == "session_started"]) == 2, timeout_s=8,
                        what="two sessions from the CLI")
            await until(lambda: all((s.sample.power_w or 0) > 0 for s in system.sessions.values()), what="power")
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 5)
