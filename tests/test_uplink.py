"""The MQTT uplink against a real Mosquitto: what arrives on the wire.

A paho subscriber in its own thread (``Recorder``) plays the VPP.  Brokers with
special settings (persistence, TLS listeners, passwords) are built here from
conftest's ``Mosquitto`` with their own configuration file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import Mosquitto, free_port

from edge.config.profile import Profile
from edge.uplink.spool import Spool
from edge.uplink.mqtt import Uplink

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
BIRTH = {"state": "online", "version": "0.1.0", "site_id": "demo", "assets": [{"id": "pv1", "kind": "pv", "driver": "sunspec"}]}
FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.3, "connect_timeout_s": 3.0, "ack_timeout_s": 3.0,
        "refusal_retry_s": 0.3}


def make_profile(port: int, site: str = "demo", backlog_msgs_per_s: float = 50, **mqtt) -> Profile:
    return Profile.model_validate(
        {
            "site": {"id": site},
            "uplink": {"mqtt": {"host": "127.0.0.1", "port": port, **mqtt}, "spool": {"backlog_msgs_per_s": backlog_msgs_per_s}},
        }
    )


def broker(tmp_path: Path, name: str, conf: str) -> Mosquitto:
    """A Mosquitto with our own configuration; ``{port}`` and ``{dir}`` are filled in."""
    workdir = tmp_path / name
    workdir.mkdir()
    instance = Mosquitto(workdir)
    # running as root, Mosquitto would switch to user mosquitto and lose access to tmp_path
    instance.conf.write_text("user root\n" + conf.format(port=instance.port, dir=workdir))
    return instance


class Recorder:
    """A VPP-side subscriber (paho, own thread, reconnects by itself)."""

    def __init__(self, port: int, topic: str = "flexedge/demo/#", *, client_id: str | None = None, clean: bool = True, **auth):
        # topic, payload, retain, monotonic arrival; without the broker's own redeliveries
        self.messages: list[tuple[str, bytes, bool, float]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id or f"recorder-{free_port()}", clean_session=clean,
            protocol=paho.MQTTv311,
        )
        if auth:
            self.client.username_pw_set(auth["username"], auth["password"])
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(5):
            self.stop()
            raise TimeoutError("recorder could not subscribe")

    def _on_message(self, client, userdata, message) -> None:
        if message.dup:
            # The broker resending to us what we had not acknowledged to it when it
            # stopped: a broker-to-subscriber duplicate, not something the uplink sent twice.
            return
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain), time.monotonic()))

    def payloads(self, subtopic: str, site: str = "demo") -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p, _, _ in self.messages if t == f"flexedge/{site}/{subtopic}"]

    def seqs(self, subtopic: str = "telemetry") -> list[int]:
        return [p["seq"] for p in self.payloads(subtopic)]

    async def wait_until(self, predicate, what: str, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {self.messages[-5:]}")
            await asyncio.sleep(0.02)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def broker_log(broker: Mosquitto) -> str:
    return (broker.workdir / "mosquitto.log").read_text()


async def wait_for(predicate, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def recorders():
    made: list[Recorder] = []

    def make(*args, **kwargs) -> Recorder:
        made.append(Recorder(*args, **kwargs))
        return made[-1]

    yield make
    for recorder in made:
        recorder.stop()


@pytest.fixture
def brokers(tmp_path):
    made: list[Mosquitto] = []

    def make(name: str, conf: str) -> Mosquitto:
        made.append(broker(tmp_path, name, conf))
        made[-1].start()
        return made[-1]

    yield make
    for instance in made:
        instance.stop()


@pytest.fixture
async def start_uplink(tmp_path):
    """Build an Uplink with its own spool and run it; closed (and checked to end) afterwards."""
    started: list[tuple[Uplink, asyncio.Task | None, Spool]] = []

    def start(profile: Profile, *, spool: Spool | None = None, on_setpoint=None, emit_event=None, run=True, **options):
        spool = spool or Spool(tmp_path / f"spool-{len(started)}.sqlite", 16 * MB)
        uplink = Uplink(profile, spool, on_setpoint or (lambda payload: None), BIRTH, emit_event, **{**FAST, **options})
        task = asyncio.create_task(uplink.run()) if run else None
        started.append((uplink, task, spool))
        return uplink

    yield start
    for uplink, task, spool in started:
        await asyncio.wait_for(uplink.close(), 10)  # also ends run(), whoever started it
        if task is not None:
            assert task.done()
        spool.close()


def telemetry(n: int) -> dict:
    return {"ts": "2026-11-21T10:00:00.000Z", "site_id": "demo", "cycle_s": 2.0, "mode": "idle", "n": n}


# ----------------------------------------------------------------- birth, will


async def test_birth_is_retained_and_mqtt5_is_negotiated(mosquitto, recorders, start_uplink):
    uplink = start_uplink(make_profile(mosquitto.port))
    await wait_for(lambda: uplink.connected, "connection")
    late = recorders(mosquitto.port, "flexedge/demo/status")  # subscribes after the birth: gets the retained copy
    await late.wait_until(lambda: late.messages, "retained birth")
    topic, payload, retain, _ = late.messages[0]
    status = json.loads(payload)
    assert retain and status["state"] == "online" and status["assets"] == BIRTH["assets"]
    assert status["ts"].endswith("Z")
    assert uplink.protocol == "5" and uplink.stats.protocol == "5"
    await wait_for(lambda: "as flexedge-demo (p5," in broker_log(mosquitto), "MQTT 5 (p5) in the broker log")


UPLINK_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from edge.config.profile import Profile
    from edge.uplink.spool import Spool
    from edge.uplink.mqtt import Uplink

    async def main(mode, port, spool_path, count):
        profile = Profile.model_validate({"site": {"id": "demo"}, "uplink": {"mqtt": {"port": port}}})
        spool = Spool(Path(spool_path), 64 << 20)
        uplink = Uplink(profile, spool, lambda b: None, {"state": "online", "site_id": "demo"},
                        backoff_initial_s=0.05, backoff_max_s=0.2)
        task = asyncio.create_task(uplink.run())
        if mode == "connect":
            while not uplink.connected:
                await asyncio.sleep(0.01)
            print("connected", flush=True)
        else:
            for n in range(count):
                await uplink.publish("telemetry", {"n": n})
            print("spooled", spool.pending, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])))
    """
)


async def run_uplink_process(tmp_path: Path, mode: str, port: int, spool_path: Path, count: int = 0) -> str:
    """Start a gateway process, wait for its one line of output, then kill -9 it."""
    script = tmp_path / "uplink_process.py"
    script.write_text(UPLINK_PROCESS)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(REPO), mode, str(port), str(spool_path), str(count), stdout=subprocess.PIPE
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
    finally:
        proc.kill()  # SIGKILL: no DISCONNECT, no cleanup
        await asyncio.wait_for(proc.wait(), 5)
    return line.decode().strip()


async def test_last_will_says_offline_when_the_gateway_process_is_killed(mosquitto, recorders, tmp_path):
    watcher = recorders(mosquitto.port, "flexedge/demo/status")
    assert await run_uplink_process(tmp_path, "connect", mosquitto.port, tmp_path / "spool.sqlite") == "connected"
    await watcher.wait_until(lambda: len(watcher.messages) >= 2, "birth then last will")
    states = [(p["state"], p.get("reason")) for p in watcher.payloads("status")]
    assert states == [("online", None), ("offline", "connection lost")]
    late = recorders(mosquitto.port, "flexedge/demo/status")
    await late.wait_until(lambda: late.messages, "retained status")
    assert json.loads(late.messages[0][1]) == {"state": "offline", "site_id": "demo", "reason": "connection lost"}
    assert late.messages[0][2]  # retained


# ------------------------------------------------------------- setpoints, live


async def test_setpoints_reach_on_setpoint_and_acks_go_out_live(mosquitto, recorders, start_uplink):
    received: list[bytes] = []

    def on_setpoint(payload: bytes) -> None:
        received.append(payload)
        if b"boom" in payload:
            raise RuntimeError("handler bug")

    vpp = recorders(mosquitto.port, "flexedge/demo/setpoint/ack")
    uplink = start_uplink(make_profile(mosquitto.port), on_setpoint=on_setpoint)
    await wait_for(lambda: uplink.connected, "connection")
    setpoint = b'{"id":"vpp-17","ts":"2026-11-21T10:00:00.000Z","valid_s":10,"activation_kw":12.5}'
    vpp.publish("flexedge/demo/setpoint", b"boom")  # a handler that raises must not drop the link
    vpp.publish("flexedge/demo/setpoint", setpoint)
    await wait_for(lambda: len(received) == 2, "two setpoints")
    assert received == [b"boom", setpoint]
    assert uplink.connected
    uplink.publish_live("setpoint/ack", {"id": "vpp-17", "status": "accepted", "reason": None, "activation_kw": 12.5})
    await vpp.wait_until(lambda: vpp.messages, "ack")
    assert vpp.payloads("setpoint/ack")[0]["status"] == "accepted"
    assert not vpp.messages[0][2]  # not retained


async def test_publish_live_is_dropped_and_counted_while_offline(start_uplink):
    uplink = start_uplink(make_profile(free_port()))
    await asyncio.sleep(0.1)
    uplink.publish_live("setpoint/ack", {"id": "x"})
    assert uplink.stats.live_dropped == 1 and not uplink.connected
    with pytest.raises(ValueError, match="stream must be one of telemetry, events, consumption, validation, got 'status'"):
        await uplink.publish("status", {})


async def test_live_telemetry_and_events_arrive_once_and_leave_the_spool(mosquitto, recorders, start_uplink):
    vpp = recorders(mosquitto.port)
    uplink = start_uplink(make_profile(mosquitto.port))
    await wait_for(lambda: uplink.connected, "connection")
    for n in range(60):
        assert await uplink.publish("telemetry", telemetry(n)) == n + 1
        if n % 10 == 0:
            await uplink.publish("events", {"ts": "t", "site_id": "demo", "type": "asset_offline", "asset_id": "pv1", "detail": {}})
    await vpp.wait_until(lambda: len(vpp.seqs()) >= 60 and len(vpp.seqs("events")) >= 6, "all messages")
    assert vpp.seqs() == list(range(1, 61))
    assert vpp.seqs("events") == list(range(1, 7))
    assert vpp.payloads("telemetry")[5]["n"] == 5
    await wait_for(lambda: uplink.stats.backlog_pending == 0, "spool emptied by PUBACKs")
    assert uplink.stats.sent == 66


# ------------------------------------------------------- outage and backlog


PERSISTENT = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {dir}/
max_inflight_messages 0
max_queued_messages 100000
"""


async def test_broker_outage_backlog_arrives_once_oldest_first_beside_live_traffic(brokers, recorders, start_uplink):
    # A persistent session keeps the VPP's subscription across the restart, so
    # nothing depends on who reconnects first.
    mqtt = brokers("persistent", PERSISTENT)
    vpp = recorders(mqtt.port, "flexedge/demo/telemetry", client_id="vpp", clean=False)
    uplink = start_uplink(make_profile(mqtt.port, backlog_msgs_per_s=25))
    await wait_for(lambda: uplink.connected, "connection")
    for n in range(5):
        await uplink.publish("telemetry", telemetry(n))
    await vpp.wait_until(lambda: len(vpp.seqs()) == 5, "live messages before the outage")

    mqtt.stop()
    await wait_for(lambda: not uplink.connected, "uplink notices the outage")
    for n in range(5, 45):  # 40 messages spooled while the broker is away
        await uplink.publish("telemetry", telemetry(n))
    assert uplink.stats.backlog_pending == 40
    mqtt.start()
    await wait_for(lambda: uplink.connected, "reconnection", 5)
    reconnected = time.monotonic()
    live_sent_at = {}
    for n in range(45, 48):
        await asyncio.sleep(0.3)
        seq = await uplink.publish("telemetry", telemetry(n))
        live_sent_at[seq] = time.monotonic()
    await vpp.wait_until(lambda: len(vpp.seqs()) >= 48, "backlog and live messages", 10)
    await asyncio.sleep(0.2)  # would a duplicate follow?

    seqs = vpp.seqs()
    assert sorted(seqs) == list(range(1, 49)) and len(seqs) == 48  # each exactly once
    backlog = [s for s in seqs if 6 <= s <= 45]
    assert backlog == sorted(backlog)  # oldest first
    arrival = {json.loads(p)["seq"]: at for _, p, _, at in vpp.messages}
    for seq, sent_at in live_sent_at.items():
        assert arrival[seq] - sent_at < 0.25, "live telemetry waited behind the backlog"
        assert seqs.index(seq) < seqs.index(45)  # went out while the backlog was still draining
    drain_s = arrival[45] - reconnected
    assert 39 / 25 * 0.8 < drain_s < 5, f"backlog throttled to 25 msg/s should take ~1.6 s, took {drain_s:.2f}"
    assert uplink.stats.reconnects == 1
    await wait_for(lambda: uplink.stats.backlog_pending == 0, "spool emptied")


async def test_messages_spooled_by_a_killed_process_are_sent_after_restart(mosquitto, recorders, start_uplink, tmp_path):
    spool_path = tmp_path / "gateway" / "spool.sqlite"
    # nothing listens on this port: the process can only spool
    assert await run_uplink_process(tmp_path, "spool", free_port(), spool_path, 25) == "spooled 25"
    vpp = recorders(mosquitto.port, "flexedge/demo/telemetry")
    spool = Spool(spool_path, 64 * MB)
    assert spool.pending == 25
    uplink = start_uplink(make_profile(mosquitto.port), spool=spool)
    await vpp.wait_until(lambda: len(vpp.seqs()) >= 25, "messages of the killed process")
    assert vpp.seqs() == list(range(1, 26))
    assert [p["n"] for p in vpp.payloads("telemetry")] == list(range(25))
    assert await uplink.publish("telemetry", telemetry(25)) == 26  # seq survives the restart


async def test_overflow_drops_oldest_counts_and_emits_spool_overflow(mosquitto, recorders, start_uplink, tmp_path):
    events: list[tuple] = []
    spool = Spool(tmp_path / "small.sqlite", 64 * 1024)
    uplink = start_uplink(  # not running yet: everything goes to the spool only
        make_profile(mosquitto.port), spool=spool, emit_event=lambda *e: events.append(e), overflow_event_interval_s=0.2,
        run=False,
    )
    for n in range(120):
        await uplink.publish("telemetry", {"n": n, "noise": os.urandom(700).hex()})  # ~0.8 kB stored
    dropped = spool.dropped_total
    assert dropped > 30 and uplink.stats.dropped == dropped
    await wait_for(lambda: sum(e[2]["dropped"] for e in events) == dropped, "overflow events covering every drop", 2)
    assert {(kind, asset) for kind, asset, _ in events} == {("spool_overflow", None)}
    assert events[-1][2]["dropped_total"] == dropped and events[-1][2]["max_bytes"] == 64 * 1024
    assert len(events) < 10  # rate-limited, not one per drop

    vpp = recorders(mosquitto.port, "flexedge/demo/telemetry")
    asyncio.create_task(uplink.run())
    await vpp.wait_until(lambda: 120 in vpp.seqs(), "the newest message", 10)
    assert vpp.seqs() == list(range(dropped + 1, 121))  # the oldest went first


async def test_without_emit_event_the_uplink_publishes_the_overflow_event_itself(mosquitto, recorders, start_uplink, tmp_path):
    spool = Spool(tmp_path / "small.sqlite", 64 * 1024)
    uplink = start_uplink(make_profile(mosquitto.port), spool=spool, overflow_event_interval_s=0.1, run=False)
    for n in range(60):
        await uplink.publish("telemetry", {"n": n, "noise": os.urandom(700).hex()})
    await asyncio.sleep(0.2)  # the rate-limited report of the last drops
    vpp = recorders(mosquitto.port, "flexedge/demo/events")
    asyncio.create_task(uplink.run())
    await vpp.wait_until(lambda: vpp.payloads("events"), "spool_overflow event")
    event = vpp.payloads("events")[-1]
    assert event["type"] == "spool_overflow" and event["asset_id"] is None and event["site_id"] == "demo"
    assert event["detail"]["dropped"] > 0 and event["seq"] >= 1


async def test_drops_not_yet_reported_are_spooled_as_spool_overflow_at_close(mosquitto, recorders, start_uplink, tmp_path):
    events: list[tuple] = []
    spool = Spool(tmp_path / "small.sqlite", 64 * 1024)
    # the production rate limit: after the first report, a minute's drops wait for a timer
    uplink = start_uplink(make_profile(mosquitto.port), spool=spool, emit_event=lambda *e: events.append(e), run=False)
    for n in range(120):
        await uplink.publish("telemetry", {"n": n, "noise": os.urandom(700).hex()})
    [(_, _, first)] = events
    assert spool.dropped_total > first["dropped"]  # more drops since, held back by the rate limit

    await asyncio.wait_for(uplink.close(), 5)
    dropped_by_close = spool.dropped_total  # the event itself may push one more message out
    stored = [json.loads(m.payload) for m in spool.oldest(1000) if m.topic == "flexedge/demo/events"]
    assert [e["type"] for e in stored] == ["spool_overflow"]
    pending = stored[0]["detail"]
    assert first["dropped"] + pending["dropped"] in (dropped_by_close, dropped_by_close - 1)
    assert pending["max_bytes"] == 64 * 1024 and stored[0]["site_id"] == "demo"

    vpp = recorders(mosquitto.port, "flexedge/demo/events")  # the next start sends it
    start_uplink(make_profile(mosquitto.port), spool=spool)
    await vpp.wait_until(lambda: vpp.payloads("events"), "the spool_overflow event after the restart")
    assert vpp.payloads("events")[0]["detail"] == pending


# --------------------------------------------------------- protocol version


async def test_forced_mqtt_311(mosquitto, recorders, start_uplink):
    watcher = recorders(mosquitto.port, "flexedge/demo/status")
    uplink = start_uplink(make_profile(mosquitto.port, protocol="3.1.1"))
    await watcher.wait_until(lambda: watcher.messages, "birth")
    assert uplink.protocol == "3.1.1"
    await wait_for(lambda: "as flexedge-demo (p2," in broker_log(mosquitto), "MQTT 3.1.1 (p2) in the broker log")


class Relay:
    """A TCP front for Mosquitto on a loopback port.

    ``refuse_mqtt5``: answer MQTT 5 CONNECTs with these bytes and hang up (what a
    3.1.1-only broker does), relay the others.  ``black_hole()``: the connections
    open now stay open but silently swallow everything, like a dead mobile link.
    """

    def __init__(self, target_port: int, refuse_mqtt5: bytes | None = None):
        self.target_port = target_port
        self.refuse_mqtt5 = refuse_mqtt5
        self.levels: list[int] = []  # protocol level of every CONNECT seen
        self._open: list[dict] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Relay":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for writer in self._writers:
            writer.close()

    def black_hole(self) -> None:
        for connection in self._open:
            connection["dead"] = True

    async def _pipe(self, connection: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not connection["dead"]:
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            fixed = await reader.readexactly(1)
            length, shift, encoded = 0, 0, b""
            while True:  # MQTT remaining-length varint
                byte = await reader.readexactly(1)
                encoded += byte
                length |= (byte[0] & 0x7F) << shift
                shift += 7
                if not byte[0] & 0x80:
                    break
            connect = await reader.readexactly(length)
            self.levels.append(connect[6])  # 00 04 'MQTT' <protocol level>
            if connect[6] == 5 and self.refuse_mqtt5 is not None:
                writer.write(self.refuse_mqtt5)
                await writer.drain()
                writer.close()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.append(up_writer)
            up_writer.write(fixed + encoded + connect)
            connection = {"dead": False}
            self._open.append(connection)
            await asyncio.gather(self._pipe(connection, reader, up_writer), self._pipe(connection, up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.mark.parametrize(
    "refusal",
    [b"\x20\x02\x00\x01", b"\x20\x03\x00\x84\x00"],
    ids=["3.1.1-broker-return-code-1", "mqtt5-reason-0x84"],
)
async def test_auto_falls_back_to_311_when_the_broker_refuses_mqtt5(mosquitto, recorders, start_uplink, refusal):
    async with Relay(mosquitto.port, refuse_mqtt5=refusal) as relay:
        watcher = recorders(mosquitto.port, "flexedge/demo/status")
        uplink = start_uplink(make_profile(relay.port, protocol="auto"))
        await watcher.wait_until(lambda: watcher.messages, "birth through the 3.1.1-only front")
        assert uplink.protocol == "3.1.1"
        assert relay.levels == [5, 4]  # tried 5, then 3.1.1 straight away
        assert await uplink.publish("telemetry", telemetry(0)) == 1
        await wait_for(lambda: uplink.stats.sent == 1, "PUBACK through the relay")
        await uplink.close()


async def test_a_silent_link_is_dropped_and_its_unacknowledged_messages_resent(mosquitto, recorders, start_uplink):
    vpp = recorders(mosquitto.port, "flexedge/demo/telemetry")
    async with Relay(mosquitto.port) as relay:
        uplink = start_uplink(make_profile(relay.port), ack_timeout_s=1.0)
        await wait_for(lambda: uplink.connected, "connection")
        for n in range(3):
            await uplink.publish("telemetry", telemetry(n))
        await vpp.wait_until(lambda: len(vpp.seqs()) == 3, "messages before the link dies")
        relay.black_hole()  # no FIN, no RST: only a timeout can tell
        for n in range(3, 6):
            await uplink.publish("telemetry", telemetry(n))
        await vpp.wait_until(lambda: len(vpp.seqs()) >= 6, "messages resent on a new connection", 6)
        await asyncio.sleep(0.2)
        assert vpp.seqs() == list(range(1, 7))
        assert uplink.stats.reconnects == 1 and len(relay.levels) == 2
        await uplink.close()


# --------------------------------------------------------------- security


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1, a client certificate, and an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{ca}.key",
            "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=flexedge {ca}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for leaf, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{leaf}.ext").write_text(f"basicConstraints=CA:FALSE\n{ext}\n")
        run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{leaf}.key",
            "-out", f"{leaf}.csr", "-subj", f"/CN=flexedge-{leaf}")
        run("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-out", f"{leaf}.pem", "-extfile", f"{leaf}.ext")
    return {name: d / name for name in ("ca.pem", "rogue-ca.pem", "client.pem", "client.key", "server.pem", "server.key")}


@pytest.fixture
def tls_broker(brokers, pki):
    """Plain listener (for the recorder), TLS listener, mutual-TLS listener."""
    tls_port, mtls_port = free_port(), free_port()
    server = f"cafile {pki['ca.pem']}\ncertfile {pki['server.pem']}\nkeyfile {pki['server.key']}\n"
    instance = brokers(
        "tls",
        "listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"listener {tls_port} 127.0.0.1\n{server}require_certificate false\n"
        f"listener {mtls_port} 127.0.0.1\n{server}require_certificate true\n",
    )
    return instance, tls_port, mtls_port


async def test_tls_verifies_the_broker(tls_broker, pki, recorders, start_uplink, caplog):
    plain, tls_port, _ = tls_broker
    watcher = recorders(plain.port, "flexedge/+/status")
    good = start_uplink(make_profile(tls_port, site="tls", tls={"ca_file": str(pki["ca.pem"])}))
    fooled = start_uplink(make_profile(tls_port, site="rogue", tls={"ca_file": str(pki["rogue-ca.pem"])}))
    await watcher.wait_until(lambda: watcher.payloads("status", site="tls"), "birth over TLS")
    await wait_for(lambda: good.connected, "subscribed after the birth")
    await wait_for(lambda: "certificate verify failed" in caplog.text, "verification failure logged")
    assert not fooled.connected and not watcher.payloads("status", site="rogue")


async def test_mutual_tls_needs_the_client_certificate(tls_broker, pki, recorders, start_uplink, caplog):
    plain, _, mtls_port = tls_broker
    watcher = recorders(plain.port, "flexedge/+/status")
    ca = str(pki["ca.pem"])
    mutual = start_uplink(
        make_profile(mtls_port, site="mtls", tls={"ca_file": ca, "cert_file": str(pki["client.pem"]), "key_file": str(pki["client.key"])})
    )
    anonymous = start_uplink(make_profile(mtls_port, site="nocert", tls={"ca_file": ca}), connect_timeout_s=1.0)
    await watcher.wait_until(lambda: watcher.payloads("status", site="mtls"), "birth over mutual TLS")
    await wait_for(lambda: mutual.connected, "subscribed after the birth")
    await wait_for(lambda: "before CONNACK" in caplog.text, "the refused handshake logged", 6)
    assert "certificate required" in caplog.text
    assert not anonymous.connected and not watcher.payloads("status", site="nocert")


def failures(caplog, site_port: int, level: int = logging.WARNING) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "flexedge.uplink" and r.levelno >= level
            and r.getMessage().startswith(f"uplink to 127.0.0.1:{site_port}:")]


def repeats(caplog, site_port: int) -> list[logging.LogRecord]:
    return [r for r in failures(caplog, site_port, logging.DEBUG) if r.levelno == logging.DEBUG and "(again)" in r.getMessage()]


async def test_a_refused_client_certificate_fails_fast_and_is_logged_once(tls_broker, pki, start_uplink, caplog):
    caplog.set_level(logging.DEBUG, logger="flexedge.uplink")
    _, _, mtls_port = tls_broker
    started = time.time()
    # the production CONNACK timeout (10 s): a refused certificate must not wait for it
    uplink = start_uplink(make_profile(mtls_port, site="nocert", tls={"ca_file": str(pki["ca.pem"])}), connect_timeout_s=10.0)
    await wait_for(lambda: failures(caplog, mtls_port), "the refusal logged", 5)
    first = failures(caplog, mtls_port)[0]
    refused_after_s = first.created - started
    print(f"refused client certificate: attempt failed after {refused_after_s:.3f} s")
    assert refused_after_s < 1.0, f"a refused certificate took {refused_after_s:.2f} s to fail"
    assert first.levelno == logging.ERROR and "certificate required" in first.getMessage()
    assert "before CONNACK" in first.getMessage() and "check uplink.mqtt.tls" in first.getMessage()
    await wait_for(lambda: len(repeats(caplog, mtls_port)) >= 3, "more attempts at the capped pace", 5)
    assert len(failures(caplog, mtls_port)) == 1  # the retries go on, quietly
    assert not uplink.connected


async def test_a_refusal_is_retried_at_its_own_slower_pace(tls_broker, pki, start_uplink, caplog):
    """A broker that refuses the certificate is not hammered at the outage pace (0.3 s here)."""
    caplog.set_level(logging.DEBUG, logger="flexedge.uplink")
    _, _, mtls_port = tls_broker
    start_uplink(make_profile(mtls_port, site="nocert", tls={"ca_file": str(pki["ca.pem"])}), refusal_retry_s=2.0)
    await wait_for(lambda: failures(caplog, mtls_port), "the refusal logged", 5)
    await asyncio.sleep(3.0)
    attempts = 1 + len(repeats(caplog, mtls_port))
    assert attempts <= 4, attempts  # one every 1-2 s, not one every 0.3 s (about 10)


@pytest.mark.parametrize("content", ["", "  \n\n"], ids=["empty", "whitespace"])
async def test_an_empty_password_file_is_said_once_never_an_index_error(start_uplink, caplog, tmp_path, content):
    caplog.set_level(logging.DEBUG, logger="flexedge.uplink")
    port = free_port()
    (tmp_path / "pw").write_text(content)
    uplink = start_uplink(make_profile(port, username="gateway", password_file=str(tmp_path / "pw")))
    await wait_for(lambda: len(repeats(caplog, port)) >= 3, "several attempts", 5)
    [record] = failures(caplog, port)
    assert f"uplink.mqtt.password_file: password file {tmp_path / 'pw'} is empty" in record.getMessage()
    assert record.levelno == logging.ERROR
    assert "index" not in caplog.text.lower() and not uplink.connected


async def test_missing_tls_file_is_reported_by_its_profile_key(start_uplink, caplog, tmp_path):
    uplink = start_uplink(make_profile(free_port(), tls={"ca_file": str(tmp_path / "nope.pem")}))
    await wait_for(lambda: "uplink.mqtt.tls.ca_file" in caplog.text, "error naming the key")
    assert f"{tmp_path / 'nope.pem'} does not exist" in caplog.text
    assert not uplink.connected


SECRET = "s3cret-Pa55-do-not-log"


@pytest.fixture
def password_broker(brokers, tmp_path):
    passwords = tmp_path / "passwords"
    passwords.touch()
    for user, password in (("gateway", SECRET), ("vpp", "vpp-pass")):
        subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True, timeout=10)
    return brokers("auth", f"listener {{port}} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n")


@pytest.mark.parametrize("source", ["env", "file"])
async def test_password_from_env_or_file_is_used_and_never_logged(password_broker, recorders, start_uplink, caplog, tmp_path, monkeypatch, source):
    caplog.set_level(logging.DEBUG)
    watcher = recorders(password_broker.port, "flexedge/+/status", username="vpp", password="vpp-pass")
    if source == "env":
        monkeypatch.setenv("FLEXEDGE_TEST_MQTT_PASSWORD", SECRET)
        good = dict(password_env="FLEXEDGE_TEST_MQTT_PASSWORD")
        monkeypatch.setenv("FLEXEDGE_TEST_WRONG", SECRET + "-wrong")
        bad = dict(password_env="FLEXEDGE_TEST_WRONG")
    else:
        (tmp_path / "pw").write_text(SECRET + "\n")
        (tmp_path / "wrong").write_text(SECRET + "-wrong\n")
        good, bad = dict(password_file=str(tmp_path / "pw")), dict(password_file=str(tmp_path / "wrong"))
    uplink = start_uplink(make_profile(password_broker.port, username="gateway", **good))
    refused = start_uplink(make_profile(password_broker.port, site="refused", username="gateway", **bad))
    await watcher.wait_until(lambda: watcher.payloads("status"), "birth with the right password")
    await wait_for(lambda: "uplink to 127.0.0.1" in caplog.text, "refusal logged")
    await wait_for(lambda: uplink.connected, "subscribed after the birth")
    assert not refused.connected
    assert "authori" in caplog.text.lower() or "password" in caplog.text.lower()
    assert SECRET not in caplog.text


async def test_refused_credentials_fail_fast_and_are_logged_once(password_broker, start_uplink, caplog, tmp_path):
    caplog.set_level(logging.DEBUG, logger="flexedge.uplink")
    (tmp_path / "wrong").write_text(SECRET + "-wrong\n")
    started = time.time()
    uplink = start_uplink(make_profile(password_broker.port, username="gateway", password_file=str(tmp_path / "wrong")),
                          connect_timeout_s=10.0)
    await wait_for(lambda: failures(caplog, password_broker.port), "the refusal logged", 5)
    first = failures(caplog, password_broker.port)[0]
    print(f"refused credentials: attempt failed after {first.created - started:.3f} s")
    assert first.created - started < 1.0
    assert first.levelno == logging.ERROR and "check uplink.mqtt.username" in first.getMessage()
    await wait_for(lambda: len(repeats(caplog, password_broker.port)) >= 3, "more attempts at the capped pace", 5)
    assert len(failures(caplog, password_broker.port)) == 1
    assert not uplink.connected and SECRET not in caplog.text


# ----------------------------------------------------------------- shutdown


async def test_close_publishes_retained_shutdown_status_and_ends_run(mosquitto, recorders, tmp_path):
    watcher = recorders(mosquitto.port, "flexedge/demo/status")
    spool = Spool(tmp_path / "spool.sqlite", 16 * MB)
    uplink = Uplink(make_profile(mosquitto.port), spool, lambda b: None, BIRTH, **FAST)
    task = asyncio.create_task(uplink.run())
    await wait_for(lambda: uplink.connected, "connection")
    for n in range(20):
        await uplink.publish("telemetry", telemetry(n))
    await asyncio.wait_for(uplink.close(), 5)  # at once: most PUBACKs are still on their way
    assert task.done() and not task.cancelled()  # close() ends run() normally
    assert spool.pending == 0  # close() waited for the PUBACKs and removed the messages
    assert uplink.stats.sent == 20
    await watcher.wait_until(lambda: len(watcher.messages) >= 2, "shutdown status")
    status = watcher.payloads("status")[-1]
    assert (status["state"], status["reason"], status["site_id"]) == ("offline", "shutdown", "demo")
    # a clean DISCONNECT, so no last will follows
    await wait_for(lambda: "Client flexedge-demo disconnected." in broker_log(mosquitto), "clean DISCONNECT in the broker log")
    await asyncio.sleep(0.2)
    assert watcher.payloads("status")[-1]["reason"] == "shutdown"
    spool.close()


async def test_cancelling_run_also_publishes_the_shutdown_status(mosquitto, recorders, tmp_path):
    watcher = recorders(mosquitto.port, "flexedge/demo/status")
    spool = Spool(tmp_path / "spool.sqlite", 16 * MB)
    uplink = Uplink(make_profile(mosquitto.port), spool, lambda b: None, BIRTH, **FAST)
    task = asyncio.create_task(uplink.run())
    await wait_for(lambda: uplink.connected, "connection")
    task.cancel()  # the order edge/runtime/daemon.py uses: cancel run(), then close()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
    assert task.cancelled()
    await asyncio.wait_for(uplink.close(), 3)
    await watcher.wait_until(lambda: len(watcher.messages) >= 2, "shutdown status")
    await asyncio.sleep(0.1)
    assert [(p["state"], p.get("reason")) for p in watcher.payloads("status")] == [("online", None), ("offline", "shutdown")]
    spool.close()


def test_backoff_is_capped_at_5_s_exponential_with_equal_jitter(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", 16 * MB)
    uplink = Uplink(make_profile(1883), spool, lambda b: None, BIRTH)  # the defaults the daemon uses
    ceilings = [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    runs = []
    for _ in range(50):
        uplink._backoff.reset()
        runs.append([uplink._backoff.next_delay() for _ in ceilings])
    for attempt, ceiling in enumerate(ceilings):
        delays = {run[attempt] for run in runs}
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(delays) > 40
    spool.close()


@pytest.mark.slow
async def test_back_within_the_backoff_cap_after_a_long_broker_outage(mosquitto, recorders, start_uplink):
    # The production pacing (0.5 s first, 5 s cap), not the tests' fast one.
    uplink = start_uplink(make_profile(mosquitto.port), backoff_initial_s=0.5, backoff_max_s=5.0)
    await wait_for(lambda: uplink.connected, "connection")
    mosquitto.stop()
    await wait_for(lambda: not uplink.connected, "uplink notices the outage")
    await asyncio.sleep(12)  # long enough for the backoff to reach its cap
    mosquitto.start()  # returns once the port accepts connections
    back = time.monotonic()
    await wait_for(lambda: uplink.connected, "reconnection", 10)
    recovery_s = time.monotonic() - back
    print(f"uplink back {recovery_s:.2f} s after the broker")
    assert recovery_s < 5.0 + 1.0, f"the uplink came back {recovery_s:.1f} s after the broker"
