"""The CPO backend simulator's server: handshake rules, links, records, backend-initiated calls."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ocpp.exceptions import OCPPError
from ocpp.messages import Call, validate_payload
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from drivers.ocpp.identity import SUBPROTOCOLS, VERSIONS, charge_point_id, check_basic
from simulators.cpo_backend import handshake, payloads, records
from simulators.cpo_backend.points import POINT_CLASSES
from simulators.cpo_backend.records import (Authorization, Boot, CallErrorAnswer, CallTimeout, ChargerNotConnected,
                                            Link, MeterReading, Received, Refusal, Sent, Transaction)

log = logging.getLogger("flexedge.simulators.cpo_backend")


@dataclass(frozen=True)
class Malformed:
    """A frame that was not an OCPP message, and the CALLERROR code it was answered with."""

    text: str  # the first 1000 characters
    error_code: str
    connection_no: int
    received_mono: float


class _Link:
    def __init__(self, cp_id: str, version: str, connection: ServerConnection, number: int, remote: str):
        self.cp_id, self.version, self.connection, self.number = cp_id, version, connection, number
        self.record = Link(number, version, remote, time.monotonic())
        self.pending: dict[str, tuple[asyncio.Future, Sent]] = {}
        self.lock = asyncio.Lock()  # OCPP: one CALL outstanding per direction and link

    def fail_pending(self, why: str) -> None:
        for future, sent in self.pending.values():
            if not future.done():
                future.set_exception(ChargerNotConnected(f"{self.cp_id}: {sent.action} {sent.unique_id}: {why}"))
        self.pending.clear()


def _compact(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[:limit] + "..."


class CpoBackend:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, path: str = "/ocpp",
                 id_tags: Iterable[str] | None = None, security_profile: int = 1,
                 passwords: dict[str, str] | None = None, cert_file: str | Path | None = None,
                 key_file: str | Path | None = None, ca_file: str | Path | None = None, accept_unknown: bool = True,
                 versions: Iterable[str] = ("1.6", "2.0.1", "2.1"), heartbeat_interval_s: int = 300,
                 boot_status: str = "Accepted", record_limit: int = 100_000, ping_interval_s: float | None = 20.0):
        handshake.check_security(security_profile, cert_file, key_file, ca_file)
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        self.versions = tuple(versions)
        unknown = [v for v in self.versions if v not in SUBPROTOCOLS]
        if unknown or not self.versions:
            raise ValueError(f"versions must be among 1.6, 2.0.1, 2.1, got {list(self.versions)!r}")
        if boot_status not in ("Accepted", "Pending", "Rejected"):
            raise ValueError(f"boot_status must be Accepted, Pending or Rejected, got {boot_status!r}")
        if not (isinstance(record_limit, int) and record_limit > 0):
            raise ValueError(f"record_limit must be a positive int, got {record_limit!r}")
        self.host, self.path = host, path.rstrip("/") or "/"
        self._port = port
        self.security_profile = security_profile
        self.passwords = dict(passwords or {})
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file
        self.accept_unknown = accept_unknown
        # Mutable while running: a test changes who is authorized or how boots are answered.
        self.id_tags: set[str] | None = None if id_tags is None else set(id_tags)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.boot_status = boot_status
        self.record_limit = record_limit
        self.ping_interval_s = ping_interval_s
        self.bound_port: int | None = None
        self.refusals: list[Refusal] = []
        self._server = None
        self._links: dict[str, _Link] = {}
        self._link_records: dict[str, list[Link]] = defaultdict(list)
        self._messages: dict[str, list[Received]] = defaultdict(list)
        self._sent: dict[str, list[Sent]] = defaultdict(list)
        self._malformed: dict[str, list[Malformed]] = defaultdict(list)
        self._transaction_ids = itertools.count(1)
        self._call_ids = itertools.count(1)
        self._profile_ids = itertools.count(1001)
        self._remote_start_ids = itertools.count(1)
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        if self.bound_port is None:
            raise RuntimeError("the CPO backend has not been started: no port yet")
        scheme = "wss" if self.security_profile >= 2 else "ws"
        return f"{scheme}://{self.host}:{self.bound_port}{self.path}"

    async def start(self) -> None:
        """Listen (again: after stop(), on the same port as before)."""
        if self._server is not None:
            return
        context = await asyncio.to_thread(handshake.server_ssl_context, self.security_profile, self.cert_file,
                                          self.key_file, self.ca_file)
        self._server = await serve(
            self._handle, self.host, self._port, ssl=context,
            subprotocols=[Subprotocol(SUBPROTOCOLS[v]) for v in SUBPROTOCOLS if v in self.versions],
            select_subprotocol=self._select_subprotocol, process_request=self._process_request,
            ping_interval=self.ping_interval_s, ping_timeout=self.ping_interval_s, open_timeout=5,
            close_timeout=1, compression=None)
        self.bound_port = self._port = next(iter(self._server.sockets)).getsockname()[1]
        log.info("CPO backend on %s (security profile %d, OCPP %s, id tags: %s)", self.url, self.security_profile,
                 "/".join(self.versions), "any" if self.id_tags is None else ", ".join(sorted(self.id_tags)) or "none")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Close every link (1001) and the listening socket; pending backend calls fail at once."""
        server, self._server = self._server, None
        if server is None:
            return
        for link in list(self._links.values()):
            link.fail_pending("the CPO backend stopped")
        server.close(close_connections=True)
        try:
            await asyncio.wait_for(server.wait_closed(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("CPO backend: links still open %.1f s after stop()", timeout_s)
        self._links.clear()
        self._notify()
        log.info("CPO backend on port %s stopped", self.bound_port)

    async def __aenter__(self) -> "CpoBackend":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ------------------------------------------------------------------ handshake

    def _charge_point_id(self, path: str) -> str | None:
        return charge_point_id(self.path, path)

    def _refuse(self, connection: ServerConnection, cp_id: str, status: int, reason: str):
        self.refusals.append(Refusal(cp_id, status, reason, time.monotonic()))
        log.warning("refused %r from %s: HTTP %d (%s)", cp_id, _remote(connection), status, reason)
        self._notify()
        response = connection.respond(status, reason + "\n")
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Basic realm="ocpp"'
        return response

    def _process_request(self, connection: ServerConnection, request):
        cp_id = self._charge_point_id(request.path)
        if cp_id is None:
            return self._refuse(connection, request.path[:64], 404, f"URL must be {self.path}/<charge point id>")
        if not self.accept_unknown and cp_id not in self.passwords:
            return self._refuse(connection, cp_id, 404, "unknown charge point")
        password = self.passwords.get(cp_id)
        if password is not None and self.security_profile in (1, 2):
            why = check_basic(request.headers.get("Authorization"), cp_id, password)
            if why:
                return self._refuse(connection, cp_id, 401, why)
        return None

    def _select_subprotocol(self, connection: ServerConnection, offered) -> Subprotocol:
        return handshake.select_subprotocol(self.versions, offered)

    # ------------------------------------------------------------------ links

    async def _handle(self, connection: ServerConnection) -> None:
        cp_id = self._charge_point_id(connection.request.path)
        version = VERSIONS[connection.subprotocol]
        previous = self._links.get(cp_id)
        if previous is not None:
            previous.fail_pending("replaced by a new connection")
            await previous.connection.close(1000, "replaced by a new connection")
        number = len(self._link_records[cp_id]) + 1
        link = _Link(cp_id, version, connection, number, _remote(connection))
        point = POINT_CLASSES[version](cp_id, connection, self, link)
        self._links[cp_id] = link
        self._link_records[cp_id].append(link.record)
        log.info("%s connected (OCPP %s, connection #%d, from %s)", cp_id, version, number, link.record.remote)
        self._notify()
        reason = "closed"
        try:
            await point.start()
        except ConnectionClosed as closed:
            reason = f"code {closed.rcvd.code}" if closed.rcvd else "no close frame"
        except Exception:  # a bug here must cost one link, never the server
            log.exception("%s: link handler failed", cp_id)
        finally:
            link.fail_pending(f"link closed ({reason}) before the answer")
            if self._links.get(cp_id) is link:
                del self._links[cp_id]
            log.info("%s disconnected (connection #%d, %s)", cp_id, number, reason)
            self._notify()

    # ------------------------------------------------------------------ recording (called by the points)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _keep(self, items: list) -> None:
        if len(items) > self.record_limit:
            del items[:len(items) - self.record_limit]

    def _record_call(self, link: _Link, unique_id: str, action: str, payload: Any) -> Received:
        received = Received(action, unique_id, payload, time.time(), time.monotonic(), link.number, link.version)
        items = self._messages[link.cp_id]
        items.append(received)
        self._keep(items)
        self._notify()
        return received

    def _answered(self, link: _Link, received: Received) -> None:
        if received.error_code:
            log.warning("%s #%d -> %s %s  <= CALLERROR %s", link.cp_id, link.number, received.action,
                        _compact(received.payload), received.error_code)
        elif log.isEnabledFor(logging.INFO):
            answer = _compact(received.answer, 200)
            log.info("%s #%d -> %s %s  <= %s", link.cp_id, link.number, received.action, _compact(received.payload),
                     answer)
        self._notify()

    def _record_malformed(self, link: _Link, raw: Any, error: OCPPError) -> None:
        text = raw if isinstance(raw, str) else repr(raw)
        self._malformed[link.cp_id].append(Malformed(text[:1000], error.code, link.number, time.monotonic()))
        log.warning("%s #%d sent a malformed frame (%s): %.120r", link.cp_id, link.number, error.code, text)
        self._notify()

    def _answer_arrived(self, link: _Link, frame: list) -> None:
        entry = link.pending.pop(frame[1], None) if isinstance(frame[1], str) else None
        if entry is None:
            log.warning("%s #%d: answer to no CALL of ours: %.120s", link.cp_id, link.number, _compact(frame))
            return
        future, sent = entry
        sent.answered_mono = time.monotonic()
        if frame[0] == 3:
            sent.answer = frame[2] if isinstance(frame[2], dict) else {"_": frame[2]}
            if not future.done():
                future.set_result(sent.answer)
        else:
            sent.error_code = str(frame[2])
            sent.error_description = str(frame[3]) if len(frame) > 3 else ""
            details = frame[4] if len(frame) > 4 else {}
            if not future.done():
                future.set_exception(CallErrorAnswer(
                    f"{link.cp_id}: {sent.action} {sent.unique_id} answered CALLERROR {sent.error_code}: "
                    f"{sent.error_description} {_compact(details, 200) if details else ''}".rstrip(),
                    sent.error_code, sent.error_description, details))
        log.info("%s #%d <= %s %s: %s", link.cp_id, link.number, sent.action, sent.unique_id,
                 f"CALLERROR {sent.error_code}" if sent.error_code else _compact(sent.answer, 200))
        self._notify()

    # ------------------------------------------------------------------ answers (used by the points)

    def tag_status(self, tag: Any) -> str:
        """Accepted for a tag in ``id_tags`` (any non-empty tag when ``id_tags`` is None), else Invalid."""
        if not isinstance(tag, str) or not tag:
            return "Invalid"
        if self.id_tags is None:
            return "Accepted"
        known = any(hmac.compare_digest(tag.encode(), allowed.encode()) for allowed in self.id_tags)
        return "Accepted" if known else "Invalid"

    def _next_transaction_id(self) -> int:
        return next(self._transaction_ids)

    # ------------------------------------------------------------------ backend-initiated calls

    def version(self, cp_id: str) -> str:
        """The OCPP version of the charger's current link (ChargerNotConnected if none)."""
        link = self._links.get(cp_id)
        if link is None:
            raise ChargerNotConnected(f"{cp_id} is not connected to the CPO backend: no OCPP version")
        return link.version

    def _link(self, cp_id: str, action: str) -> _Link:
        link = self._links.get(cp_id)
        if link is None:
            seen = len(self._link_records.get(cp_id, ()))
            raise ChargerNotConnected(f"{cp_id}: cannot send {action}: the charger is not connected to the CPO backend "
                                      f"({seen} connection(s) so far)")
        return link

    async def call(self, cp_id: str, action: str, payload: dict, timeout_s: float = 5.0, *,
                   validate: bool = True) -> dict:
        """Send a CALL (payload camelCase), return the CALLRESULT payload.  Raises ChargerNotConnected,
        CallTimeout, CallErrorAnswer (all BackendCallError); ValueError for a payload the schema refuses."""
        link = self._link(cp_id, action)
        unique_id = f"cpo-{next(self._call_ids)}"
        if validate:
            try:
                await validate_payload(Call(unique_id, action, payload), link.version)
            except OCPPError as error:
                raise ValueError(f"{action} payload for {cp_id} (OCPP {link.version}) does not pass the schema: "
                                 f"{error.code}: {error.details}") from None
        sent = Sent(action, unique_id, payload, time.time(), time.monotonic(), link.number)
        self._sent[cp_id].append(sent)
        self._keep(self._sent[cp_id])
        future = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                async with link.lock:
                    link.pending[unique_id] = (future, sent)
                    log.info("%s #%d => %s %s %s", cp_id, link.number, action, unique_id, _compact(payload))
                    try:
                        await link.connection.send(json.dumps([2, unique_id, action, payload], separators=(",", ":")))
                    except ConnectionClosed:
                        link.pending.pop(unique_id, None)
                        raise ChargerNotConnected(f"{cp_id}: {action} {unique_id}: link closed while sending") from None
                    return await future
        except TimeoutError:
            link.pending.pop(unique_id, None)
            raise CallTimeout(f"{cp_id}: no answer to {action} {unique_id} within {timeout_s:g} s") from None

    async def set_charging_profile(self, cp_id: str, limit: float, unit: str = "A", purpose: str = "TxDefaultProfile",
                                   stack_level: int = 0, profile_id: int | None = None, evse_or_connector: int = 1,
                                   *, transaction_id=None, number_phases: int | None = None,
                                   timeout_s: float = 5.0) -> dict:
        """SetChargingProfile, one period at ``limit`` from now, in the charger's version's shape."""
        version = self._link(cp_id, "SetChargingProfile").version
        payload = payloads.set_charging_profile(
            version, limit=limit, unit=unit, purpose=purpose, stack_level=stack_level,
            profile_id=next(self._profile_ids) if profile_id is None else profile_id,
            evse_or_connector=evse_or_connector, transaction_id=transaction_id, number_phases=number_phases)
        return await self.call(cp_id, "SetChargingProfile", payload, timeout_s)

    async def clear_charging_profile(self, cp_id: str, profile_id: int | None = None, purpose: str | None = None,
                                     stack_level: int | None = None, evse_or_connector: int | None = None, *,
                                     timeout_s: float = 5.0) -> dict:
        version = self._link(cp_id, "ClearChargingProfile").version
        payload = payloads.clear_charging_profile(version, profile_id=profile_id, purpose=purpose,
                                                  stack_level=stack_level, evse_or_connector=evse_or_connector)
        return await self.call(cp_id, "ClearChargingProfile", payload, timeout_s)

    async def remote_start(self, cp_id: str, id_tag: str, evse_or_connector: int = 1, *,
                           timeout_s: float = 5.0) -> dict:
        """RemoteStartTransaction (1.6) / RequestStartTransaction (2.x)."""
        action, payload = payloads.remote_start(self._link(cp_id, "a remote start").version, id_tag=id_tag,
                                                evse_or_connector=evse_or_connector,
                                                remote_start_id=next(self._remote_start_ids))
        return await self.call(cp_id, action, payload, timeout_s)

    async def remote_stop(self, cp_id: str, transaction_id, *, timeout_s: float = 5.0) -> dict:
        """RemoteStopTransaction (1.6) / RequestStopTransaction (2.x)."""
        version = self._link(cp_id, "a remote stop").version
        action, payload = payloads.remote_stop(version, transaction_id=transaction_id)
        return await self.call(cp_id, action, payload, timeout_s)

    async def get_configuration(self, cp_id: str, keys: Iterable[str] | None = None, *,
                                timeout_s: float = 5.0) -> dict:
        """1.6 GetConfiguration (2.x has no such message: use call(cp_id, "GetVariables", ...))."""
        version = self._link(cp_id, "GetConfiguration").version
        if version != "1.6":
            raise ValueError(f"{cp_id} speaks OCPP {version}: GetConfiguration is 1.6; send GetVariables with call()")
        return await self.call(cp_id, "GetConfiguration", {"key": list(keys)} if keys else {}, timeout_s)

    # ------------------------------------------------------------------ what arrived

    def charge_point_ids(self) -> list[str]:
        """Every charger that connected at least once, in order of first connection."""
        return list(self._link_records)

    def connected(self, cp_id: str) -> bool:
        return cp_id in self._links

    def links(self, cp_id: str) -> list[Link]:
        return list(self._link_records.get(cp_id, ()))

    def connections(self, cp_id: str) -> int:
        return len(self._link_records.get(cp_id, ()))

    def messages(self, cp_id: str, action: str | None = None) -> list[Received]:
        return [m for m in self._messages.get(cp_id, ()) if action is None or m.action == action]

    def sent(self, cp_id: str) -> list[Sent]:
        return list(self._sent.get(cp_id, ()))

    def malformed(self, cp_id: str) -> list[Malformed]:
        return list(self._malformed.get(cp_id, ()))

    def transactions(self, cp_id: str) -> list[Transaction]:
        return records.transactions(self._messages.get(cp_id, []))

    def meter_values(self, cp_id: str, measurand: str | None = None) -> list[MeterReading]:
        found = [r for m in self._messages.get(cp_id, ()) if not m.error_code for r in records.readings(m)]
        return [r for r in found if measurand is None or r.measurand == measurand]

    def boots(self, cp_id: str) -> list[Boot]:
        return records.boots(cp_id, self._messages.get(cp_id, []))

    def authorizations(self, cp_id: str) -> list[Authorization]:
        return records.authorizations(self._messages.get(cp_id, []))

    # ------------------------------------------------------------------ waiting

    async def _wait(self, found: Callable[[], Any], timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while True:
            changed = self._changed
            result = found()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"CPO backend: {what} within {timeout_s:g} s")
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def wait_connected(self, cp_id: str, timeout_s: float = 3.0, *, after: int = 0) -> Link:
        """The charger's link once it is connected and has connected more than ``after`` times."""
        await self._wait(lambda: self.connected(cp_id) and self.connections(cp_id) > after, timeout_s,
                         f"{cp_id} not connected" + (f" a {after + 1}th time" if after else ""))
        return self._link_records[cp_id][-1]

    async def wait_boot(self, cp_id: str, timeout_s: float = 3.0, after: int = 0) -> Boot:
        """The (after+1)-th BootNotification of the charger (the first by default, even if already here)."""
        boots = await self._wait(lambda: self.boots(cp_id)[after:], timeout_s,
                                 f"no BootNotification #{after + 1} from {cp_id}")
        return boots[0]

    async def wait_message(self, cp_id: str, action: str, timeout_s: float = 3.0, after: int = 0,
                           answered: bool = True) -> Received:
        """The (after+1)-th CALL ``action`` from the charger, once answered (unless ``answered`` False)."""
        def found():
            items = self.messages(cp_id, action)
            return len(items) > after and (items[after].answered or not answered) and items[after]
        return await self._wait(found, timeout_s, f"no {action} #{after + 1} from {cp_id}")


def _remote(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"
