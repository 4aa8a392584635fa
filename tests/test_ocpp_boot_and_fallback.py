"""What real chargers expect of the central system, on the wire (real websockets, the bundled stations):
nothing before their BootNotification is answered, and a fallback for profiles they refuse."""

from __future__ import annotations

import asyncio
import time

import pytest

from drivers.ocpp.session import fallback_settings
from simulators.ocpp import EvSpec, OcppSimulator, StationSpec
from tests.test_ocpp_driver import TAG, Events, charger, server_cfg, serving, until, url

GRACE_S = 1.0


# ------------------------------------------------------------------ boot gate


@pytest.mark.parametrize(("version", "before_boot"), [("1.6", "call_error"), ("2.0.1", "close")])
async def test_a_strict_station_gets_nothing_before_its_boot_is_answered(tmp_path, version, before_boot):
    events = Events()
    cfg = server_cfg(tmp_path, boot_grace_s=GRACE_S)
    async with serving(cfg, [charger(ocpp_version=version)], events) as drivers:
        # Targets set before the charger connects wait for its boot; the newest wins.
        drivers["ev1"].set_target_kw(-11.0)
        drivers["ev1"].set_target_kw(-7.0)
        spec = StationSpec("CP1", version, before_boot=before_boot)
        async with OcppSimulator(url(cfg), [spec]) as sim:
            station = sim.stations[0]
            record = await station.next_profile(after=0)
            await until(lambda: {"TriggerMessage", "SetChargingProfile"} <= {r.action for r in station.requests},
                        what="the trigger and the limit")
            assert station.early_requests == []
            assert station.connections == 1  # a "close" station would have closed and come back
            assert (record.purpose, record.limit, record.accepted) == ("TxDefaultProfile", 10.1, True)
            await asyncio.sleep(0.2)
            assert len(station.profiles) == 1
    assert not events.of("command_failed")


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
async def test_a_station_that_connects_without_booting_gets_requests_after_the_grace_period(tmp_path, version):
    events = Events()
    cfg = server_cfg(tmp_path, boot_grace_s=GRACE_S)
    async with serving(cfg, [charger(ocpp_version=version)], events) as drivers:
        drivers["ev1"].set_target_kw(-7.0)
        spec = StationSpec("CP1", version, send_boot=False)  # booted already: reconnects after a gateway restart
        async with OcppSimulator(url(cfg), [spec]) as sim:
            station = sim.stations[0]
            record = await station.next_profile(after=0, timeout_s=GRACE_S + 2.0)
            first = station.requests[0]
            waited_s = first.received_mono - station.connected_mono
            assert GRACE_S - 0.05 <= waited_s < GRACE_S + 1.0, waited_s
            assert record.limit == 10.1 and record.accepted
            assert drivers["ev1"].session.boot == {}


# ------------------------------------------------------------------ fallback


FALLBACK_CASES = {
    "2.0.1 ExternalConstraints refused": (
        "2.0.1", {"profile_purpose": "ChargingStationExternalConstraints"},
        {"reject_purposes": ("ChargingStationExternalConstraints",)}, ("ChargingStationExternalConstraints", "A")),
    "1.6 W refused": ("1.6", {"limit_unit": "W"}, {"reject_units": ("W",)}, ("TxDefaultProfile", "W")),
}


@pytest.mark.parametrize("case", FALLBACK_CASES)
async def test_a_refused_purpose_or_unit_falls_back_once_to_tx_default_in_amps(tmp_path, case):
    version, charger_keys, station_keys, (from_purpose, from_unit) = FALLBACK_CASES[case]
    events = Events()
    cfg = server_cfg(tmp_path, boot_grace_s=GRACE_S)
    async with serving(cfg, [charger(ocpp_version=version, **charger_keys)], events) as drivers:
        driver = drivers["ev1"]
        spec = StationSpec("CP1", version, meter_interval_s=0.1, reconnect_cap_s=0.3, **station_keys)
        async with OcppSimulator(url(cfg), [spec]) as sim:
            station = sim.stations[0]
            await station.wait_connected()
            assert await station.plug_in(EvSpec(id_tag=TAG, max_power_kw=22.0))
            driver.set_target_kw(-7.0)
            refused = await station.next_profile(after=0)
            fallback = await station.next_profile(after=1)
            assert (refused.purpose, refused.unit, refused.accepted) == (from_purpose, from_unit, False)
            assert (fallback.purpose, fallback.unit, fallback.limit, fallback.accepted) == (
                "TxDefaultProfile", "A", 10.1, True)
            event = await events.wait("charging_profile_fallback")
            assert event == {"charge_point_id": "CP1", "from_purpose": from_purpose, "from_unit": from_unit,
                             "to_purpose": "TxDefaultProfile", "to_unit": "A", "reason": "SetChargingProfile Rejected"}
            # The limit holds: the EV follows it and the gateway knows it is in force.
            await until(lambda: abs(station.power_w - 10.1 * 690) < 1, what="EV at the fallback limit")
            await until(lambda: driver.reading().p_kw == pytest.approx(-6.969, abs=0.01), what="metered power")
            reading = driver.reading()
            assert not reading.command_refused and not reading.degraded and "(fallback)" in reading.detail

            driver.set_target_kw(-5.0)  # the next limit goes out as the fallback at once
            record = await station.next_profile(after=2)
            assert (record.purpose, record.unit, record.limit, record.accepted) == ("TxDefaultProfile", "A", 7.2, True)
            # Remembered for the charger, not the link: after a reconnection the fallback is sent directly.
            await station.drop_link()
            await events.wait("asset_online", count=2)
            record = await station.next_profile(after=3, timeout_s=GRACE_S + 2.0)
            assert (record.purpose, record.unit, record.limit, record.accepted) == ("TxDefaultProfile", "A", 7.2, True)
            await asyncio.sleep(0.2)
            assert len(station.profiles) == 4
    assert len(events.of("charging_profile_fallback")) == 1
    assert not events.of("command_failed") and not events.of("asset_degraded")


async def test_a_station_refusing_everything_is_not_hammered_and_reads_as_refused(tmp_path):
    events = Events()
    cfg = server_cfg(tmp_path, boot_grace_s=GRACE_S)
    chargers = [charger(ocpp_version="2.0.1", profile_purpose="ChargingStationExternalConstraints")]
    async with serving(cfg, chargers, events) as drivers:
        driver = drivers["ev1"]
        async with OcppSimulator(url(cfg), [StationSpec("CP1", "2.0.1", accept_profiles=False)]) as sim:
            station = sim.stations[0]
            await station.wait_connected()
            started = time.monotonic()
            # The controller moves the target every 0.2 s: none of it may bypass the backoff.
            targets = [-7.0, -9.0]
            while time.monotonic() - started < 3.0:
                driver.set_target_kw(targets[0])
                targets.reverse()
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.1)  # the last refusal reaches the gateway (the next retry is >= 3.5 s in)
            sent = list(station.profiles)
            # The configured profile, the fallback, then retries after 0.5-1 s and 1-2 s more.
            assert 3 <= len(sent) <= 4, [(p.purpose, p.limit) for p in sent]
            assert sent[0].purpose == "ChargingStationExternalConstraints"
            assert all((p.purpose, p.unit) == ("TxDefaultProfile", "A") for p in sent[1:])
            assert len(events.of("charging_profile_fallback")) == 1
            reading = driver.reading()
            assert reading.command_refused and reading.degraded and "Rejected" in reading.detail
            failed = events.of("command_failed")
            assert len(failed) == len(sent) - 1 and failed[0]["purpose"] == "TxDefaultProfile"
            assert len(events.of("asset_degraded")) == 1

            station.accept_profiles = True  # the next retry (within 4 s) is accepted
            await until(lambda: not driver.reading().command_refused, timeout_s=5.0, what="a retry accepted")
            assert station.profiles[-1].accepted and not driver.reading().degraded
            assert station.profiles[-1].limit == (13.0 if driver.session.target_kw == -9.0 else 10.1)


def test_fallback_settings():
    assert fallback_settings(charger(ocpp_version="2.0.1", profile_purpose="ChargingStationExternalConstraints")) == {
        "profile_purpose": "TxDefaultProfile", "limit_unit": "A"}
    assert fallback_settings(charger(limit_unit="W")) == {"limit_unit": "A"}
    assert fallback_settings(charger(limit_unit="W", no_tx_default_profile=True)) == {"limit_unit": "A"}
    quirky = charger(profile_purpose="ChargingStationExternalConstraints", no_tx_default_profile=True)
    assert fallback_settings(quirky) == {"profile_purpose": "TxProfile", "limit_unit": "A"}
    assert fallback_settings(charger()) is None  # TxDefaultProfile in A is the fallback itself
    assert fallback_settings(charger(profile_purpose="ChargePointMaxProfile")) is None
