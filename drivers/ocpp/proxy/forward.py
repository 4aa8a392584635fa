"""The local controller's forwarding: one charger, its CPO backend, and the gateway in between.

``ChargerProxy`` (one per proxied charger, kept by its ``ProxiedSession`` across links)
owns the charger's upstream socket and routes every frame:

* the charger's CALLs go upstream as they came (same unique id, same text), and the
  gateway's handlers read them for its own state with their answers discarded; the
  backend's answer is what the charger gets.  While the backend is unreachable (or a
  replay is under way) the gateway answers itself (local authorization, boot Accepted) and
  queues the transaction messages (``drivers.ocpp.proxy.queue``) for replay in order;
* the backend's CALLs go to the charger (ids kept, mapped when they could collide with the
  gateway's own, which start ``fx-``), one at a time with the gateway's own CALLs, and the
  charger's answers go back upstream; charging-profile requests first pass
  ``drivers.ocpp.proxy.rules``;
* the charger's answers to the gateway's CALLs stay with the gateway.

Nothing from the backend reaches another charger: a proxy only knows its own point.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from ocpp.messages import Call
from websockets.exceptions import ConnectionClosed

from drivers.ocpp.greeting import send_failsafe
from drivers.ocpp.identity import SUBPROTOCOLS
from drivers.ocpp.proxy.config import UpstreamLink
from drivers.ocpp.proxy.link import UpstreamSocket
from drivers.ocpp.proxy.local import answer_locally, read_state
from drivers.ocpp.proxy.queue import TRANSACTION_ACTIONS, OfflineQueue, QueueFile, QueuedMessage, queue_path
from drivers.ocpp.proxy.rules import FORWARD, REASSERT, REFUSE, gateway_slots, judge_clear, judge_set, refusal_answer

log = logging.getLogger("flexedge.drivers.ocpp.proxy")

# The gateway's purpose for a proxied charger: one the charger combines with the backend's by minimum.
PROXY_PURPOSE = {"1.6": "ChargePointMaxProfile", "2.0.1": "ChargingStationExternalConstraints",
                 "2.1": "ChargingStationExternalConstraints"}
_mapped_ids = itertools.count(1)


def gateway_call_id() -> str:
    """The gateway's own CALL ids on a proxied link: recognisable, never taken for the backend's."""
    return f"fx-{uuid.uuid4()}"


PASSED = object()  # ahead_of_turn: the frame went upstream, nothing left for the gateway


@dataclass
class Forwarded:
    """A charger CALL sent upstream, waiting for the backend's answer (and for the gateway's reading)."""

    msg: Call
    timer: asyncio.TimerHandle | None = None
    read: bool = True  # the gateway has read it (False: sent ahead of its turn, ``in_turn`` reads it)
    answer: tuple[int, list] | None = None  # the backend's answer, when it came before the reading
    local: bool = False  # the backend went silent before the reading: the gateway answers it in turn


@dataclass
class LocalTurn:
    """A charger CALL the gateway answers itself in turn (unless the backend link is up by then)."""

    msg: Call
    raw: str


class ChargerProxy:
    def __init__(self, session: Any, cfg: UpstreamLink):
        self.session = session
        self.cfg = cfg
        self.host = cfg.host  # for every reading and telemetry: parsed once
        self.queue = OfflineQueue(cfg.queue_max_messages)
        self.point: Any = None
        self.version: str | None = None
        self.socket: UpstreamSocket | None = None
        self._task: asyncio.Task | None = None
        self._away: asyncio.TimerHandle | None = None
        self.online = asyncio.Event()  # link up and the boot/queue replay done
        self.connected = False
        self.last_boot: dict[str, Any] | None = None  # the charger's last BootNotification payload
        self.transaction_ids: dict[int, int] = {}  # 1.6: id the gateway gave offline -> the backend's
        self.file: QueueFile | None = None  # the queue on disk, once the folder is known (use_folder)
        self._up: dict[str, Forwarded] = {}  # charger CALLs forwarded, by unique id
        self._down: dict[str, tuple[str, str, bool, asyncio.Future]] = {}  # backend CALLs at the charger, by its id
        self._own: dict[str, asyncio.Future] = {}  # the gateway's CALLs upstream (boot and queue replay)
        self._tasks: set[asyncio.Task] = set()
        self._down_reported = False

    # ----------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        return {"connected": self.connected, "queued": len(self.queue), "url_host": self.host}

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------- charger link

    def attach(self, point: Any, version: str) -> None:
        """The charger connected: bind its point, open (or keep) the backend link for its version."""
        if self._away is not None:
            self._away.cancel()
            self._away = None
        self.point, self.version = point, version
        point._unique_id_generator = gateway_call_id
        session, charger = self.session, self.session.charger
        session.command_charger = self.commanded(session.command_charger)
        if self._task is not None and self.socket is not None and self.socket.subprotocol != SUBPROTOCOLS[version]:
            self.close()
        if self._task is None or self._task.done():
            self.socket = UpstreamSocket(self.cfg, charger.charge_point_id, SUBPROTOCOLS[version],
                                         self._on_open, self._on_frame, self._on_close)
            self._task = asyncio.create_task(self.socket.run(), name=f"ocpp-upstream-{charger.charge_point_id}")

    def commanded(self, command_charger: Any) -> Any:
        """The charger as the gateway commands it while proxied: its limit under a purpose the charger
        combines with the backend's by minimum, at the reserved stack level (unless the profile
        names a purpose itself)."""
        if self.session.charger.profile_purpose is not None or self.version is None:
            return command_charger
        return command_charger.model_copy(update={"profile_purpose": PROXY_PURPOSE[self.version],
                                                  "stack_level": self.cfg.stack_level})

    def detach(self, point: Any) -> None:
        """The charger's link ended: the backend's requests in flight get a CALLERROR; the backend
        link closes after ``away_close_s`` unless the charger is back."""
        if self.point is not point:
            return
        self.point = None
        for charger_id, (backend_id, _action, _, future) in list(self._down.items()):
            if not future.done():
                future.set_result(None)
            self._down.pop(charger_id, None)
            self._spawn(self._send_up(json.dumps([4, backend_id, "GenericError", "charger not connected", {}])))
        if self._away is None:
            self._away = asyncio.get_running_loop().call_later(self.cfg.away_close_s, self.close)

    def use_folder(self, folder) -> None:
        """Keep the queue in ``folder`` across restarts; what a previous run left there is restored
        (ahead of anything queued since) before the next replay."""
        if self.file is None:
            path = queue_path(folder, self.session.charger.charge_point_id)
            self.file = QueueFile(path, self.queue, self.transaction_ids)
            self._spawn(self._restore())

    async def _restore(self) -> None:
        restored = await self.file.restore()
        if restored:
            log.warning("%s: %d message(s) for the backend kept from before a restart: replayed first",
                        self.session.charger.charge_point_id, restored)

    def _persist(self) -> None:
        if self.file is not None:
            self.file.changed()

    def close(self) -> None:
        if self.file is not None:
            self.file.write_soon()
        if self._away is not None:
            self._away.cancel()
            self._away = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self._tasks):
            task.cancel()
        if self.connected:
            self._on_close("charger gone" if self.point is None else "closed by the gateway")

    # ---------------------------------------------- backend link state

    async def _on_open(self) -> None:
        self.connected = True
        self._down_reported = False
        self.session.emit("upstream_connected", {"url": self.socket.shown_url, "reason": "connected"})
        log.info("%s: backend %s connected", self.session.charger.charge_point_id, self.socket.shown_url)
        self._spawn(self._sync(send_boot=True))

    def _on_close(self, reason: str) -> None:
        was = self.connected
        self.connected = False
        self.online.clear()
        for future in self._own.values():
            if not future.done():
                future.set_exception(ConnectionError(reason))
        self._own.clear()
        pending, self._up = list(self._up.values()), {}
        for forwarded in pending:
            if forwarded.timer is not None:
                forwarded.timer.cancel()
        self._give_up(pending)
        if was or not self._down_reported:
            self._down_reported = True
            url = self.socket.shown_url if self.socket else self.cfg.shown_url(self.session.charger.charge_point_id)
            self.session.emit("upstream_disconnected", {"url": url, "reason": reason})

    async def _sync(self, send_boot: bool) -> None:
        """On a new backend link: the charger's last boot (it may not boot again), then the queue, in order.
        Forwarding waits meanwhile (``online`` is clear), so nothing overtakes the replay."""
        try:
            if send_boot and self.last_boot is not None:
                await self._call_up(f"fx-boot-{uuid.uuid4()}", "BootNotification", self.last_boot)
            replayed = await self._replay()
        except (ConnectionError, TimeoutError) as error:
            log.info("%s: replay to the backend interrupted (%s); again on the next link",
                     self.session.charger.charge_point_id, error or "timeout")
            if self.socket is not None:
                await self.socket.drop("replay not answered")
            return
        if replayed:
            log.info("%s: %d queued message(s) replayed to the backend", self.session.charger.charge_point_id, replayed)
            self.session.emit("upstream_replayed", {"messages": replayed})
        if self.connected:
            self.online.set()

    async def _replay(self) -> int:
        count = 0
        if self.file is not None:
            async with asyncio.timeout(self.cfg.response_timeout_s + 10):
                await self.file.restored.wait()
        while self.queue:
            item = self.queue.head()
            payload = self._map_transaction(item.action, item.payload)
            kind, answer = await self._call_up(item.unique_id, item.action, payload)
            if kind == 4:
                log.warning("%s: the backend refused the replayed %s: %s", self.session.charger.charge_point_id,
                            item.action, answer)
            elif item.local_transaction_id is not None and isinstance(answer.get("transactionId"), int):
                self.transaction_ids[item.local_transaction_id] = answer["transactionId"]
            self.queue.pop_head()
            self._persist()
            count += 1
        return count

    async def _call_up(self, unique_id: str, action: str, payload: dict[str, Any]) -> tuple[int, Any]:
        """A CALL of the gateway's own upstream; (3, payload) or (4, error code and text)."""
        future = asyncio.get_running_loop().create_future()
        self._own[unique_id] = future
        try:
            await self._send_up(json.dumps([2, unique_id, action, payload]), raise_errors=True)
            async with asyncio.timeout(self.cfg.response_timeout_s):
                return await future
        finally:
            self._own.pop(unique_id, None)

    async def _send_up(self, text: str, raise_errors: bool = False) -> bool:
        socket = self.socket
        try:
            if socket is None:
                raise ConnectionError("no backend link")
            await socket.send(text)
            return True
        except ConnectionError:
            if raise_errors:
                raise
            return False

    # ---------------------------------------------- from the charger

    async def ahead_of_turn(self, point: Any, raw: str) -> Any:
        """A frame from the charger, before it waits its turn in the central system's pacer.

        What the backend is to get goes at once, as it came, so that the gateway's own bursts
        (a setpoint's profiles to every charger) add nothing to the forwarding path:

        * an answer to one of the backend's CALLs: forwarded, nothing left (``PASSED``);
        * a CALL while the backend link is up and nothing is queued: forwarded; the returned
          ``Forwarded`` is the gateway's to read in turn (``in_turn``);
        * a CALL the gateway must answer itself: a ``LocalTurn``, handled whole in turn.

        None: not the proxy's (an answer to the gateway's own CALL, or a frame it cannot parse).
        The charger's link hands over one frame at a time (``ahead_of_turn``, the pacer, then
        ``in_turn``), so nothing overtakes a frame still waiting for its turn.
        """
        try:
            frame = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(frame, list) or len(frame) < 3 or not isinstance(frame[1], str):
            return None
        kind = frame[0]
        if kind in (3, 4):
            entry = self._down.get(frame[1])
            if entry is None:
                return None  # the answer to one of the gateway's CALLs
            backend_id, action, reassert, future = entry
            text = raw if backend_id == frame[1] else json.dumps([kind, backend_id, *frame[2:]])
            await self._send_up(text)
            if not future.done():
                future.set_result(frame)
            if reassert and kind == 3:
                self._reassert(point)
            return PASSED
        if kind != 2 or len(frame) != 4 or not isinstance(frame[2], str) or not isinstance(frame[3], dict):
            return None
        msg = Call(unique_id=frame[1], action=frame[2], payload=frame[3])
        if not self.online.is_set() or self.queue:
            return LocalTurn(msg, raw)
        return await self._forward(msg, raw)

    async def _forward(self, msg: Call, raw: str) -> Forwarded | LocalTurn:
        if msg.action == "BootNotification":
            self.last_boot = msg.payload
        mapped = self._map_transaction(msg.action, msg.payload)
        text = raw if mapped is msg.payload else json.dumps([2, msg.unique_id, msg.action, mapped])
        forwarded = Forwarded(msg, read=False)
        self._up[msg.unique_id] = forwarded
        if not await self._send_up(text):
            self._up.pop(msg.unique_id, None)
            return LocalTurn(msg, raw)
        forwarded.timer = asyncio.get_running_loop().call_later(
            self.cfg.response_timeout_s, self._backend_silent, msg.unique_id)
        return forwarded

    async def in_turn(self, point: Any, item: Forwarded | LocalTurn) -> None:
        """The frame's turn: the gateway reads what went upstream, or answers it itself."""
        if isinstance(item, Forwarded):
            await self._read_forwarded(point, item)
        else:
            await self._local_turn(point, item.msg, item.raw)

    async def _read_forwarded(self, point: Any, forwarded: Forwarded) -> None:
        msg = forwarded.msg
        if forwarded.local:  # the backend went silent before the gateway read it
            await self._answer_locally(point, msg)
            return
        if not (msg.action == "StartTransaction" and self.version == "1.6"):
            await read_state(point, self.session, msg)  # 1.6 StartTransaction: on the backend's answer (its id)
        forwarded.read = True
        if forwarded.answer is not None:  # the backend answered before the gateway's turn came
            self._answered(point, msg, *forwarded.answer)

    async def _local_turn(self, point: Any, msg: Call, raw: str) -> None:
        if not self.online.is_set() and self.socket is not None and not self.socket.first_attempt_done.is_set():
            # The charger's first words (its boot) are worth the wait for the first connection.
            try:
                async with asyncio.timeout(self.cfg.connect_timeout_s):
                    await self.socket.first_attempt_done.wait()
                    if self.connected:
                        await self.online.wait()
            except TimeoutError:
                pass
        if self.online.is_set() and not self.queue:  # the link came up meanwhile
            forwarded = await self._forward(msg, raw)
            if isinstance(forwarded, Forwarded):
                await self._read_forwarded(point, forwarded)
                return
        if msg.action == "BootNotification":
            self.last_boot = msg.payload  # after the wait: the link's first sync must not send it too
        await self._answer_locally(point, msg)

    def _backend_silent(self, unique_id: str) -> None:
        forwarded = self._up.pop(unique_id, None)
        if forwarded is not None:
            log.warning("%s: no answer from the backend to %s within %g s: answered by the gateway",
                        self.session.charger.charge_point_id, forwarded.msg.action, self.cfg.response_timeout_s)
            self._give_up([forwarded])

    def _give_up(self, forwarded: list[Forwarded]) -> None:
        """The backend will not answer these: the gateway does, those it has not read yet in their turn."""
        read = [f.msg for f in forwarded if f.read]
        for item in forwarded:
            item.local = not item.read
        if read:
            self._spawn(self._answer_locally_all(read))

    async def _answer_locally_all(self, messages: list[Call]) -> None:
        for msg in messages:
            if self.point is not None:
                await self._answer_locally(self.point, msg, state_read=True)

    def _map_transaction(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """1.6: a transaction started offline carries the gateway's id; the backend knows its own."""
        if self.version != "1.6" or action not in ("StopTransaction", "MeterValues"):
            return payload
        local = payload.get("transactionId")
        if isinstance(local, int) and local in self.transaction_ids:
            return {**payload, "transactionId": self.transaction_ids[local]}
        return payload

    async def _answer_locally(self, point: Any, msg: Call, state_read: bool = False) -> None:
        """The gateway answers the charger itself; a transaction message is queued for the backend."""
        payload = await answer_locally(point, msg, state_read, self._spawn)
        if payload is not None and msg.action in TRANSACTION_ACTIONS:
            local_id = payload.get("transactionId") if msg.action == "StartTransaction" else None
            self._queue(QueuedMessage(msg.unique_id, msg.action, msg.payload, local_transaction_id=local_id))

    def _queue(self, message: QueuedMessage) -> None:
        dropped = self.queue.push(message)
        self._persist()
        if self.online.is_set():  # the backend is there but missed this one (no answer in time): replay now
            self.online.clear()
            self._spawn(self._sync(send_boot=False))
        if dropped is not None:
            self.session.emit("upstream_queue_dropped", {"action": dropped.action, "dropped": self.queue.dropped,
                                                          "queued": len(self.queue)})
        if self.queue.over_bound() and len(self.queue) % 100 == 1:
            log.warning("%s: %d transaction messages queued for the backend (over queue_max_messages %d: "
                        "transactions are never dropped)", self.session.charger.charge_point_id, len(self.queue),
                        self.queue.max_messages)

    # ---------------------------------------------- from the backend

    async def _on_frame(self, raw: str) -> None:
        try:
            frame = json.loads(raw)
        except ValueError:
            log.warning("%s: backend sent a frame that is not JSON: dropped", self.session.charger.charge_point_id)
            return
        if not isinstance(frame, list) or len(frame) < 3 or not isinstance(frame[1], str):
            return
        kind, unique_id = frame[0], frame[1]
        if kind in (3, 4):
            await self._answer_from_backend(kind, unique_id, frame, raw)
        elif kind == 2 and len(frame) == 4 and isinstance(frame[2], str):
            await self._request_from_backend(unique_id, frame[2], frame[3], raw)

    async def _answer_from_backend(self, kind: int, unique_id: str, frame: list, raw: str) -> None:
        own = self._own.get(unique_id)
        if own is not None:
            if not own.done():
                own.set_result((kind, frame[2] if kind == 3 else frame[2:]))
            return
        forwarded = self._up.pop(unique_id, None)
        if forwarded is None:
            log.info("%s: backend answer to unknown id %s dropped", self.session.charger.charge_point_id, unique_id)
            return
        if forwarded.timer is not None:
            forwarded.timer.cancel()
        point = self.point
        if point is None or not await self._to_charger(point, raw):
            return
        if forwarded.read:
            self._answered(point, forwarded.msg, kind, frame)
        else:
            forwarded.answer = (kind, frame)

    async def _to_charger(self, point: Any, text: str) -> bool:
        """Send to the charger from the backend link's side; False when the charger's link is gone
        or stuck.  Never raises: that would end the backend link, which is not the one that failed."""
        try:
            await point._send(text)
            return True
        except (ConnectionClosed, TimeoutError) as error:
            log.info("%s: the charger's link did not take the backend's frame (%s): dropped",
                     self.session.charger.charge_point_id, type(error).__name__)
            return False

    def _answered(self, point: Any, msg: Call, kind: int, frame: list) -> None:
        """What the gateway learns from the backend's answer, once it has read the CALL itself."""
        payload = frame[2] if kind == 3 and isinstance(frame[2], dict) else {}
        if msg.action == "BootNotification":
            point.boot_status = payload.get("status") if kind == 3 else None
            if kind == 3:
                point._boot_answered()
        elif msg.action == "StartTransaction" and self.version == "1.6" and kind == 3:
            self._started_by_backend(point, msg.payload, payload)

    def _started_by_backend(self, point: Any, request: dict[str, Any], answer: dict[str, Any]) -> None:
        info = answer.get("idTagInfo") or {}
        transaction_id = answer.get("transactionId")
        if info.get("status") != "Accepted" or transaction_id is None:
            return
        try:
            ours = point._ours(int(request.get("connectorId", -1)))
        except (TypeError, ValueError):
            return
        if ours:
            meter = request.get("meterStart")
            self.session.on_transaction_started(str(transaction_id), request.get("idTag"),
                                                float(meter) if isinstance(meter, (int, float)) else None)

    async def _request_from_backend(self, unique_id: str, action: str, payload: Any, raw: str) -> None:
        point, version = self.point, self.version
        reassert = False
        if isinstance(payload, dict) and version is not None and action in ("SetChargingProfile",
                                                                              "ClearChargingProfile"):
            slots = gateway_slots(self.session.command_charger, version, self.session.failsafe_kw is not None)
            if action == "SetChargingProfile":
                why = judge_set(payload, version, slots)
                verdict = REFUSE if why else FORWARD
            else:
                verdict, why = judge_clear(payload, version, slots)
            if verdict == REFUSE:
                log.info("%s: the backend's %s refused: %s", self.session.charger.charge_point_id, action, why)
                self.session.emit("upstream_request_refused", {"action": action, "reason": why})
                await self._send_up(json.dumps([3, unique_id, refusal_answer(action, version, why)]))
                return
            reassert = verdict == REASSERT
        if point is None:
            await self._send_up(json.dumps([4, unique_id, "GenericError", "charger not connected", {}]))
            return
        charger_id = unique_id
        if unique_id.startswith("fx-") or unique_id in self._down:
            charger_id = f"up-{next(_mapped_ids)}"
        text = raw if charger_id == unique_id else json.dumps([2, charger_id, action, payload])
        self._spawn(self._deliver(point, charger_id, unique_id, action, text, reassert))

    async def _deliver(self, point: Any, charger_id: str, backend_id: str, action: str, text: str,
                       reassert: bool) -> None:
        """One backend CALL at the charger, in turn with the gateway's own (one CALL at a time)."""
        future = asyncio.get_running_loop().create_future()
        try:
            async with point._call_lock:
                if self.point is not point:
                    await self._send_up(json.dumps([4, backend_id, "GenericError", "charger not connected", {}]))
                    return
                self._down[charger_id] = (backend_id, action, reassert, future)
                await point._send(text)
                async with asyncio.timeout(point.response_timeout_s):
                    await future
        except TimeoutError:
            log.info("%s: no answer from the charger to the backend's %s", point.id, action)
        except Exception as error:  # the charger's link went: detach() answered the backend
            log.debug("%s: backend %s not delivered: %r", point.id, action, error)
        finally:
            self._down.pop(charger_id, None)

    def _reassert(self, point: Any) -> None:
        """The backend's clear swept the gateway's profiles away too: send them again at once."""
        session = self.session
        session.command_in_force = None
        session.limit_in_force = None
        session.request_command(front=True)
        if session.failsafe_kw is not None and self.version is not None:
            self._spawn(send_failsafe(point, session, self.version))

