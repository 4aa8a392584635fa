"""A small asyncio MQTT 3.1.1 broker, embedded so ``flexedge demo`` runs without Mosquitto.

It is meant for the demo and for tests on loopback, not for production: use
Mosquitto there.  What it implements:

* MQTT 3.1.1 (and 3.1, protocol name ``MQIsdp``).  An MQTT 5 client gets CONNACK
  return code 1, "unacceptable protocol version", so that it can fall back.
* QoS 0 and 1 end to end.  A subscription asking for QoS 2 is granted QoS 1; a
  QoS 2 PUBLISH from a client is accepted (PUBREC/PUBREL/PUBCOMP, delivered once)
  and forwarded at QoS 1 at most.
* Retained messages (an empty retained payload deletes the topic's retained
  message), last will, ``+`` and ``#`` wildcards (which do not match topics
  starting with ``$``), PINGREQ, keepalive (a client silent for 1.5 x its
  keepalive is dropped and its will published).
* Clean sessions only.  A client asking for a persistent session is served as if
  it had asked for a clean one (CONNACK "session present" is always 0).  A second
  connection with the same client id takes over: the first is closed, its will
  published.
* Robustness: a malformed or oversized packet closes that client's connection
  only.  Each client has a bounded queue of outgoing messages; when it is full
  (the client reads too slowly) further messages for it are dropped and counted
  in :attr:`MqttBroker.dropped_messages`.  (Retained messages are kept in memory,
  one per topic, without a limit.)  At most ``max_inflight_messages``
  QoS 1 messages wait for PUBACK per client; a client that leaves them unacked,
  or stops reading its socket, for ``write_timeout_s`` is disconnected.

Use::

    async with MqttBroker(host="127.0.0.1", port=0) as broker:
        print(broker.port)          # the port actually bound
        ...                         # clients connect to 127.0.0.1:broker.port

or from the command line (runs until interrupted; prints the bound port)::

    python -m simulators.broker --host 127.0.0.1 --port 1883
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import struct
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Control packet types, MQTT 3.1.1 section 2.2.1.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

PACKET_NAMES = {CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK", PUBREC: "PUBREC",
                PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK",
                UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ", PINGRESP: "PINGRESP",
                DISCONNECT: "DISCONNECT"}

CONNACK_ACCEPTED = 0
CONNACK_UNACCEPTABLE_PROTOCOL_VERSION = 1
CONNACK_IDENTIFIER_REJECTED = 2
SUBACK_FAILURE = 0x80


class ProtocolError(Exception):
    """The peer sent something MQTT 3.1.1 forbids; its connection is closed."""


@dataclass(frozen=True, slots=True)
class Message:
    """An application message as routed by the broker."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


def check_topic_name(topic: str) -> None:
    """Raise ProtocolError unless ``topic`` may be published to (non-empty, no wildcards)."""
    if not topic:
        raise ProtocolError("empty topic name")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ProtocolError(f"topic name {topic!r} contains a wildcard or NUL")


def is_valid_topic_filter(topic_filter: str) -> bool:
    """True if ``topic_filter`` is a legal subscription filter (section 4.7.1)."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True if the (valid) ``topic_filter`` matches the topic name ``topic``."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True  # "a/#" also matches "a" itself
        if index >= len(topic_levels) or (level != "+" and level != topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _packet(packet_type: int, flags: int, body: bytes = b"") -> bytes:
    return bytes([packet_type << 4 | flags]) + _varint(len(body)) + body


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _publish_packet(message: Message, packet_id: int | None) -> bytes:
    flags = message.qos << 1 | int(message.retain)
    body = _string(message.topic) + (struct.pack("!H", packet_id) if message.qos else b"") + message.payload
    return _packet(PUBLISH, flags, body)


class _Body:
    """Cursor over a packet's variable header and payload; truncation is a ProtocolError."""

    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise ProtocolError(f"{self.what} packet truncated at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("!H", self.take(2))[0]

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        try:
            return self.binary().decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"{self.what} packet has a string that is not UTF-8 at byte {self.pos}") from exc

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    @property
    def at_end(self) -> bool:
        return self.pos == len(self.data)


class _Session:
    """One client connection, from CONNECT to close."""

    def __init__(self, broker: MqttBroker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.broker, self.reader, self.writer = broker, reader, writer
        self.peer = writer.get_extra_info("peername")
        self.client_id = ""
        self.keepalive_s = 0
        self.will: Message | None = None
        self.subscriptions: dict[str, int] = {}  # filter -> granted QoS
        self.outbox: asyncio.Queue[Message] = asyncio.Queue(broker.max_queued_messages)
        self.inflight: set[int] = set()  # packet ids of QoS 1 messages awaiting PUBACK
        self.inflight_slots = asyncio.Semaphore(broker.max_inflight_messages)
        self.qos2_received: set[int] = set()  # QoS 2 packet ids between PUBREC and PUBREL
        self.next_packet_id = 0
        self.dropped = 0
        self.accepted = False  # CONNACK 0 sent: only then does the will count
        self.clean_exit = False

    # -- reading ------------------------------------------------------------

    async def read_packet(self, first: bool = False) -> tuple[int, int, bytes]:
        header = (await self.reader.readexactly(1))[0]
        if first and header != CONNECT << 4:
            # Checked before the length, so that e.g. an HTTP request is refused at once.
            raise ProtocolError(f"first packet starts with 0x{header:02x}, not CONNECT")
        length, shift = 0, 0
        for _ in range(4):
            digit = (await self.reader.readexactly(1))[0]
            length |= (digit & 0x7F) << shift
            shift += 7
            if not digit & 0x80:
                break
        else:
            raise ProtocolError("remaining length uses more than 4 bytes")
        if length > self.broker.max_packet_bytes:
            raise ProtocolError(f"packet of {length} bytes exceeds the limit of {self.broker.max_packet_bytes}")
        return header >> 4, header & 0x0F, await self.reader.readexactly(length)

    async def run(self) -> None:
        try:
            async with asyncio.timeout(self.broker.connect_timeout_s):
                _, _, body = await self.read_packet(first=True)
                if not await self.handle_connect(_Body(body, "CONNECT")):
                    return
            self.broker._register(self)
            writer_task = asyncio.create_task(self.write_loop())
            try:
                while True:
                    async with asyncio.timeout(self.keepalive_s * 1.5 or None):
                        packet_type, flags, body = await self.read_packet()
                    if not await self.dispatch(packet_type, flags, body):
                        return
            finally:
                writer_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer_task
        except ProtocolError as exc:
            log.warning("client %r from %s: %s; closing its connection", self.client_id, self.peer, exc)
        except TimeoutError:
            log.info("client %r from %s timed out; closing its connection", self.client_id, self.peer)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            log.info("client %r from %s dropped its connection (%s)", self.client_id, self.peer, type(exc).__name__)
        finally:
            self.close()

    async def handle_connect(self, body: _Body) -> bool:
        protocol, level = body.string(), body.u8()
        if (protocol, level) not in (("MQTT", 4), ("MQIsdp", 3)):
            if protocol not in ("MQTT", "MQIsdp"):
                raise ProtocolError(f"unknown protocol name {protocol!r}")
            await self.send(_packet(CONNACK, 0, bytes([0, CONNACK_UNACCEPTABLE_PROTOCOL_VERSION])))
            log.info("refused %s: protocol level %d (only MQTT 3.1.1 and 3.1 are served)", self.peer, level)
            return False
        flags, self.keepalive_s = body.u8(), body.u16()
        if flags & 0x01:
            raise ProtocolError("CONNECT reserved flag is set")
        clean_session, has_will = bool(flags & 0x02), bool(flags & 0x04)
        will_qos, will_retain = (flags >> 3) & 0x03, bool(flags & 0x20)
        if will_qos == 3 or (not has_will and (will_qos or will_retain)):
            raise ProtocolError(f"CONNECT will flags are inconsistent (flags=0x{flags:02x})")
        self.client_id = body.string()
        if has_will:
            will_topic = body.string()
            check_topic_name(will_topic)
            self.will = Message(will_topic, body.binary(), min(will_qos, 1), will_retain)
        if flags & 0x80:
            body.string()  # user name: this broker is anonymous
        if flags & 0x40:
            body.binary()  # password
        if not body.at_end:
            raise ProtocolError("CONNECT has trailing bytes")
        if not self.client_id:
            if not clean_session:
                await self.send(_packet(CONNACK, 0, bytes([0, CONNACK_IDENTIFIER_REJECTED])))
                return False
            self.client_id = "auto-" + secrets.token_hex(8)
        await self.send(_packet(CONNACK, 0, bytes([0, CONNACK_ACCEPTED])))
        self.accepted = True
        return True

    async def dispatch(self, packet_type: int, flags: int, data: bytes) -> bool:
        """Handle one packet after CONNECT; False when the client said DISCONNECT."""
        name = PACKET_NAMES.get(packet_type, f"reserved packet type {packet_type}")
        expected_flags = 0x02 if packet_type in (PUBREL, SUBSCRIBE, UNSUBSCRIBE) else 0
        if packet_type != PUBLISH and flags != expected_flags:
            raise ProtocolError(f"{name} with reserved flags 0x{flags:x}")
        body = _Body(data, name)
        if packet_type == PUBLISH:
            await self.handle_publish(flags, body)
        elif packet_type == PUBACK:
            packet_id = body.u16()
            if packet_id in self.inflight:
                self.inflight.discard(packet_id)
                self.inflight_slots.release()
        elif packet_type == PUBREL:
            packet_id = body.u16()
            self.qos2_received.discard(packet_id)
            await self.send(_packet(PUBCOMP, 0, struct.pack("!H", packet_id)))
        elif packet_type == SUBSCRIBE:
            await self.handle_subscribe(body)
        elif packet_type == UNSUBSCRIBE:
            packet_id = body.u16()
            while not body.at_end:
                self.subscriptions.pop(body.string(), None)
            await self.send(_packet(UNSUBACK, 0, struct.pack("!H", packet_id)))
        elif packet_type == PINGREQ:
            await self.send(_packet(PINGRESP, 0))
        elif packet_type == DISCONNECT:
            self.clean_exit = True
            return False
        else:  # CONNECT again, PUBREC/PUBCOMP (we never send QoS 2), server-only or reserved types
            raise ProtocolError(f"unexpected {name}")
        if packet_type not in (PUBLISH, SUBSCRIBE, UNSUBSCRIBE) and not body.at_end:
            raise ProtocolError(f"{name} has trailing bytes")
        return True

    async def handle_publish(self, flags: int, body: _Body) -> None:
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        topic = body.string()
        check_topic_name(topic)
        packet_id = body.u16() if qos else None
        if packet_id == 0:
            raise ProtocolError("PUBLISH with packet id 0")
        message = Message(topic, body.rest(), min(qos, 1), retain)
        if qos == 2:
            if packet_id not in self.qos2_received:  # a resend before PUBREL is not delivered twice
                self.qos2_received.add(packet_id)
                self.broker.publish(message.topic, message.payload, message.qos, message.retain)
            await self.send(_packet(PUBREC, 0, struct.pack("!H", packet_id)))
            return
        self.broker.publish(message.topic, message.payload, message.qos, message.retain)
        if qos == 1:
            await self.send(_packet(PUBACK, 0, struct.pack("!H", packet_id)))

    async def handle_subscribe(self, body: _Body) -> None:
        packet_id = body.u16()
        granted: list[tuple[str, int]] = []
        while not body.at_end:
            topic_filter, requested = body.string(), body.u8()
            if requested > 2:
                raise ProtocolError(f"SUBSCRIBE requested QoS byte 0x{requested:02x}")
            granted.append((topic_filter, min(requested, 1) if is_valid_topic_filter(topic_filter) else SUBACK_FAILURE))
        if not granted:
            raise ProtocolError("SUBSCRIBE without any topic filter")
        for topic_filter, qos in granted:
            if qos != SUBACK_FAILURE:
                self.subscriptions[topic_filter] = qos
        await self.send(_packet(SUBACK, 0, struct.pack("!H", packet_id) + bytes(q for _, q in granted)))
        for topic_filter, qos in granted:
            if qos == SUBACK_FAILURE:
                continue
            for retained in list(self.broker._retained.values()):
                if topic_matches(topic_filter, retained.topic):
                    self.deliver(Message(retained.topic, retained.payload, min(qos, retained.qos), True))

    # -- writing ------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Write a control packet now; a client that stops reading is timed out."""
        self.writer.write(data)
        async with asyncio.timeout(self.broker.write_timeout_s):
            await self.writer.drain()

    def granted_qos(self, topic: str) -> int | None:
        """Highest QoS among this client's subscriptions matching ``topic``, None if none matches."""
        matches = [qos for topic_filter, qos in self.subscriptions.items() if topic_matches(topic_filter, topic)]
        return max(matches) if matches else None

    def deliver(self, message: Message) -> None:
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            self.broker.dropped_messages += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("client %r reads too slowly: %d message(s) dropped", self.client_id, self.dropped)

    def allocate_packet_id(self) -> int:
        while True:
            self.next_packet_id = self.next_packet_id % 65535 + 1
            if self.next_packet_id not in self.inflight:
                return self.next_packet_id

    async def write_loop(self) -> None:
        try:
            while True:
                message = await self.outbox.get()
                packet_id = None
                if message.qos:
                    async with asyncio.timeout(self.broker.write_timeout_s):
                        await self.inflight_slots.acquire()
                    packet_id = self.allocate_packet_id()
                    self.inflight.add(packet_id)
                await self.send(_publish_packet(message, packet_id))
        except (TimeoutError, ConnectionError) as exc:
            log.warning("client %r stopped reading or acknowledging (%s); closing", self.client_id, type(exc).__name__)
            self.writer.transport.abort()  # the read loop then ends and closes the session

    def close(self) -> None:
        self.broker._unregister(self)
        if self.clean_exit:
            self.writer.close()
        else:
            self.writer.transport.abort()
        if self.accepted and self.will is not None and not self.clean_exit and not self.broker.closing:
            self.broker.publish(self.will.topic, self.will.payload, self.will.qos, self.will.retain)


class MqttBroker:
    """An MQTT 3.1.1 broker serving on ``host``:``port`` (0 picks a free port).

    Use as ``async with MqttBroker(...) as broker`` or call :meth:`start` and
    :meth:`stop`.  Limits: ``max_queued_messages`` outgoing messages per client,
    ``max_inflight_messages`` unacknowledged QoS 1 messages per client,
    ``max_packet_bytes`` per incoming packet (remaining length),
    ``connect_timeout_s`` for the CONNECT packet after the TCP connection opens,
    ``write_timeout_s`` for a client to take written data or acknowledge.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        max_queued_messages: int = 1000,
        max_inflight_messages: int = 100,
        max_packet_bytes: int = 1 << 20,
        connect_timeout_s: float = 10.0,
        write_timeout_s: float = 30.0,
    ):
        for name, value in (("max_queued_messages", max_queued_messages), ("max_inflight_messages", max_inflight_messages),
                            ("max_packet_bytes", max_packet_bytes)):
            if value < 1:
                raise ValueError(f"MqttBroker {name} must be at least 1, got {value}")
        if not 0 < max_inflight_messages < 65535:
            raise ValueError(f"MqttBroker max_inflight_messages must be below 65535, got {max_inflight_messages}")
        for name, value in (("connect_timeout_s", connect_timeout_s), ("write_timeout_s", write_timeout_s)):
            if not 0 < value < float("inf"):
                raise ValueError(f"MqttBroker {name} must be a positive finite number of seconds, got {value}")
        self.host = host
        self._requested_port = port
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.max_packet_bytes = max_packet_bytes
        self.connect_timeout_s = connect_timeout_s
        self.write_timeout_s = write_timeout_s
        self.dropped_messages = 0  # total, over all clients: outgoing queue full
        self.closing = False
        self._server: asyncio.Server | None = None
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, Message] = {}
        self._connection_tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        """The TCP port the broker listens on (the one chosen by the OS if 0 was asked)."""
        if self._server is None:
            raise RuntimeError("MqttBroker is not started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def client_ids(self) -> frozenset[str]:
        """Ids of the clients connected now."""
        return frozenset(self._sessions)

    async def start(self) -> None:
        """Bind and start accepting connections; returns once listening."""
        self.closing = False
        self._server = await asyncio.start_server(self._handle_connection, self.host, self._requested_port)
        log.info("MQTT broker listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening and close every client connection (no wills are published)."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._connection_tasks):
            task.cancel()
        if self._connection_tasks:
            await asyncio.wait(self._connection_tasks, timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None

    async def serve_forever(self) -> None:
        """Start if needed and serve until cancelled."""
        if self._server is None:
            await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.stop()

    async def __aenter__(self) -> MqttBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Route a message as if a client had published it (raises ProtocolError for a bad topic).

        QoS 2 is downgraded to 1, as for clients.
        """
        check_topic_name(topic)
        if qos not in (0, 1, 2):
            raise ValueError(f"MQTT QoS must be 0, 1 or 2, got {qos!r}")
        qos = min(qos, 1)
        if retain:
            if payload:
                self._retained[topic] = Message(topic, payload, qos, True)
            else:
                self._retained.pop(topic, None)
        for session in list(self._sessions.values()):
            granted = session.granted_qos(topic)
            if granted is not None:
                session.deliver(Message(topic, payload, min(qos, granted), False))

    def _register(self, session: _Session) -> None:
        previous = self._sessions.get(session.client_id)
        if previous is not None:
            log.info("client id %r connected again from %s; closing its older connection", session.client_id, session.peer)
            previous.writer.transport.abort()
        self._sessions[session.client_id] = session

    def _unregister(self, session: _Session) -> None:
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connection_tasks.add(task)
        try:
            await _Session(self, reader, writer).run()
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._connection_tasks.discard(task)


async def _serve(host: str, port: int, max_queued_messages: int) -> None:
    async with MqttBroker(host, port, max_queued_messages=max_queued_messages) as broker:
        print(f"flexedge embedded MQTT broker listening on {host}:{broker.port}", flush=True)
        await asyncio.Future()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.broker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port, 0 for any free one (default 1883)")
    parser.add_argument("--max-queued-messages", type=int, default=1000, help="outgoing queue bound per client")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(args.host, args.port, args.max_queued_messages))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
