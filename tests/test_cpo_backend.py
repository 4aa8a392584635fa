"""The CPO backend simulator (issue #14's upstream peer), driven by the bundled charge-point simulator.

What is asserted is what crossed the wire: the backend's records of each message and its
answer, and the station's own records of what the backend sent it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from simulators.cpo_backend import CallErrorAnswer, ChargerNotConnected, CpoBackend, Received
from simulators.cpo_backend import records
from simulators.ocpp import EvSpec, OcppSimulator, StationSpec
from tests.conftest import until
from tests.test_ocpp_driver import pki  # noqa: F401  (a fixture: the CA, server and charger certificates)

REPO = Path(__file__).resolve().parents[1]

START = {"1.6": "StartTransaction", "2.0.1": "TransactionEvent", "2.1": "TransactionEvent"}


@pytest.mark.parametrize("version", ["1.6", "2.0.1", "2.1"])
async def test_boot_authorization_transaction_and_profiles(version):
    async with CpoBackend(id_tags={"GOOD"}) as backend:
        spec = StationSpec("CP1", version, meter_interval_s=0.1, tick_s=0.05)
        async with OcppSimulator(backend.url, [spec]) as sim:
            station = sim.stations[0]
            boot = await backend.wait_boot("CP1", timeout_s=3)
            assert (boot.ocpp_version, boot.vendor, boot.model, boot.connection_no, boot.status) == (
                version, "flexedge", "SimAC", 1, "Accepted")
            assert backend.connected("CP1") and backend.version("CP1") == version

            assert not await station.plug_in(EvSpec(id_tag="STRANGER"))
            assert [(a.id_tag, a.status) for a in backend.authorizations("CP1")] == [("STRANGER", "Invalid")]
            await station.unplug()

            assert await station.plug_in(EvSpec(id_tag="GOOD"))
            meter_action = "MeterValues" if version == "1.6" else "TransactionEvent"
            await backend.wait_message("CP1", meter_action, timeout_s=3, after=0 if version == "1.6" else 2)

            answer = await backend.set_charging_profile("CP1", 10, unit="A", stack_level=2, profile_id=7)
            assert answer["status"] == "Accepted"
            profile = station.profiles[-1]
            assert (profile.purpose, profile.limit, profile.unit, profile.stack_level, profile.charging_profile_id) == (
                "TxDefaultProfile", 10.0, "A", 2, 7)
            assert [p.profile_id for p in station.stack.profiles] == [7]
            sent = backend.sent("CP1")[-1]
            assert sent.unique_id.startswith("cpo-") and sent.answer == {"status": "Accepted"}

            assert (await backend.clear_charging_profile("CP1", profile_id=7))["status"] == "Accepted"
            assert station.stack.profiles == []
            assert (await backend.clear_charging_profile("CP1", profile_id=7))["status"] == "Unknown"
            await station.unplug()
            await until(lambda: backend.transactions("CP1") and backend.transactions("CP1")[-1].ended, 3,
                        "the transaction's end")

    assert [(a.id_tag, a.status) for a in backend.authorizations("CP1")][1:] == [("GOOD", "Accepted")] * 2
    [transaction] = backend.transactions("CP1")
    assert (transaction.id_tag, transaction.status) == ("GOOD", "Accepted")
    assert transaction.started_at <= transaction.stopped_at  # the charger's ISO timestamps
    actions = [m.action for m in transaction.messages]
    assert actions[0] == START[version] and actions[-1] in ("StopTransaction", "TransactionEvent")
    assert len(actions) >= 3, "meter values between start and stop"
    monos = [m.received_mono for m in transaction.messages]
    assert monos == sorted(monos)
    energy = [r.value for r in transaction.meter_readings if r.measurand == "Energy.Active.Import.Register"]
    assert energy == sorted(energy) and energy[-1] > 0
    assert transaction.meter_stop_wh >= energy[-1] - 1
    if version == "1.6":
        assert transaction.transaction_id == "1" and transaction.stop_reason == "EVDisconnected"
        assert [m.payload["transactionId"] for m in transaction.messages[1:]] == [1] * (len(actions) - 1)
    else:
        assert transaction.transaction_id == station_transaction_id(transaction)
        assert transaction.seq_nos == sorted(transaction.seq_nos)
        assert transaction.stop_reason == "EVDisconnected"
    power = backend.meter_values("CP1", "Power.Active.Import")
    assert power and max(r.value for r in power) > 1000
    assert all(m.answered and m.error_code is None for m in backend.messages("CP1"))


def station_transaction_id(transaction) -> str:
    return transaction.messages[0].payload["transactionInfo"]["transactionId"]


async def test_stopped_backend_comes_back_on_the_same_port_and_the_charger_reconnects():
    backend = CpoBackend()
    await backend.start()
    port = backend.bound_port
    spec = StationSpec("CP1", "2.0.1", reconnect_cap_s=0.4)
    try:
        async with OcppSimulator(backend.url, [spec]) as sim:
            station = sim.stations[0]
            await backend.wait_message("CP1", "StatusNotification", timeout_s=3)  # what follows the boot
            await backend.stop()
            assert not backend.connected("CP1") and not backend.running
            await until(lambda: not station.connected.is_set(), 2, "the station noticing the backend is gone")
            started = time.monotonic()
            with pytest.raises(ChargerNotConnected, match="CP1.*not connected"):
                await backend.set_charging_profile("CP1", 16)
            assert time.monotonic() - started < 0.1
            await until(lambda: station.connect_errors, 2, "a refused reconnection attempt")

            await backend.start()
            assert backend.bound_port == port
            link = await backend.wait_connected("CP1", timeout_s=3, after=1)
            assert link.connection_no == 2 and backend.connections("CP1") == 2
            status = await backend.wait_message("CP1", "StatusNotification", timeout_s=3, after=1)
            assert status.connection_no == 2
            assert len(backend.boots("CP1")) == 1, "the simulated station boots once per run"
            assert (await backend.set_charging_profile("CP1", 16))["status"] == "Accepted"
            assert station.profiles[-1].limit == 16
    finally:
        await backend.stop()


async def test_basic_auth_and_unknown_chargers_are_refused():
    passwords = {"CP1": "right-one"}
    async with CpoBackend(passwords=passwords, accept_unknown=False) as backend:
        specs = [StationSpec("CP1", "1.6", password="wrong-one"), StationSpec("CP9", "2.0.1")]
        async with OcppSimulator(backend.url, specs) as sim:
            await until(lambda: all(s.connect_errors for s in sim.stations), 3, "both refusals")
            assert sim.station("CP1").connect_errors[0] == "HTTP 401"
            assert sim.station("CP9").connect_errors[0] == "HTTP 404"
        assert {(r.charge_point_id, r.status, r.reason) for r in backend.refusals} >= {
            ("CP1", 401, "wrong password"), ("CP9", 404, "unknown charge point")}
        assert backend.connections("CP1") == 0
        async with OcppSimulator(backend.url, [StationSpec("CP1", "1.6", password="right-one")]) as sim:
            await backend.wait_boot("CP1", timeout_s=3)


async def test_calls_fail_promptly_and_clearly():
    async with CpoBackend() as backend:
        started = time.monotonic()
        with pytest.raises(ChargerNotConnected, match="NOPE: cannot send SetChargingProfile.*not connected"):
            await backend.set_charging_profile("NOPE", 10)
        with pytest.raises(ChargerNotConnected):
            await backend.call("NOPE", "Reset", {"type": "Soft"}, timeout_s=0.5)
        assert time.monotonic() - started < 0.1
        async with OcppSimulator(backend.url, [StationSpec("CP1", "1.6")]) as sim:
            await backend.wait_boot("CP1", timeout_s=3)
            refused = "RemoteStartTransaction cpo-\\d+ answered CALLERROR NotImplemented"
            with pytest.raises(CallErrorAnswer, match=refused) as error:
                await backend.remote_start("CP1", "GOOD")
            assert error.value.code == "NotImplemented" and backend.sent("CP1")[-1].error_code == "NotImplemented"
            with pytest.raises(ValueError, match="SetChargingProfile payload for CP1 .*schema"):
                await backend.call("CP1", "SetChargingProfile", {"connectorId": 1})
            with pytest.raises(ValueError, match="TxProfile needs transaction_id"):
                await backend.set_charging_profile("CP1", 10, purpose="TxProfile")
            assert sim.stations[0].connected.is_set()


async def test_malformed_frames_get_the_ocpp_error_and_the_link_survives():
    frames = {
        "not json": ("-1", "FormatViolation"),
        "[5]": ("-1", "PropertyConstraintViolation"),
        '[2, 7, "Heartbeat", {}]': ("-1", "ProtocolError"),
        '[2, "m1", "BootNotification", {"chargePointVendor": 5, "chargePointModel": "m"}]':
            ("m1", "TypeConstraintViolation"),
        '[2, "m2", "Authorize", {"idTag": "A", "extra": 1}]': ("m2", "FormatViolation"),
        '[2, "m3", "NoSuchAction", {}]': ("m3", "NotSupported"),
        '[2, "m4", "Reset", {}]': ("m4", "NotImplemented"),
    }
    async with CpoBackend() as backend:
        async with connect(backend.url + "/RAW", subprotocols=["ocpp1.6"], open_timeout=3) as ws:
            for frame, (unique_id, code) in frames.items():
                await ws.send(frame)
                answer = json.loads(await asyncio.wait_for(ws.recv(), 2))
                assert answer[:3] == [4, unique_id, code], frame
            await ws.send('[2, "ok", "Heartbeat", {}]')
            answer = json.loads(await asyncio.wait_for(ws.recv(), 2))
            assert answer[0] == 3 and answer[1] == "ok" and "currentTime" in answer[2]
        assert [m.error_code for m in backend.malformed("RAW")] == [
            "FormatViolation", "PropertyConstraintViolation", "ProtocolError"]
        assert [(m.action, m.error_code) for m in backend.messages("RAW")][-2:] == [
            ("Reset", "NotImplemented"), ("Heartbeat", None)]


async def test_mutual_tls_security_profile_3(pki):
    async with CpoBackend(security_profile=3, cert_file=pki / "server.pem", key_file=pki / "server.key",
                          ca_file=pki / "ca.pem") as backend:
        assert backend.url.startswith("wss://127.0.0.1:")
        async with OcppSimulator(backend.url, [StationSpec("CP1", "2.0.1")], ca_file=pki / "ca.pem",
                                 cert_file=pki / "client.pem", key_file=pki / "client.key"):
            await backend.wait_boot("CP1", timeout_s=3)
        async with OcppSimulator(backend.url, [StationSpec("CP2", "2.0.1")], ca_file=pki / "ca.pem") as sim:
            await until(lambda: sim.stations[0].connect_errors, 3, "no client certificate refused")
        assert backend.connections("CP2") == 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="security_profile 3 needs ca_file"):
        CpoBackend(security_profile=3, cert_file="s.pem", key_file="s.key")
    with pytest.raises(ValueError, match="versions"):
        CpoBackend(versions=("1.5",))
    with pytest.raises(ValueError, match="security_profile must be"):
        CpoBackend(security_profile=4)


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "simulators.cpo_backend", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and "--id-tag" in result.stdout and "--profile-limit-a" in result.stdout


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
                               ["transactionId", "transactionInfo", "meterValue", "sampledValue", "value", "idTag",
                                "idToken", "eventType", "timestamp", "chargingStation", "measurand", "x"]),
                               inner, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["StartTransaction", "StopTransaction", "MeterValues", "TransactionEvent",
                                           "Authorize", "BootNotification"]), json_values, json_values), max_size=6))
def test_views_never_fail_on_odd_payloads(calls):
    """The views read what the schema let through; even odd shapes must not break a test's inspection."""
    messages = [Received(action, f"u{n}", payload, 0.0, float(n), 1, "1.6",
                         answer=answer if isinstance(answer, dict) else None)
                for n, (action, payload, answer) in enumerate(calls)]
    try:
        records.transactions(messages)
        records.boots("CP", messages)
        records.authorizations(messages)
        [records.readings(m) for m in messages]
    except (AttributeError, TypeError, KeyError) as error:
        pytest.fail(f"a view failed on {calls!r}: {error!r}")
