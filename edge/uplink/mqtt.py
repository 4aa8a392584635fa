"""MQTT uplink to the VPP: store-and-forward telemetry, events and aggregates, setpoints in, status retained.

Topics are ``<prefix>/<site id>/<subtopic>`` (see docs/mqtt-api.md).  The uplink

* connects with paho-mqtt (through aiomqtt) to ``uplink.mqtt``: TLS when ``tls`` is
  set (mutual TLS with ``cert_file``/``key_file``), username and password
  (:meth:`edge.config.profile.Mqtt.password`, read at every connect and never logged),
  MQTT 5 when the broker offers it: ``protocol: auto`` tries 5 and, when the broker
  answers CONNACK "unsupported protocol version", uses 3.1.1 from then on;
  ``"5"`` and ``"3.1.1"`` force a version.  Clean session: setpoints published
  while the gateway was away are not replayed (they would be stale anyway);
* sets a retained last will ``status`` = ``{"state": "offline", "site_id": ...,
  "reason": "connection lost"}`` and publishes the birth message (retained, QoS 1,
  ``ts`` refreshed) after every connect, then subscribes to ``setpoint`` (QoS 1);
* reconnects forever: the first retry after 0.25-0.5 s, then twice as long each time up
  to a cap of 5 s, each delay drawn between half and all of its ceiling (equal jitter,
  edge/runtime/backoff.py), so the site is back within a few seconds of its broker and a fleet
  of gateways does not come back in step.  A connection closed before CONNACK (a broker
  refusing the client certificate) fails at once rather than at the CONNACK timeout;
  each distinct failure is logged once per outage, a refusal that retrying will not cure
  (credentials, TLS, a bad password or TLS file) as an error saying what to check;
* spools every message of the ``SPOOLED_STREAMS`` (telemetry, events, the 1-min
  consumption and 15-min validation aggregates; :class:`edge.uplink.spool.Spool`, through
  :func:`asyncio.to_thread`) *before* sending it and deletes it only after the
  broker's PUBACK.  Messages spooled while connected go out at once ("live");
  what was spooled while offline (the backlog) is sent oldest first at
  ``uplink.spool.backlog_msgs_per_s`` beside the live traffic, with at most a few
  backlog messages awaiting PUBACK so that live messages never queue behind it.
  Consumers order by ``seq``.  Delivery is at-least-once: a message whose PUBACK
  was lost in a disconnect or a crash is sent again.

Public API::

    Uplink(profile, spool, on_setpoint, birth, emit_event=None, *, backoff_initial_s=0.5,
           backoff_max_s=5.0, connect_timeout_s=10.0, ack_timeout_s=20.0,
           backlog_inflight=8, overflow_event_interval_s=60.0, refusal_retry_s=30.0)
    await uplink.run()                    # until cancelled or closed; never raises for network trouble
    seq = await uplink.publish(stream, payload)   # stream in SPOOLED_STREAMS; spool, then send
    uplink.publish_live(subtopic, payload) # QoS 1, not spooled, dropped while offline (setpoint/ack)
    uplink.set_birth(birth)               # a new birth (profile reload): published now if connected, and on connect
    await uplink.close(timeout_s=2.5)     # flush, retained {"state": "offline", "reason": "shutdown"}, DISCONNECT
    uplink.connected -> bool ; uplink.protocol -> "5" | "3.1.1" | None ; uplink.topic(subtopic) -> str
    uplink.stats -> UplinkStats(sent, backlog_pending, dropped, live_dropped, reconnects, connected, protocol)

``on_setpoint(payload: bytes)`` runs on the event loop for every message on the
setpoint topic; an exception in it is logged and the message is dropped.
``on_message`` adds handlers for other inbound subtopics (``{"schedule": ...}``),
subscribed with QoS 1 and handled the same way.
``birth`` is the status payload to publish on connect, e.g. ``{"state": "online",
"version": ..., "site_id": ..., "assets": [...]}``.  When a spool overflow drops
messages, ``emit_event("spool_overflow", None, {"dropped": n, "dropped_total": N,
"max_bytes": M})`` is called (at most once per ``overflow_event_interval_s``,
counts accumulated); without ``emit_event`` the uplink publishes that event itself,
and so it does in :meth:`close` for drops not yet reported.

Cancelling :meth:`run` while connected publishes the shutdown status too, so the
retained status is right whichever way the daemon stops.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import aiomqtt
from aiomqtt import ProtocolVersion
from aiomqtt.exceptions import MqttConnectError

from edge.asset import EventSink
from edge.runtime.backoff import Backoff
from edge.config.preflight import FileProblem, FileProblemError, tls_context
from edge.config.profile import Mqtt, Profile
from edge.uplink.spool import Spool, SpooledMessage, encode_payload, encode_payload_checked

__all__ = ["Uplink", "UplinkStats", "SPOOLED_STREAMS", "utc_timestamp"]

LOG = logging.getLogger("flexedge.uplink")

# each has its own topic and its own persisted seq counter in the spool
SPOOLED_STREAMS = ("telemetry", "events", "consumption", "validation")
_UNSUPPORTED_PROTOCOL_CODES = (1, 0x84)  # 3.1.1 "unacceptable protocol version", 5 "unsupported protocol version"
_BACKLOG_BATCH = 100
_BACKLOG_RESCAN_S = 2.0  # safety net: also look for unsent rows this often while idle
_STABLE_CONNECTION_S = 10.0  # a connection that lasted this long resets the backoff
REFUSAL_RETRY_S = 30.0  # a refused connection is tried again after 15-30 s
_MAX_FAILURES_REMEMBERED = 32  # distinct failure texts kept for logging each once
# CONNACK refusals that retrying will not cure: 3.1.1 codes 2, 4, 5; MQTT 5 reason codes
_REFUSALS = {
    2: "client identifier rejected: check uplink.mqtt.client_id",
    4: "check uplink.mqtt.username and the password",
    5: "check uplink.mqtt.username, the password and what the broker allows them",
    0x85: "client identifier rejected: check uplink.mqtt.client_id",
    0x86: "check uplink.mqtt.username and the password",
    0x87: "check uplink.mqtt.username, the password and what the broker allows them",
    0x8A: "the broker has banned this client",
    0x8C: "the broker wants another authentication method",
}
_PAHO_MAX_INFLIGHT = 20  # Mosquitto's default receive maximum
_SHUTDOWN_STEP_S = 1.5  # each of: shutdown status PUBACK, DISCONNECT, when run() is cancelled


def utc_timestamp(when: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds and a Z, as every flexedge message carries."""
    moment = datetime.fromtimestamp(time.time() if when is None else when, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class UplinkStats:
    sent: int  # spooled messages acknowledged by the broker since start
    backlog_pending: int  # messages in the spool not yet acknowledged
    dropped: int  # messages the full spool dropped (persisted total)
    live_dropped: int  # publish_live() messages dropped while offline
    reconnects: int  # connections established after the first
    connected: bool
    protocol: str | None  # "5" or "3.1.1" of the current or last connection


class _Session:
    """State of one broker connection; discarded when it ends."""

    def __init__(self, client: aiomqtt.Client):
        self.client = client
        self.live: asyncio.Queue[SpooledMessage] = asyncio.Queue()
        self.in_flight: set[int] = set()  # spool ids published on this connection, PUBACK awaited


class Uplink:
    def __init__(
        self,
        profile: Profile,
        spool: Spool,
        on_setpoint: Callable[[bytes], None],
        birth: dict[str, Any],
        emit_event: EventSink | None = None,
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        ack_timeout_s: float = 20.0,
        backlog_inflight: int = 8,
        overflow_event_interval_s: float = 60.0,
        on_message: dict[str, Callable[[bytes], None]] | None = None,
        on_repaired: Callable[[], None] | None = None,
        refusal_retry_s: float = REFUSAL_RETRY_S,
    ):
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError(f"need 0 < backoff_initial_s <= backoff_max_s, got {backoff_initial_s}, {backoff_max_s}")
        if not 1 <= backlog_inflight < _PAHO_MAX_INFLIGHT:
            raise ValueError(f"backlog_inflight must be 1..{_PAHO_MAX_INFLIGHT - 1}, got {backlog_inflight}")
        self._mqtt: Mqtt = profile.uplink.mqtt
        self._site_id = profile.site.id
        self._client_id = profile.client_id
        self._backlog_interval_s = 1.0 / profile.uplink.spool.backlog_msgs_per_s
        self._spool = spool
        self._on_setpoint = on_setpoint
        # subtopic -> handler: the setpoint and the other inbound topics (schedule ...)
        self._handlers: dict[str, Callable[[bytes], None]] = {"setpoint": on_setpoint, **(on_message or {})}
        self._birth = dict(birth)
        self._emit_event = emit_event
        self._on_repaired = on_repaired
        self._refusal_retry_s = refusal_retry_s
        self.messages_repaired = 0  # messages we built that had to be repaired to encode (encode_payload_checked)
        # equal jitter: gateways cut off by the same outage must not all come back in the same instant
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._failures_logged: set[str] = set()  # failure texts logged since the last connection
        self._connect_timeout_s = connect_timeout_s
        self._ack_timeout_s = ack_timeout_s
        self._backlog_inflight = backlog_inflight
        self._overflow_interval_s = overflow_event_interval_s

        self._session: _Session | None = None
        self._acked: set[int] = set()  # acknowledged, not yet removed from the spool
        self._acked_added = asyncio.Event()
        self._backlog_wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()  # fire-and-forget work, kept referenced
        self._run_task: asyncio.Task | None = None
        self._closing = False
        self._offline_sent = False
        self._fallback_to_311 = False
        self.protocol: str | None = None
        self._sent = 0
        self._live_dropped = 0
        self._connections = 0
        self._connected_at = float("-inf")
        self._overflow_unreported = 0
        self._overflow_reported_at = float("-inf")
        self._overflow_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ public

    @property
    def connected(self) -> bool:
        return self._session is not None

    def topic(self, subtopic: str) -> str:
        return f"{self._mqtt.topic_prefix}/{self._site_id}/{subtopic}"

    @property
    def stats(self) -> UplinkStats:
        return UplinkStats(
            sent=self._sent,
            backlog_pending=self._spool.pending,
            dropped=self._spool.dropped_total,
            live_dropped=self._live_dropped,
            reconnects=max(0, self._connections - 1),
            connected=self.connected,
            protocol=self.protocol,
        )

    async def publish(self, stream: str, payload: dict[str, Any]) -> int:
        """Spool ``payload`` on ``stream`` (assigning its ``seq``), send it if connected; return the seq."""
        if stream not in SPOOLED_STREAMS:
            raise ValueError(f"publish(): stream must be one of {', '.join(SPOOLED_STREAMS)}, got {stream!r}")
        result = await asyncio.to_thread(self._spool.append_message, self.topic(stream), payload, stream)
        if result.encoding_problem:
            self._repaired(stream, result.seq, result.encoding_problem, payload)
        if result.dropped:
            self._note_overflow(result.dropped)
        if self._session is not None:
            self._session.live.put_nowait(result.message)
        else:
            self._backlog_wakeup.set()
        assert result.seq is not None
        return result.seq

    def publish_live(self, subtopic: str, payload: dict[str, Any]) -> None:
        """Send at once with QoS 1, without spooling; dropped (and counted) while offline."""
        topic = self.topic(subtopic)
        body, problem = encode_payload_checked(topic, payload)
        if problem:
            self._repaired(subtopic, None, problem, payload)
        session = self._session
        if session is None:
            self._live_dropped += 1
            LOG.info("uplink offline: dropped live message on %s", topic)
            return
        self._spawn(self._publish_live(session.client, topic, body))

    def set_birth(self, birth: dict[str, Any]) -> None:
        """A new birth message (a profile reload): published now on the connection in place, if any, and
        after every later connect.  Not spooled: the retained status is only ever the newest."""
        self._birth = dict(birth)
        session = self._session
        if session is not None:
            self._spawn(self._publish_live(session.client, self.topic("status"),
                                           encode_payload("birth", {**self._birth, "ts": utc_timestamp()}), retain=True))

    def _repaired(self, stream: str, seq: int | None, problem: str, payload: dict[str, Any]) -> None:
        """A message we built had to be repaired to encode: it went out all the same; count and report it."""
        self.messages_repaired += 1
        if self._on_repaired is not None:
            self._on_repaired()
        LOG.warning("%s message %s repaired to encode: %s", stream, seq if seq is not None else "", problem)
        if self._emit_event is not None and not (stream == "events" and payload.get("type") == "message_repaired"):
            self._emit_event("message_repaired", None, {"stream": stream, "seq": seq, "problem": problem})

    async def run(self) -> None:
        """Connect, serve, reconnect; until cancelled or :meth:`close` is called."""
        if self._run_task is not None and not self._run_task.done():
            raise RuntimeError("Uplink.run() is already running")
        self._run_task = asyncio.current_task()
        remover = asyncio.create_task(self._remove_acknowledged())
        try:
            while not self._closing:
                protocol = self._protocol_to_try()
                connections_before = self._connections
                try:
                    await self._connect_and_serve(protocol)
                    error: BaseException | None = None
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 -- every failure means: reconnect
                    error = exc
                if self._closing:
                    break
                if isinstance(error, MqttConnectError) and self._should_fall_back(error, protocol):
                    continue  # at once, without backoff
                was_connected = self._connections > connections_before
                if was_connected and time.monotonic() - self._connected_at >= _STABLE_CONNECTION_S:
                    self._backoff.reset()
                delay_s = self._backoff.next_delay()
                if _refusal_hint(error) is not None:
                    # A refusal (credentials, certificate, a bad file) will not cure itself in seconds:
                    # a fleet with a rotated password must not hammer its broker with TLS handshakes.
                    delay_s = max(delay_s, self._refusal_retry_s * (0.5 + random.random() / 2))
                self._log_failure(error, was_connected, delay_s)
                await asyncio.sleep(delay_s)
        except asyncio.CancelledError:
            if not self._closing:
                raise
            asyncio.current_task().uncancel()  # close() stopped us: a normal end
        finally:
            remover.cancel()
            await asyncio.gather(remover, return_exceptions=True)
            await self._flush_acknowledged()

    async def close(self, timeout_s: float = 2.5) -> None:
        """Send what is in flight, publish the retained shutdown status, disconnect cleanly, stop :meth:`run`.

        Spends at most about ``timeout_s`` waiting for outstanding PUBACKs and the
        status's own; anything not acknowledged by then stays in the spool for the
        next start.  :meth:`run` ends normally.  Call it *before* cancelling the
        task running :meth:`run`: cancelling first also publishes the shutdown
        status, but drops the PUBACKs in flight (those messages are sent again
        after the restart).  The spool is not closed; its owner does that.
        """
        if self._closing:
            return
        self._closing = True  # also stops the backlog from starting new sends
        try:
            await self._report_overflow_at_close()  # before the settling: it goes out live if connected
            session = self._session
            if session is not None:
                await self._settle(session, timeout_s * 0.6)
                await self._publish_offline(session.client, max(0.5, timeout_s * 0.4))
        finally:
            task = self._run_task
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            for pending in list(self._tasks):
                pending.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._overflow_timer is not None:
                self._overflow_timer.cancel()
            await self._flush_acknowledged()

    async def _settle(self, session: _Session, timeout_s: float) -> None:
        """Until live messages are out and in-flight ones acknowledged (or the time is up)."""
        deadline = time.monotonic() + timeout_s
        while (not session.live.empty() or session.in_flight) and self._session is session:
            if time.monotonic() > deadline:
                LOG.warning("closing with %d messages unacknowledged; they stay spooled", len(session.in_flight))
                return
            await asyncio.sleep(0.01)  # shutdown only: a poll is simpler than a condition on every PUBACK

    # ------------------------------------------------------- connection

    def _protocol_to_try(self) -> ProtocolVersion:
        if self._mqtt.protocol == "5" or (self._mqtt.protocol == "auto" and not self._fallback_to_311):
            return ProtocolVersion.V5
        return ProtocolVersion.V311

    def _should_fall_back(self, error: MqttConnectError, protocol: ProtocolVersion) -> bool:
        code = getattr(error.rc, "value", error.rc)
        if self._mqtt.protocol != "auto" or protocol != ProtocolVersion.V5 or code not in _UNSUPPORTED_PROTOCOL_CODES:
            return False
        LOG.warning("broker %s:%d refused MQTT 5; using MQTT 3.1.1", self._mqtt.host, self._mqtt.port)
        self._fallback_to_311 = True
        return True

    def _log_failure(self, error: BaseException | None, was_connected: bool, delay_s: float) -> None:
        """Each distinct failure once per outage: at a retry every few seconds, repeats would drown the log."""
        text = _describe(error)
        if was_connected or len(self._failures_logged) >= _MAX_FAILURES_REMEMBERED:
            self._failures_logged.clear()
        where = f"uplink to {self._mqtt.host}:{self._mqtt.port}"
        if text in self._failures_logged:
            LOG.debug("%s: %s (again); reconnecting in %.1f s", where, text, delay_s)
            return
        self._failures_logged.add(text)
        hint = _refusal_hint(error)
        if hint is None:
            LOG.warning("%s: %s; reconnecting in %.1f s", where, text, delay_s)
        else:
            # It will not fix itself, but the broker or the files may be put right: keep trying, quietly.
            LOG.error("%s: %s (%s); retrying every %g s at most, logged again only if it changes",
                      where, text, hint, self._refusal_retry_s)

    def _credentials_and_tls(self) -> tuple[str | None, ssl.SSLContext | None]:
        """Blocking (reads files): run in a thread.  A missing or bad credential raises FileProblemError."""
        cfg = self._mqtt
        password = cfg.password()
        if cfg.password_env is not None and password is None:
            raise FileProblemError(FileProblem("uplink.mqtt.password_env", "environment variable", cfg.password_env,
                                               "is not set"))
        return password, (_tls_context(cfg) if cfg.tls is not None else None)

    def _will(self) -> aiomqtt.Will:
        body = encode_payload("will", {"state": "offline", "site_id": self._site_id, "reason": "connection lost"})
        return aiomqtt.Will(self.topic("status"), body, qos=1, retain=True)

    async def _connect_and_serve(self, protocol: ProtocolVersion) -> None:
        password, tls_context = await asyncio.to_thread(self._credentials_and_tls)
        paho_log = _PahoLog(LOG.getChild("paho"))
        client = aiomqtt.Client(
            self._mqtt.host,
            self._mqtt.port,
            username=self._mqtt.username,
            password=password,
            identifier=self._client_id,
            protocol=protocol,
            will=self._will(),
            clean_session=True if protocol != ProtocolVersion.V5 else None,
            keepalive=self._mqtt.keepalive_s,
            timeout=self._connect_timeout_s,
            tls_context=tls_context,
            max_inflight_messages=_PAHO_MAX_INFLIGHT,
            logger=paho_log,
        )
        # aiomqtt's connect timeout covers CONNACK; the TCP/TLS part is paho's own 5 s
        # socket timeout.  The outer bound makes sure nothing here can hang.
        try:
            async with asyncio.timeout(self._connect_timeout_s + 10):
                await _connect(client, paho_log)
        except aiomqtt.MqttError as exc:
            if str(exc) == "Operation timed out":  # aiomqtt's words for "no CONNACK"
                cause = f" ({paho_log.last_error})" if paho_log.last_error else ""
                raise ConnectionError(f"no CONNACK within {self._connect_timeout_s:g} s{cause}") from None
            raise
        paho_log.connected = True
        try:
            self.protocol = "5" if protocol == ProtocolVersion.V5 else "3.1.1"
            self._connections += 1
            self._connected_at = time.monotonic()
            self._offline_sent = False
            birth = encode_payload("birth", {**self._birth, "ts": utc_timestamp()})
            await client.publish(self.topic("status"), birth, qos=1, retain=True, timeout=self._ack_timeout_s)
            for subtopic in self._handlers:
                granted = await client.subscribe(self.topic(subtopic), qos=1, timeout=self._ack_timeout_s)
                if any(getattr(code, "value", code) >= 0x80 for code in granted):
                    # Reconnecting would not change the broker's mind (an ACL); keep sending telemetry.
                    LOG.error("broker refused the subscription to %s: those messages will not arrive", self.topic(subtopic))
            LOG.info(
                "uplink connected to %s:%d as %s (MQTT %s%s)",
                self._mqtt.host, self._mqtt.port, self._client_id, self.protocol, ", TLS" if tls_context else "",
            )
            session = _Session(client)
            self._session = session
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._receive_setpoints(client))
                    group.create_task(self._send_live(session, group))
                    group.create_task(self._send_backlog(session, group))
            finally:
                self._session = None
        except asyncio.CancelledError:
            if not self._closing and not self._offline_sent:
                await self._publish_offline(client, _SHUTDOWN_STEP_S)
            await _exit_quietly(client)
            raise
        except BaseException:
            await _exit_quietly(client)
            raise
        await _exit_quietly(client)

    async def _publish_offline(self, client: aiomqtt.Client, timeout_s: float) -> None:
        body = encode_payload("status", {"state": "offline", "site_id": self._site_id, "reason": "shutdown", "ts": utc_timestamp()})
        try:
            await client.publish(self.topic("status"), body, qos=1, retain=True, timeout=timeout_s)
            self._offline_sent = True
        except Exception as exc:  # noqa: BLE001 -- shutting down: the last will covers us
            LOG.warning("could not publish the shutdown status: %s", _describe(exc))

    # ---------------------------------------------------------- traffic

    async def _receive_setpoints(self, client: aiomqtt.Client) -> None:
        handlers = {self.topic(subtopic): handler for subtopic, handler in self._handlers.items()}
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, (bytes, bytearray)):
                payload = b"" if payload is None else str(payload).encode()
            handler = handlers.get(message.topic.value)
            if handler is None:
                continue
            try:
                handler(bytes(payload))
            except Exception:  # noqa: BLE001 -- one bad handler call must not drop the link
                LOG.exception("handler failed for a message on %s", message.topic)

    def _taken(self, session: _Session, message_id: int) -> bool:
        return message_id in session.in_flight or message_id in self._acked

    async def _send_live(self, session: _Session, group: asyncio.TaskGroup) -> None:
        while True:
            message = await session.live.get()
            if not self._taken(session, message.id):
                session.in_flight.add(message.id)
                group.create_task(self._send(session, message, None))

    async def _send_backlog(self, session: _Session, group: asyncio.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        window = asyncio.Semaphore(self._backlog_inflight)
        cursor = 0
        next_send_at = loop.time()
        while True:
            self._backlog_wakeup.clear()
            batch = await asyncio.to_thread(self._spool.oldest, _BACKLOG_BATCH, cursor)
            if not batch:
                try:
                    await asyncio.wait_for(self._backlog_wakeup.wait(), _BACKLOG_RESCAN_S)
                except TimeoutError:
                    pass
                continue
            for message in batch:
                cursor = message.id
                if self._taken(session, message.id):
                    continue
                delay_s = next_send_at - loop.time()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                await window.acquire()
                if self._closing:
                    window.release()
                    return
                if self._taken(session, message.id):  # went out live while we waited
                    window.release()
                    continue
                next_send_at = max(next_send_at, loop.time()) + self._backlog_interval_s
                session.in_flight.add(message.id)
                group.create_task(self._send(session, message, window))

    async def _send(self, session: _Session, message: SpooledMessage, window: asyncio.Semaphore | None) -> None:
        try:
            await session.client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain, timeout=self._ack_timeout_s
            )
        finally:
            if window is not None:
                window.release()
        # only a PUBACK gets here; a failure propagates and ends the connection,
        # leaving the message in the spool for the next one
        session.in_flight.discard(message.id)
        self._acked.add(message.id)
        self._acked_added.set()
        self._sent += 1

    async def _publish_live(self, client: aiomqtt.Client, topic: str, body: bytes, retain: bool = False) -> None:
        try:
            await client.publish(topic, body, qos=1, retain=retain, timeout=self._ack_timeout_s)
        except Exception as exc:  # noqa: BLE001 -- live messages are best effort by contract
            self._live_dropped += 1
            LOG.warning("live message on %s not acknowledged: %s", topic, _describe(exc))

    async def _remove_acknowledged(self) -> None:
        while True:
            await self._acked_added.wait()
            self._acked_added.clear()
            if not await self._flush_acknowledged():
                await asyncio.sleep(1.0)  # the spool is failing (disk?): retry, do not spin
                self._acked_added.set()

    async def _flush_acknowledged(self) -> bool:
        # Batches build up by themselves while a removal is running.
        batch = list(self._acked)
        if not batch:
            return True
        try:
            await asyncio.to_thread(self._spool.remove, batch)
        except Exception as exc:  # noqa: BLE001 -- keep the ids; they are skipped until removed
            LOG.error("spool: cannot remove %d acknowledged messages: %s", len(batch), exc)
            return False
        self._acked.difference_update(batch)
        return True

    # --------------------------------------------------------- overflow

    def _note_overflow(self, dropped: int) -> None:
        self._overflow_unreported += dropped
        now = time.monotonic()
        due = self._overflow_reported_at + self._overflow_interval_s
        if now >= due:
            self._report_overflow()
        elif self._overflow_timer is None:
            self._overflow_timer = asyncio.get_running_loop().call_later(due - now, self._report_overflow)

    def _report_overflow(self) -> None:
        detail = self._take_overflow_report()
        if detail is None:
            return
        if self._emit_event is not None:
            self._emit_event("spool_overflow", None, detail)
        else:
            self._spawn(self.publish("events", self._overflow_event(detail)))

    def _take_overflow_report(self) -> dict[str, Any] | None:
        if self._overflow_timer is not None:
            self._overflow_timer.cancel()
        self._overflow_timer = None
        dropped, self._overflow_unreported = self._overflow_unreported, 0
        if not dropped:
            return None
        self._overflow_reported_at = time.monotonic()
        LOG.warning("spool full (%d bytes): dropped the %d oldest messages", self._spool.max_bytes, dropped)
        return {"dropped": dropped, "dropped_total": self._spool.dropped_total, "max_bytes": self._spool.max_bytes}

    def _overflow_event(self, detail: dict[str, Any]) -> dict[str, Any]:
        return {"ts": utc_timestamp(), "site_id": self._site_id, "type": "spool_overflow", "asset_id": None, "detail": detail}

    async def _report_overflow_at_close(self) -> None:
        """Drops the rate limit holds back would be reported by a timer that close() cancels: report them now.

        Spooled here rather than handed to ``emit_event``: the owner has flushed its
        outbox before close(), so an event given to it now would be lost.
        """
        detail = self._take_overflow_report()
        if detail is None:
            return
        try:
            await self.publish("events", self._overflow_event(detail))
        except Exception as exc:  # noqa: BLE001 -- shutting down: say so, and go on closing
            LOG.error("could not spool the spool_overflow event at shutdown: %s", exc)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _tls_context(cfg: Mqtt) -> ssl.SSLContext:
    assert cfg.tls is not None
    return tls_context(cfg.tls)  # the checks `flexedge check` makes, with the same words


class _PahoLog(logging.LoggerAdapter):
    """paho's log for one connection.  Before CONNACK, paho's errors are the only record of why
    the socket closed: the uplink reports them in its own message, so here they go to debug."""

    def __init__(self, logger: logging.Logger):
        super().__init__(logger, {})
        self.connected = False
        self.last_error: str | None = None

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR and not self.connected:
            try:
                self.last_error = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                self.last_error = str(msg)
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)


async def _connect(client: aiomqtt.Client, paho_log: _PahoLog) -> None:
    """``client.__aenter__()``, except that a connection closed before CONNACK fails at once.

    aiomqtt waits for the CONNACK until its timeout even when the socket is gone: a
    broker that refuses the client certificate (TLS 1.3 says so in an alert after the
    handshake) or drops the connection would cost a full timeout per attempt.
    """
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()
    connack = [False]
    paho = getattr(client, "_client", None)  # aiomqtt's paho client; without it the CONNACK timeout still applies
    if paho is not None:
        on_connect, on_disconnect = paho.on_connect, paho.on_disconnect

        def connect_seen(*args: Any, **kwargs: Any) -> None:
            connack[0] = True  # paho calls this before on_disconnect: a refused CONNACK wins
            on_connect(*args, **kwargs)

        def disconnect_seen(*args: Any, **kwargs: Any) -> None:
            on_disconnect(*args, **kwargs)
            if not connack[0]:  # paho's threads: hand over to the loop
                loop.call_soon_threadsafe(lambda: closed.done() or closed.set_result(None))

        paho.on_connect, paho.on_disconnect = connect_seen, disconnect_seen
    connecting = asyncio.ensure_future(client.__aenter__())
    try:
        await asyncio.wait((connecting, closed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
    if not connecting.cancelled():
        connecting.result()  # raises MqttError: refused, timed out
        return
    raise ConnectionError(f"connection closed before CONNACK: {paho_log.last_error or 'the broker hung up'}")


async def _exit_quietly(client: aiomqtt.Client) -> None:
    """Disconnect (clean DISCONNECT if the socket is still up), bounded in time."""
    try:
        async with asyncio.timeout(_SHUTDOWN_STEP_S):
            await client.__aexit__(None, None, None)
    except Exception:  # noqa: BLE001 -- the connection is gone either way
        pass


def _refusal_hint(error: BaseException | None) -> str | None:
    """What to check when ``error`` is a refusal that retrying will not cure; None for the others."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    if isinstance(error, ValueError):  # FileProblemError: a file or variable the profile names
        return "no connection until it is put right"
    if isinstance(error, MqttConnectError):
        return _REFUSALS.get(getattr(error.rc, "value", error.rc))
    if error is not None and (isinstance(error, ssl.SSLError) or "[SSL" in str(error)):
        return "TLS refused: check uplink.mqtt.tls and the broker's certificates"
    return None


def _describe(error: BaseException | None) -> str:
    """The first real cause, short: ExceptionGroups from the session's TaskGroup are unwrapped."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    if error is None:
        return "connection closed"
    text = str(error) or type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text
