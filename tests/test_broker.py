"""The embedded MQTT broker, tested on the wire with paho-mqtt, aiomqtt and raw sockets."""

from __future__ import annotations

import asyncio
import queue
import random
import select
import struct
import subprocess
import sys
import time

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from simulators.broker import MqttBroker, is_valid_topic_filter, topic_matches

HOST = "127.0.0.1"


@pytest.fixture
async def broker():
    async with MqttBroker(HOST, 0) as running:
        yield running


# -- a raw MQTT 3.1.1 client: what the wire carries, byte for byte -----------------


def _length(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _packet(first_byte: int, body: bytes = b"") -> bytes:
    return bytes([first_byte]) + _length(len(body)) + body


def _s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, keepalive: int = 60, will: tuple[str, bytes, int, bool] | None = None,
                   level: int = 4, name: str = "MQTT", flags_extra: int = 0) -> bytes:
    flags = 0x02 | flags_extra
    payload = _s(client_id)
    if will:
        topic, message, qos, retain = will
        flags |= 0x04 | qos << 3 | (0x20 if retain else 0)
        payload += _s(topic) + _s(message)
    return _packet(0x10, _s(name) + bytes([level, flags]) + struct.pack("!H", keepalive) + payload)


def subscribe_packet(packet_id: int, *filters: tuple[str, int]) -> bytes:
    return _packet(0x82, struct.pack("!H", packet_id) + b"".join(_s(f) + bytes([q]) for f, q in filters))


def publish_packet(topic: str | bytes, payload: bytes, qos: int = 0, packet_id: int = 1, retain: bool = False) -> bytes:
    body = _s(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return _packet(0x30 | qos << 1 | int(retain), body)


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(*await asyncio.wait_for(asyncio.open_connection(HOST, port), 2))

    @classmethod
    async def connected(cls, port: int, client_id: str, **kwargs) -> RawClient:
        client = await cls.open(port)
        client.send(connect_packet(client_id, **kwargs))
        assert await client.read_packet() == (0x20, b"\x00\x00")
        return client

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_packet(self, timeout_s: float = 2.0) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout_s):
            first = (await self.reader.readexactly(1))[0]
            length, shift = 0, 0
            while True:
                digit = (await self.reader.readexactly(1))[0]
                length |= (digit & 0x7F) << shift
                shift += 7
                if not digit & 0x80:
                    break
            return first, await self.reader.readexactly(length)

    async def closed_by_broker(self, timeout_s: float = 2.0) -> bool:
        """True once the broker closes the connection (anything it still sends is skipped)."""
        try:
            async with asyncio.timeout(timeout_s):
                while await self.reader.read(65536):
                    pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        self.close()
        return True

    def close(self) -> None:
        self.writer.transport.abort()


# -- a paho client in its own network thread ----------------------------------


class PahoClient:
    def __init__(self, port: int, client_id: str, protocol: int = paho.MQTTv311):
        self.port = port
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.connacks: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.client.on_connect = lambda c, u, flags, reason, props: self.connacks.put(reason)
        self.client.on_subscribe = lambda c, u, mid, reasons, props: self.subacks.put(reasons)
        self.client.on_message = lambda c, u, message: self.messages.put(message)

    async def connect(self) -> paho.ReasonCode:
        await asyncio.to_thread(self.client.connect, HOST, self.port, 30)
        self.client.loop_start()
        return await asyncio.to_thread(self.connacks.get, timeout=3)

    async def subscribe(self, topic: str, qos: int) -> list:
        self.client.subscribe(topic, qos)
        return await asyncio.to_thread(self.subacks.get, timeout=3)

    async def next_message(self, timeout_s: float = 3.0) -> paho.MQTTMessage:
        return await asyncio.to_thread(self.messages.get, timeout=timeout_s)

    def stop(self) -> None:
        self.client.disconnect()  # first, so that the network thread exits at once
        self.client.loop_stop()


def granted(reason_codes) -> list[int]:
    return [int(getattr(code, "value", code)) for code in reason_codes]


async def next_message(client: aiomqtt.Client, timeout_s: float = 2.0) -> aiomqtt.Message:
    return await asyncio.wait_for(anext(aiter(client.messages)), timeout_s)


async def no_message(client: aiomqtt.Client, within_s: float = 0.3) -> bool:
    try:
        message = await next_message(client, within_s)
    except TimeoutError:
        return True
    pytest.fail(f"unexpected message on {message.topic}: {message.payload!r}")


# -- topic rules ---------------------------------------------------------------


@pytest.mark.parametrize("topic_filter, topic, expected", [
    ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/+", "a/b", True), ("a/+", "a/b/c", False),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("#", "a/b", True), ("+/+", "/x", True),
    ("+", "a/b", False), ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("$SYS/#", "$SYS/x", True),
    ("flexedge/+/setpoint/ack", "flexedge/demo/setpoint/ack", True),
])
def test_topic_matching(topic_filter, topic, expected):
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("topic_filter, valid", [
    ("a/#", True), ("#", True), ("+/b/+", True), ("a/#/b", False), ("a#", False), ("a/b+", False), ("", False),
])
def test_topic_filter_validity(topic_filter, valid):
    assert is_valid_topic_filter(topic_filter) is valid


# -- publish / subscribe -----------------------------------------------------------


async def test_qos0_and_qos1_delivered_at_the_lower_of_publish_and_subscription_qos(broker):
    async with aiomqtt.Client(HOST, broker.port, identifier="sub", timeout=3) as sub, \
               aiomqtt.Client(HOST, broker.port, identifier="pub", timeout=3) as pub:
        assert granted(await sub.subscribe("q1/x", qos=1)) == [1]
        assert granted(await sub.subscribe("q0/x", qos=0)) == [0]
        await pub.publish("q1/x", b"one-at-1", qos=1)
        await pub.publish("q1/x", b"zero-at-1", qos=0)
        await pub.publish("q0/x", b"one-at-0", qos=1)
        received = [await next_message(sub) for _ in range(3)]
        assert [(str(m.topic), m.payload, m.qos, m.retain) for m in received] == [
            ("q1/x", b"one-at-1", 1, False), ("q1/x", b"zero-at-1", 0, False), ("q0/x", b"one-at-0", 0, False)]
        # More QoS 1 messages than the in-flight window (100): PUBACKs must free slots, ids wrap cleanly.
        for index in range(300):
            await pub.publish("q1/x", str(index).encode(), qos=1)
        payloads = [(await next_message(sub)).payload for _ in range(300)]
        assert payloads == [str(index).encode() for index in range(300)]
        assert await no_message(sub)


async def test_qos2_is_granted_as_qos1_and_a_qos2_publish_arrives_once(broker):
    sub, pub = PahoClient(broker.port, "paho-sub"), PahoClient(broker.port, "paho-pub")
    try:
        assert (await sub.connect()) == 0 and (await pub.connect()) == 0
        assert granted(await sub.subscribe("q2/#", 2)) == [1]
        info = pub.client.publish("q2/x", b"exactly", qos=2)
        await asyncio.to_thread(info.wait_for_publish, 3)  # PUBREC/PUBREL/PUBCOMP completed
        message = await sub.next_message()
        assert (message.topic, message.payload, message.qos) == ("q2/x", b"exactly", 1)
        with pytest.raises(queue.Empty):
            await sub.next_message(timeout_s=0.3)
    finally:
        sub.stop()
        pub.stop()


async def test_retained_messages_reach_new_subscribers_flagged_and_can_be_cleared(broker):
    async with aiomqtt.Client(HOST, broker.port, identifier="pub", timeout=3) as pub:
        await pub.publish("site/a/status", b'{"state": "online"}', qos=1, retain=True)
        await pub.publish("site/b/status", b"b-old", qos=1, retain=True)
        await pub.publish("site/b/status", b"b-new", qos=0, retain=True)
        async with aiomqtt.Client(HOST, broker.port, identifier="late", timeout=3) as late:
            await late.subscribe("site/+/status", qos=1)
            first = {str(m.topic): m for m in [await next_message(late), await next_message(late)]}
            assert first["site/a/status"].payload == b'{"state": "online"}' and first["site/a/status"].retain
            assert first["site/b/status"].payload == b"b-new" and first["site/b/status"].qos == 0
            await pub.publish("site/a/status", b"live", qos=1, retain=True)
            live = await next_message(late)
            assert (live.payload, live.retain) == (b"live", False)  # established subscription: retain flag 0
            await pub.publish("site/a/status", b"", qos=1, retain=True)  # clears the retained message
            assert (await next_message(late)).payload == b""
        async with aiomqtt.Client(HOST, broker.port, identifier="later", timeout=3) as later:
            await later.subscribe("site/a/status", qos=1)
            assert await no_message(later)


async def test_wildcards_route_and_dollar_topics_stay_out_of_hash(broker):
    async with aiomqtt.Client(HOST, broker.port, identifier="sub", timeout=3) as sub, \
               aiomqtt.Client(HOST, broker.port, identifier="pub", timeout=3) as pub:
        assert granted(await sub.subscribe("flexedge/+/telemetry", qos=1)) == [1]
        assert granted(await sub.subscribe("fleet/#", qos=1)) == [1]
        for topic in ["flexedge/demo/telemetry", "flexedge/demo/events", "flexedge/a/b/telemetry",
                      "fleet", "fleet/x/y", "$SYS/fleet"]:
            await pub.publish(topic, topic.encode(), qos=1)
        topics = [str((await next_message(sub)).topic) for _ in range(3)]
        assert topics == ["flexedge/demo/telemetry", "fleet", "fleet/x/y"]
        assert await no_message(sub)
    # Overlapping subscriptions deliver one copy, at the highest granted QoS.
    async with aiomqtt.Client(HOST, broker.port, identifier="overlap", timeout=3) as sub, \
               aiomqtt.Client(HOST, broker.port, identifier="pub2", timeout=3) as pub:
        await sub.subscribe("#", qos=0)
        await sub.subscribe("x/+", qos=1)
        await pub.publish("x/y", b"once", qos=1)
        assert (await next_message(sub)).qos == 1
        assert await no_message(sub)


async def test_invalid_filters_get_suback_failure_and_valid_ones_in_the_same_packet_work(broker):
    raw = await RawClient.connected(broker.port, "raw-sub")
    raw.send(subscribe_packet(7, ("bad/#/filter", 1), ("good/+", 2), ("a+", 0)))
    assert await raw.read_packet() == (0x90, b"\x00\x07\x80\x01\x80")
    async with aiomqtt.Client(HOST, broker.port, identifier="pub", timeout=3) as pub:
        await pub.publish("good/x", b"yes", qos=1)
    first_byte, body = await raw.read_packet()
    assert first_byte == 0x32 and body == _s("good/x") + body[8:10] + b"yes"  # QoS 1, with a packet id
    raw.send(_packet(0x40, body[8:10]))  # PUBACK
    raw.close()


# -- last will ---------------------------------------------------------------------


async def test_will_is_published_retained_when_a_paho_client_vanishes(broker):
    async with aiomqtt.Client(HOST, broker.port, identifier="watcher", timeout=3) as watcher:
        await watcher.subscribe("flexedge/demo/status", qos=1)
        gateway = PahoClient(broker.port, "gateway")
        gateway.client.will_set("flexedge/demo/status", b'{"state": "offline"}', qos=1, retain=True)
        assert await gateway.connect() == 0
        gateway.client.loop_stop()
        gateway.client.socket().close()  # no DISCONNECT: the process "died"
        will = await next_message(watcher, timeout_s=3)
        assert (will.payload, will.qos) == (b'{"state": "offline"}', 1)
    async with aiomqtt.Client(HOST, broker.port, identifier="late", timeout=3) as late:
        await late.subscribe("flexedge/demo/status", qos=1)
        assert (await next_message(late)).retain


async def test_no_will_after_clean_disconnect(broker):
    async with aiomqtt.Client(HOST, broker.port, identifier="watcher", timeout=3) as watcher:
        await watcher.subscribe("will/#", qos=1)
        async with aiomqtt.Client(HOST, broker.port, identifier="polite", timeout=3,
                                  will=aiomqtt.Will("will/polite", b"gone", qos=1)):
            pass  # leaves with DISCONNECT
        assert await no_message(watcher, within_s=0.5)


async def test_silent_client_is_dropped_after_one_and_a_half_keepalives_and_its_will_sent(broker):
    async with aiomqtt.Client(HOST, broker.port, identifier="watcher", timeout=3) as watcher:
        await watcher.subscribe("will/#", qos=1)
        silent = await RawClient.connected(broker.port, "silent", keepalive=1, will=("will/silent", b"timeout", 1, False))
        started = time.monotonic()
        will = await next_message(watcher, timeout_s=3)
        elapsed = time.monotonic() - started
        assert will.payload == b"timeout" and 1.3 < elapsed < 2.5
        assert await silent.closed_by_broker()
        assert "silent" not in broker.client_ids


async def test_same_client_id_takes_over_and_the_old_connection_gets_its_will(broker):
    async with aiomqtt.Client(HOST, broker.port, identifier="watcher", timeout=3) as watcher:
        await watcher.subscribe("will/#", qos=1)
        first = await RawClient.connected(broker.port, "dup", will=("will/dup", b"first", 0, False))
        second = await RawClient.connected(broker.port, "dup")
        assert await first.closed_by_broker()
        assert (await next_message(watcher)).payload == b"first"
        second.send(_packet(0xC0))  # PINGREQ: the new connection is alive
        assert await second.read_packet() == (0xD0, b"")
        second.close()


# -- protocol versions -------------------------------------------------------------


async def test_mqtt5_is_refused_with_return_code_1_then_mqtt311_connects(broker):
    raw = await RawClient.open(broker.port)
    raw.send(_packet(0x10, _s("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60) + b"\x00" + _s("v5")))
    assert await raw.read_packet() == (0x20, b"\x00\x01")
    assert await raw.closed_by_broker()

    v5 = PahoClient(broker.port, "paho-v5", protocol=paho.MQTTv5)
    try:
        reason = await v5.connect()
        assert reason.is_failure and str(reason) == "Unsupported protocol version"
    finally:
        v5.stop()
    with pytest.raises(aiomqtt.MqttCodeError, match="protocol version"):
        async with aiomqtt.Client(HOST, broker.port, protocol=aiomqtt.ProtocolVersion.V5, timeout=3):
            pass
    async with aiomqtt.Client(HOST, broker.port, protocol=aiomqtt.ProtocolVersion.V311, timeout=3) as v311:
        assert granted(await v311.subscribe("ok", qos=1)) == [1]
    async with aiomqtt.Client(HOST, broker.port, protocol=aiomqtt.ProtocolVersion.V31, timeout=3) as v31:
        assert granted(await v31.subscribe("ok", qos=1)) == [1]


async def test_empty_client_id_needs_a_clean_session(broker):
    raw = await RawClient.open(broker.port)
    raw.send(_packet(0x10, _s("MQTT") + bytes([4, 0x00]) + struct.pack("!H", 60) + _s("")))
    assert await raw.read_packet() == (0x20, b"\x00\x02")
    assert await raw.closed_by_broker()
    async with aiomqtt.Client(HOST, broker.port, identifier="", timeout=3) as anonymous:
        assert granted(await anonymous.subscribe("x", qos=0)) == [0]


# -- garbage ---------------------------------------------------------------------

CONNECT = connect_packet("garbage")
GARBAGE = {
    "http request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "publish before connect": publish_packet("a", b"x"),
    "unknown protocol name": _packet(0x10, _s("HTTP") + bytes([4, 2, 0, 60]) + _s("x")),
    "reserved connect flag": connect_packet("x", flags_extra=0x01),
    "will qos 3": _packet(0x10, _s("MQTT") + bytes([4, 0x1E, 0, 60]) + _s("x") + _s("w") + _s("m")),
    "truncated connect": _packet(0x10, _s("MQTT") + bytes([4])),
    "remaining length of 5 bytes": b"\x10\xff\xff\xff\xff\x7f",
    "oversized packet": CONNECT + b"\x30\xff\xff\xff\x7f",
    "second connect": CONNECT + CONNECT,
    "reserved type 0": CONNECT + b"\x00\x00",
    "reserved type 15": CONNECT + b"\xf0\x00",
    "publish qos 3": CONNECT + _packet(0x36, _s("a") + b"\x00\x01"),
    "publish to a wildcard": CONNECT + publish_packet("a/+", b"x"),
    "publish with invalid utf-8": CONNECT + publish_packet(b"\xff\xfe", b"x"),
    "publish with packet id 0": CONNECT + publish_packet("a", b"x", qos=1, packet_id=0),
    "subscribe with wrong flags": CONNECT + _packet(0x80, struct.pack("!H", 1) + _s("a") + b"\x00"),
    "subscribe without filters": CONNECT + _packet(0x82, struct.pack("!H", 1)),
    "subscribe qos byte 3": CONNECT + subscribe_packet(1, ("a", 3)),
    "pingreq with a body": CONNECT + _packet(0xC0, b"x"),
    "pubrec (never expected)": CONNECT + _packet(0x50, b"\x00\x01"),
    "connack from a client": CONNECT + _packet(0x20, b"\x00\x00"),
}


@pytest.mark.parametrize("name", GARBAGE)
async def test_garbage_closes_only_the_sender(broker, name):
    async with aiomqtt.Client(HOST, broker.port, identifier="bystander", timeout=3) as bystander:
        await bystander.subscribe("still/here", qos=1)
        raw = await RawClient.open(broker.port)
        raw.send(GARBAGE[name])
        assert await raw.closed_by_broker(), f"broker kept the connection open after {name}"
        await bystander.publish("still/here", b"yes", qos=1)
        assert (await next_message(bystander)).payload == b"yes"


async def test_random_bytes_after_connect_never_take_the_broker_down():
    # A short connect timeout and keepalive, so half-sent packets do not linger.
    async with MqttBroker(HOST, 0, connect_timeout_s=1.0) as broker, \
               aiomqtt.Client(HOST, broker.port, identifier="bystander", timeout=3) as bystander:
        await bystander.subscribe("still/here", qos=1)
        rng = random.Random(20261121)
        clients = []
        for index in range(150):
            raw = await RawClient.open(broker.port)
            raw.send((CONNECT if index % 2 else b"") + rng.randbytes(rng.randint(1, 300)))
            clients.append(raw)
        await asyncio.sleep(0.2)
        for raw in clients:
            raw.close()
        await bystander.publish("still/here", b"yes", qos=1)
        assert (await next_message(bystander)).payload == b"yes"
        await asyncio.sleep(0.1)
        assert broker.client_ids == {"bystander"}


# -- bounded queues ------------------------------------------------------------------


async def test_a_subscriber_that_never_reads_gets_messages_dropped_then_disconnected():
    async with MqttBroker(HOST, 0, max_queued_messages=50, write_timeout_s=1.5) as broker, \
               aiomqtt.Client(HOST, broker.port, identifier="fast", timeout=5) as fast, \
               aiomqtt.Client(HOST, broker.port, identifier="pub", timeout=5) as pub:
        stuck = await RawClient.connected(broker.port, "stuck")
        stuck.send(subscribe_packet(1, ("flood", 0)))
        assert (await stuck.read_packet())[0] == 0x90
        stuck.writer.transport.pause_reading()  # stops reading; the kernel buffers fill up
        await fast.subscribe("flood", qos=1)
        payload = bytes(10_000)
        count = 2_000  # 20 MB: far more than the socket buffers of the stuck client hold
        for _ in range(count):
            await pub.publish("flood", payload, qos=1)
        received = 0
        while received < count:
            await next_message(fast, timeout_s=3)
            received += 1
        assert broker.dropped_messages > 0
        deadline = time.monotonic() + 4
        while "stuck" in broker.client_ids and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert "stuck" not in broker.client_ids, "a client that stopped reading was never disconnected"
        assert "fast" in broker.client_ids
        stuck.close()


# -- command line ------------------------------------------------------------------


def test_command_line_serves_on_the_port_it_prints():
    with subprocess.Popen([sys.executable, "-m", "simulators.broker", "--port", "0"],
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert select.select([proc.stdout], [], [], 5)[0], "the broker printed nothing within 5 s"
            line = proc.stdout.readline()
            assert "listening on 127.0.0.1:" in line, line
            port = int(line.rsplit(":", 1)[1])
            out = subprocess.run(["mosquitto_pub", "-p", str(port), "-t", "cli/test", "-m", "hi", "-r"], timeout=5)
            assert out.returncode == 0
            got = subprocess.run(["mosquitto_sub", "-p", str(port), "-t", "cli/#", "-C", "1", "-W", "3"],
                                 capture_output=True, text=True, timeout=5)
            assert got.stdout.strip() == "hi"
        finally:
            proc.terminate()
            proc.wait(5)
