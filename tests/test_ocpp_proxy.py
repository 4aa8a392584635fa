"""The OCPP local controller on the wire: simulated stations -> the gateway's central system -> a CPO backend.

The stations (simulators.ocpp) connect to the real OcppCentralSystem, which proxies them to the
CPO backend simulator (simulators.cpo_backend) while it keeps the power control.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

import drivers.ocpp.proxy.link as upstream_link
from drivers.ocpp.pacing import REQUEST, LoopPacer
from drivers.ocpp.proxy.queue import OfflineQueue, QueuedMessage
from drivers.ocpp.proxy.rules import FORWARD, REASSERT, REFUSE, Slot, judge_clear, judge_set
from simulators.cpo_backend import CallErrorAnswer, CpoBackend
from simulators.ocpp import EvSpec, OcppSimulator, StationSpec
from tests.test_ocpp_driver import STEP_S, TAG, Events, charger, pki, server_cfg, serving, until, url  # noqa: F401

BACKEND_TAG = "CPO0TAG77"  # known to the backend only: the backend authorizes, not the gateway's list
GATEWAY_PURPOSE = {"1.6": "ChargePointMaxProfile", "2.0.1": "ChargingStationExternalConstraints"}


@pytest.fixture(autouse=True)
def quick_reconnects(monkeypatch):
    monkeypatch.setattr(upstream_link, "RETRY_FIRST_S", 0.1)
    monkeypatch.setattr(upstream_link, "RETRY_CAP_S", 0.4)


def proxied(backend: CpoBackend, asset_id="ev1", cp_id="CP1", **upstream) -> object:
    settings = dict(url=backend.url, security_profile=1, response_timeout_s=2.0, connect_timeout_s=2.0,
                    away_close_s=0.5)
    settings.update(upstream)
    return charger(asset_id, cp_id, upstream=settings)


def record_frames(station, frames: list) -> None:
    """Keep every frame the station receives (its point is per link: wrap the one in place)."""
    point = station._point
    original = point.route_message

    async def route(raw):
        frames.append(json.loads(raw))
        await original(raw)
    point.route_message = route


@contextlib.asynccontextmanager
async def site(tmp_path, chargers, backend, events):
    cfg = server_cfg(tmp_path)
    async with serving(cfg, chargers, events) as drivers:
        yield cfg, drivers


@contextlib.asynccontextmanager
async def one_station(tmp_path, version, meter_interval_s, **upstream):
    """A backend that knows BACKEND_TAG, the gateway proxying ev1/CP1 to it, the station booted there:
    (backend, events, driver, station)."""
    events = Events()
    async with CpoBackend(id_tags={BACKEND_TAG}) as backend:
        async with site(tmp_path, [proxied(backend, **upstream)], backend, events) as (cfg, drivers):
            async with OcppSimulator(url(cfg), [StationSpec("CP1", version, meter_interval_s=meter_interval_s)]) as sim:
                boot = await backend.wait_boot("CP1", timeout_s=STEP_S)
                assert boot.ocpp_version == version and boot.status == "Accepted"
                yield backend, events, drivers["ev1"], sim.stations[0]


# ------------------------------------------------------------------ on the wire


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
async def test_backend_authorizes_and_bills_while_the_gateway_holds_the_grid_limit(tmp_path, version):
    async with one_station(tmp_path, version, meter_interval_s=0.1) as (backend, events, driver, station):
        await events.wait("upstream_connected", "ev1")
        await station.wait_connected()
        frames: list = []
        record_frames(station, frames)
        ids = iter(range(1000))
        station._point._unique_id_generator = lambda: f"station-{next(ids)}"

        # Authorized by the backend (the gateway's own list does not know the tag).
        assert await station.plug_in(EvSpec(id_tag=BACKEND_TAG, max_power_kw=22.0))
        started = await events.wait("session_started", "ev1")
        assert not events.of("authorization_rejected")
        transaction = (await _until_value(lambda: backend.transactions("CP1")))[0]
        assert transaction.status == "Accepted" and transaction.id_tag == BACKEND_TAG
        assert started["transaction_id"] == station.transaction_id == transaction.transaction_id
        # The charger's ids arrive at the backend unchanged.
        assert backend.messages("CP1", "Authorize")[-1].unique_id.startswith("station-")

        driver.set_target_kw(-7.0)  # 10.1 A
        record = await station.next_profile(timeout_s=STEP_S)
        assert (record.purpose, record.stack_level, record.limit) == (GATEWAY_PURPOSE[version], 8, 10.1)
        await until(lambda: abs(station.power_w - 10.1 * 690) < 1, what="the gateway's limit")
        await until(lambda: len(backend.meter_values("CP1", "Power.Active.Import")) >= 2, what="billing")
        assert "proxied to 127.0.0.1" in driver.reading().detail

        # A higher limit from the backend is forwarded and applied, but the gateway's caps it.
        answer = await backend.set_charging_profile("CP1", 32, unit="A", stack_level=0)
        assert answer["status"] == "Accepted"
        assert station.profiles[-1].limit == 32 and station.profiles[-1].purpose == "TxDefaultProfile"
        cpo_id = backend.sent("CP1")[-1].unique_id
        assert [f for f in frames if f[0] == 2 and f[1] == cpo_id]  # the backend's id, unchanged
        await asyncio.sleep(0.3)
        assert station.limit_w() == pytest.approx(10.1 * 690) and station.power_w == pytest.approx(10.1 * 690)

        # The gateway's slot is not the backend's to take, nor to clear.
        count = len(station.profiles)
        answer = await backend.set_charging_profile("CP1", 32, purpose=GATEWAY_PURPOSE[version], stack_level=9,
                                                    evse_or_connector=0 if version == "1.6" else 1)
        assert answer["status"] == "Rejected" and len(station.profiles) == count
        answer = await backend.clear_charging_profile("CP1", purpose=GATEWAY_PURPOSE[version])
        assert answer["status"] == "Unknown"
        answer = await backend.clear_charging_profile("CP1", profile_id=1)
        assert answer["status"] == "Unknown"
        assert GATEWAY_PURPOSE[version] in station.limits
        # A clear of everything is forwarded; the gateway's limit is back at once.
        answer = await backend.clear_charging_profile("CP1")
        assert answer["status"] == "Accepted"
        await until(lambda: GATEWAY_PURPOSE[version] in station.limits, what="the limit sent again")
        assert station.limit_w() == pytest.approx(10.1 * 690)

        await station.unplug()
        await events.wait("session_stopped", "ev1")
        await until(lambda: backend.transactions("CP1")[0].ended, what="the stop at the backend")
    # The gateway's own requests (TriggerMessage, its profiles) and their answers stay local.
    actions = {m.action for m in backend.messages("CP1")}
    assert not actions & {"SetChargingProfile", "TriggerMessage", "GetReport"}
    assert all(not m.unique_id.startswith("fx-") for m in backend.messages("CP1") if m.action != "BootNotification")


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
async def test_the_backend_answers_before_the_gateway_has_read_the_call(tmp_path, monkeypatch, version):
    """The gateway's turns come late (its pacer busy with a setpoint's burst, here 0.2 s per CALL):
    the charger's CALLs go upstream at once and the backend's answers reach the charger first; what the
    gateway learns from an answer (its boot gate, a 1.6 transaction id) waits for its own reading."""
    original = LoopPacer.take

    async def late_turn(self, priority=REQUEST):
        if priority == REQUEST:
            await asyncio.sleep(0.2)
        await original(self, priority)
    monkeypatch.setattr(LoopPacer, "take", late_turn)
    async with one_station(tmp_path, version, meter_interval_s=1.0) as (backend, events, driver, station):
        await station.wait_connected()
        await asyncio.sleep(1.0)  # the boot's frames have had their late turns: the link is quiet
        sent_at = time.monotonic()
        assert await station._call(station._calls.Heartbeat()) is not None
        # Upstream and answered by the backend before the gateway's turn for it came (0.2 s later).
        assert time.monotonic() - sent_at < 0.15
        assert backend.messages("CP1", "Heartbeat")
        assert await station.plug_in(EvSpec(id_tag=BACKEND_TAG))
        started = await events.wait("session_started", "ev1")
        transaction = (await _until_value(lambda: backend.transactions("CP1")))[0]
        assert started["transaction_id"] == station.transaction_id == transaction.transaction_id
        assert len(events.of("session_started")) == 1 and not events.of("authorization_rejected")
        driver.set_target_kw(-7.0)  # the boot gate opened after the gateway read the boot
        record = await station.next_profile(timeout_s=STEP_S)
        assert (record.purpose, record.limit) == (GATEWAY_PURPOSE[version], 10.1)
        await until(lambda: len(backend.meter_values("CP1", "Power.Active.Import")) >= 1, what="billing")


async def test_a_charger_gone_while_the_backend_answers_leaves_the_backend_link_up(tmp_path, monkeypatch):
    """The backend's answer meets a charger link that has just closed (the gateway's turn for the
    charger's last frame still to come): the answer is dropped and the backend link stays up, for it
    is not the one that went."""
    original = LoopPacer.take

    async def late_turn(self, priority=REQUEST):
        await asyncio.sleep(0.3)
        await original(self, priority)
    async with one_station(tmp_path, "1.6", meter_interval_s=5.0, away_close_s=5.0) as (backend, events, _, station):
        await events.wait("upstream_connected", "ev1")
        await station.wait_connected()
        await asyncio.sleep(0.5)
        monkeypatch.setattr(LoopPacer, "take", late_turn)
        heartbeat = asyncio.ensure_future(station._call(station._calls.Heartbeat(), timeout_s=1.0))
        for _ in range(3):  # the Heartbeat on the wire, then the link closed before the backend's answer is back
            await asyncio.sleep(0)
        await station.drop_link()
        await backend.wait_message("CP1", "Heartbeat", timeout_s=STEP_S)
        await asyncio.sleep(0.5)
        assert not events.of("upstream_disconnected"), events.of("upstream_disconnected")
        assert backend.connections("CP1") == 1 and backend.connected("CP1")
        await heartbeat


async def _until_value(get, timeout_s=STEP_S):
    found = []

    def ready():
        found[:] = [get()]
        return bool(found[0])
    await until(ready, timeout_s, what="a value")
    return found[0]


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
async def test_backend_down_charging_goes_on_and_transactions_arrive_afterwards_in_order(tmp_path, version):
    events = Events()
    async with CpoBackend(id_tags={TAG}) as backend:
        async with site(tmp_path, [proxied(backend)], backend, events) as (cfg, drivers):
            async with OcppSimulator(url(cfg), [StationSpec("CP1", version, meter_interval_s=0.1)]) as sim:
                station = sim.stations[0]
                await backend.wait_boot("CP1", timeout_s=STEP_S)
                await events.wait("upstream_connected", "ev1")
                await backend.stop()
                gone = await events.wait("upstream_disconnected", "ev1")
                assert gone["url"] == f"{backend.url}/CP1" and gone["reason"]

                assert await station.plug_in(EvSpec(id_tag=TAG, max_power_kw=11.0))  # the gateway's list
                await until(lambda: station.power_w > 10000, what="charging without the backend")
                await asyncio.sleep(0.5)
                await station.unplug()
                await events.wait("session_stopped", "ev1")
                assert "backend unreachable" in drivers["ev1"].reading().detail
                sent_locally = station.energy_wh

                await backend.start()
                replayed = await events.wait("upstream_replayed", "ev1", timeout_s=6.0)
                assert replayed["messages"] >= 4
                [transaction] = backend.transactions("CP1")
                assert transaction.ended and transaction.status == "Accepted"
                actions = [m.action for m in transaction.messages]
                if version == "1.6":
                    assert actions[0] == "StartTransaction" and actions[-1] == "StopTransaction"
                    assert set(actions[1:-1]) == {"MeterValues"}
                    assert transaction.meter_stop_wh == int(sent_locally)
                else:
                    assert transaction.seq_nos == sorted(transaction.seq_nos)
                    assert [m.payload["eventType"] for m in transaction.messages][::len(actions) - 1] == \
                        ["Started", "Ended"]
                times = [m.received_mono for m in transaction.messages]
                assert times == sorted(times)
                assert backend.boots("CP1")[-1].connection_no == 2  # the boot went again on the new link
    assert not any(e == "upstream_queue_dropped" for e, _, _ in events.items)


async def test_reconnect_replays_the_boot_and_a_charger_away_gets_callerrors_and_no_one_else_s(tmp_path):
    events = Events()
    async with CpoBackend(id_tags={TAG}) as backend:
        chargers = [proxied(backend, away_close_s=1.5), proxied(backend, "ev2", "CP2", charge_point_id="CPO-CP2")]
        async with site(tmp_path, chargers, backend, events) as (cfg, drivers):
            specs = [StationSpec("CP1", "1.6"), StationSpec("CP2", "2.0.1")]
            async with OcppSimulator(url(cfg), specs) as sim:
                await backend.wait_boot("CP1", timeout_s=STEP_S)
                await backend.wait_boot("CPO-CP2", timeout_s=STEP_S)  # its identity at the backend
                one, two = sim.stations
                before = len(two.profiles)
                assert (await backend.set_charging_profile("CP1", 20, stack_level=0))["status"] == "Accepted"
                assert one.profiles[-1].limit == 20 and len(two.profiles) == before
            # The station is gone; its backend link stays a while, and requests get the OCPP error.
            await events.wait("asset_offline", "ev1")
            with pytest.raises(CallErrorAnswer) as refused:
                await backend.call("CP1", "TriggerMessage", {"requestedMessage": "StatusNotification"})
            assert refused.value.code == "GenericError" and "not connected" in refused.value.description
            await until(lambda: not backend.connected("CP1"), timeout_s=4.0, what="the backend link closed")
            # The charger comes back without booting: its last boot goes to the backend on the new link.
            async with OcppSimulator(url(cfg), [StationSpec("CP1", "1.6", send_boot=False)]) as sim:
                boot = await backend.wait_boot("CP1", timeout_s=STEP_S, after=1)
                assert boot.connection_no == 2 and boot.vendor == "flexedge"


async def test_tls_to_the_backend_verifies_its_certificate_and_sends_basic_auth(tmp_path, pki, monkeypatch):
    monkeypatch.setenv("CPO_PASSWORD", "cpo-secret")
    events = Events()
    async with CpoBackend(security_profile=2, cert_file=pki / "server.pem", key_file=pki / "server.key",
                          passwords={"CP1": "cpo-secret", "CP2": "cpo-secret"}) as backend:
        trusted = proxied(backend, security_profile=2, ca_file=pki / "ca.pem", password_env="CPO_PASSWORD")
        untrusted = proxied(backend, "ev2", "CP2", security_profile=2, password_env="CPO_PASSWORD")  # system CAs
        async with site(tmp_path, [trusted, untrusted], backend, events) as (cfg, drivers):
            async with OcppSimulator(url(cfg), [StationSpec("CP1", "2.0.1"), StationSpec("CP2", "1.6")]) as sim:
                assert (await backend.wait_boot("CP1", timeout_s=STEP_S)).status == "Accepted"
                refused = await events.wait("upstream_disconnected", "ev2")
                assert "CERTIFICATE_VERIFY_FAILED" in refused["reason"] and "cpo-secret" not in repr(events.items)
                await sim.stations[1].wait_connected()  # the charger works on without its backend
                assert "backend unreachable" in drivers["ev2"].reading().detail
    assert not backend.refusals and backend.charge_point_ids() == ["CP1"]


async def test_a_backend_id_that_looks_like_the_gateway_s_is_mapped_there_and_back(tmp_path):
    """A bare backend that uses "fx-" ids itself: the charger sees another id, the backend its own."""
    from websockets.asyncio.server import serve
    from tests.conftest import free_port

    frames: list = []
    answers: list = []

    async def backend_link(websocket):
        async for raw in websocket:
            frame = json.loads(raw)
            if frame[0] == 2:
                answer = {"BootNotification": {"status": "Accepted", "currentTime": "2026-12-04T12:00:00Z",
                                               "interval": 300}}.get(frame[2], {})
                await websocket.send(json.dumps([3, frame[1], answer]))
                if frame[2] == "BootNotification":
                    await websocket.send(json.dumps([2, "fx-7", "TriggerMessage",
                                                     {"requestedMessage": "StatusNotification"}]))
            else:
                answers.append(frame)

    port = free_port()
    events = Events()
    async with serve(backend_link, "127.0.0.1", port, subprotocols=["ocpp1.6"]):
        upstream = dict(url=f"ws://127.0.0.1:{port}/ocpp", security_profile=1, response_timeout_s=2.0)
        async with site(tmp_path, [charger(upstream=upstream)], None, events) as (cfg, _):
            async with OcppSimulator(url(cfg), [StationSpec("CP1", "1.6")]) as sim:
                station = sim.stations[0]
                await station.wait_connected()
                record_frames(station, frames)
                await until(lambda: answers, what="the answer at the backend")
    assert answers[0][:2] == [3, "fx-7"] and answers[0][2]["status"] == "Accepted"
    triggers = [f for f in frames if f[0] == 2 and f[2] == "TriggerMessage"]
    assert triggers and all(f[1] != "fx-7" for f in triggers)  # the gateway's own ids are fx-<uuid>
    assert any(f[1].startswith("up-") for f in triggers)


async def test_a_silent_backend_gets_the_message_again_and_the_charger_its_answer_in_time(tmp_path):
    """The backend does not answer the first StartTransaction: the gateway answers the charger after
    response_timeout_s with its own id, replays the start, and maps that id to the backend's."""
    from websockets.asyncio.server import serve
    from tests.conftest import free_port

    received: list = []
    answers = {"BootNotification": {"status": "Accepted", "currentTime": "2026-12-04T12:00:00Z", "interval": 300},
               "Authorize": {"idTagInfo": {"status": "Accepted"}},
               "StartTransaction": {"transactionId": 4242, "idTagInfo": {"status": "Accepted"}}}

    async def backend_link(websocket):
        async for raw in websocket:
            frame = json.loads(raw)
            received.append(frame)
            if frame[0] == 2 and not (frame[2] == "StartTransaction"
                                      and sum(f[2] == "StartTransaction" for f in received if f[0] == 2) == 1):
                await websocket.send(json.dumps([3, frame[1], answers.get(frame[2], {})]))

    port = free_port()
    events = Events()
    async with serve(backend_link, "127.0.0.1", port, subprotocols=["ocpp1.6"]):
        upstream = dict(url=f"ws://127.0.0.1:{port}/ocpp", security_profile=1, response_timeout_s=0.5)
        async with site(tmp_path, [charger(upstream=upstream)], None, events) as (cfg, _):
            async with OcppSimulator(url(cfg), [StationSpec("CP1", "1.6", meter_interval_s=0.1)]) as sim:
                station = sim.stations[0]
                await station.wait_connected()
                assert await station.plug_in(EvSpec(id_tag=TAG))
                local_id = int(station.transaction_id)
                assert local_id != 4242
                await events.wait("upstream_replayed", timeout_s=STEP_S)
                await until(lambda: any(f[2] == "MeterValues" for f in received if f[0] == 2), what="meter values")
    starts = [f for f in received if f[0] == 2 and f[2] == "StartTransaction"]
    assert len(starts) == 2 and starts[0][1] == starts[1][1]  # the same message, the same id
    meter_ids = {f[3].get("transactionId") for f in received if f[0] == 2 and f[2] == "MeterValues"}
    assert meter_ids == {4242}


# ------------------------------------------------------------------ pure rules


def test_backend_profiles_that_would_replace_or_outrank_the_gateway_s_are_refused():
    slots = [Slot(1, "ChargingStationExternalConstraints", 8, 1), Slot(2, "ChargingStationMaxProfile", 0, 0)]

    def profile(purpose, stack, profile_id=1001, evse=1):
        return {"evseId": evse, "chargingProfile": {"id": profile_id, "stackLevel": stack,
                                                    "chargingProfilePurpose": purpose}}
    assert judge_set(profile("TxDefaultProfile", 0), "2.0.1", slots) is None
    assert judge_set(profile("TxProfile", 50), "2.0.1", slots) is None
    assert judge_set(profile("TxDefaultProfile", 0, profile_id=1), "2.0.1", slots)
    assert judge_set(profile("ChargingStationExternalConstraints", 1), "2.0.1", slots)
    assert judge_set(profile("ChargingStationMaxProfile", 0, evse=0), "2.0.1", slots)
    assert judge_set(profile("ChargingStationMaxProfile", 3, evse=0), "2.0.1", slots) is None
    slots16 = [Slot(1, "ChargePointMaxProfile", 8, 0)]

    def profile16(purpose, stack, connector=0):
        return {"connectorId": connector, "csChargingProfiles": {"chargingProfileId": 7, "stackLevel": stack,
                                                                 "chargingProfilePurpose": purpose}}
    assert judge_set(profile16("ChargePointMaxProfile", 9), "1.6", slots16)
    assert judge_set(profile16("ChargePointMaxProfile", 2), "1.6", slots16) is None
    assert judge_clear({"id": 1}, "1.6", slots16)[0] == REFUSE
    assert judge_clear({"id": 5}, "1.6", slots16)[0] == FORWARD
    assert judge_clear({"chargingProfilePurpose": "ChargePointMaxProfile"}, "1.6", slots16)[0] == REFUSE
    assert judge_clear({"chargingProfilePurpose": "TxProfile"}, "1.6", slots16)[0] == FORWARD
    assert judge_clear({}, "1.6", slots16)[0] == REASSERT
    assert judge_clear({"connectorId": 1}, "1.6", slots16)[0] == FORWARD
    assert judge_clear({"chargingProfileCriteria": {"evseId": 0}}, "2.0.1", slots)[0] == REASSERT


def test_a_full_queue_drops_the_oldest_meter_values_never_a_transaction():
    queue = OfflineQueue(10)
    start = QueuedMessage("a", "StartTransaction", {"connectorId": 1})
    assert queue.push(start) is None
    for n in range(9):
        assert queue.push(QueuedMessage(f"m{n}", "MeterValues", {})) is None
    dropped = queue.push(QueuedMessage("s", "StopTransaction", {}))
    assert dropped.unique_id == "m0" and len(queue) == 10 and queue.head() is start
    for n in range(20):
        queue.push(QueuedMessage(f"t{n}", "StopTransaction", {}))
    assert len(queue) == 22 and queue.dropped == 9 and queue.head() is start  # transactions kept past the bound


async def test_a_gateway_restart_while_the_backend_is_away_loses_no_transaction(tmp_path):
    """The charger took the gateway's answers as delivery: what was queued for the backend is on disk,
    and the next run replays it first, in order, with the 1.6 transaction id mapped to the backend's."""
    events = Events()
    cfg = server_cfg(tmp_path)
    spec = StationSpec("CP1", "1.6", meter_interval_s=0.1, reconnect_cap_s=0.2)
    async with CpoBackend(id_tags={TAG}) as backend, OcppSimulator(url(cfg), [spec]) as sim:
        station = sim.stations[0]
        async with serving(cfg, [proxied(backend)], events):
            await backend.wait_boot("CP1", timeout_s=STEP_S)
            await events.wait("upstream_connected", "ev1")
            await backend.stop()
            await events.wait("upstream_disconnected", "ev1")
            assert await station.plug_in(EvSpec(id_tag=TAG, max_power_kw=11.0))  # answered by the gateway
            await until(lambda: station.power_w > 10000, what="charging without the backend")
            await asyncio.sleep(0.4)
        # The gateway is gone; the station charges on and ends the session under the next run.
        saved = tmp_path / "ocpp-upstream" / "CP1.json"
        await until(lambda: saved.exists() and json.loads(saved.read_text())["items"], what="the queue on disk")
        assert json.loads(saved.read_text())["items"][0]["action"] == "StartTransaction"
        async with serving(cfg, [proxied(backend)], events):
            await until(lambda: station.connections >= 2 and station.connected.is_set(), what="the station back")
            await station.unplug()
            await backend.start()
            await events.wait("upstream_replayed", "ev1", timeout_s=8.0)
            await until(lambda: backend.transactions("CP1") and backend.transactions("CP1")[0].ended,
                        what="the transaction complete at the backend")
            [transaction] = backend.transactions("CP1")
            actions = [m.action for m in transaction.messages]
            assert actions[0] == "StartTransaction" and actions[-1] == "StopTransaction"
            assert set(actions[1:-1]) <= {"MeterValues"} and len(actions) >= 4
            assert transaction.messages[-1].payload["transactionId"] == int(transaction.transaction_id)
            await until(lambda: json.loads(saved.read_text())["items"] == [], what="the queue on disk emptied")
