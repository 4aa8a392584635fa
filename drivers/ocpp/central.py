"""The site's OCPP central system: one websocket server for all its chargers.

``OcppCentralSystem(server_cfg, chargers, emit_event)``
    ``server_cfg`` an ``OcppServer``; ``chargers`` the ``OcppCharger`` assets
    served (more can be added with ``add_charger`` before or while running);
    ``emit_event`` receives site-level events (``ocpp_unknown_charge_point``).

``await system.run()``
    Serve until cancelled.  Raises ``OSError`` if the port cannot be bound and
    ``ValueError`` for unusable TLS files.  ``system.bound_port`` is the port
    in use once ``system.started`` (an asyncio.Event) is set.

``system.add_charger(charger, emit_event) -> ChargerSession``
    Register a charger; its events go to ``emit_event``.  Its session gives
    ``reading()`` and ``set_target_kw()``.  A charge point id may be used once.

``system.remove_charger(asset_id)``
    Forget a charger and close its link.

``system.pacer``: the ``LoopPacer`` (``drivers.ocpp.pacing``) through which all
chargers' commands and incoming messages pass, a few per loop iteration.

Handshake rules: the URL is ``<path>/<charge_point_id>``; an unknown id gets
HTTP 404 and an ``ocpp_unknown_charge_point`` event (at most one a minute per id); a charger with a password
must send HTTP Basic credentials with its charge point id as user name (401
and ``ocpp_auth_failed`` otherwise); profile 3 needs a client certificate
signed by ``ca_file`` (the TLS handshake fails without one).  The subprotocol
is ``ocpp2.1``, ``ocpp2.0.1`` or ``ocpp1.6`` as the charger's ``ocpp_version``
allows, the newest the charger offers when ``auto``.  A charger connecting again replaces
its previous link.  Nothing is sent to a charger before its BootNotification
is answered, or ``boot_grace_s`` after it connected without sending one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import ssl
import time
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request
from websockets.typing import Subprotocol

from edge.asset import EventSink

from drivers.ocpp.commands import command_loop
from drivers.ocpp.config import OcppCharger, OcppServer
from drivers.ocpp.handlers import CentralPoint16, CentralPoint21, CentralPoint201
from drivers.ocpp.identity import SUBPROTOCOLS, VERSIONS, charge_point_id, check_basic
from drivers.ocpp.pacing import LoopPacer
from drivers.ocpp.proxy.point import ProxiedSession
from drivers.ocpp.session import ChargerSession, TagHasher

log = logging.getLogger("flexedge.drivers.ocpp")

REFUSAL_EVENT_INTERVAL_S = 60.0
POINT_CLASSES = {"2.1": CentralPoint21, "2.0.1": CentralPoint201, "1.6": CentralPoint16}


def load_or_create_salt(path: Path) -> bytes:
    """Read the ID-tag salt, creating it (32 random bytes, hex, mode 0600) on first use.  Blocking."""
    if path.exists():
        text = path.read_text().strip()
        if len(text) < 32:
            raise ValueError(f"{path}: ID tag salt too short (want 32+ hex characters)")
        return bytes.fromhex(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(salt.hex() + "\n")
    return salt


def server_ssl_context(cfg: OcppServer) -> ssl.SSLContext | None:
    if cfg.security_profile == 1:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cfg.cert_file, cfg.key_file)
        if cfg.security_profile == 3:
            context.load_verify_locations(cafile=cfg.ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"OCPP server TLS files (cert_file/key_file/ca_file): {error}") from None
    return context


class OcppCentralSystem:
    def __init__(self, server_cfg: OcppServer, chargers: list[OcppCharger] = (), emit_event: EventSink | None = None):
        self.cfg = server_cfg
        self.emit_event: EventSink = emit_event or (lambda *_: None)
        self.sessions: dict[str, ChargerSession] = {}  # by charge point id
        self._by_asset: dict[str, str] = {}
        self._links: dict[str, ServerConnection] = {}
        self._hasher: TagHasher | None = None
        self.started = asyncio.Event()
        self.bound_port: int | None = None
        self._pending = list(chargers)
        # One work budget per loop iteration for all chargers: bursts (a setpoint moving every
        # limit, meter values arriving together) are spread over iterations (drivers.ocpp.pacing).
        self.pacer = LoopPacer()
        self._last_refusal: dict[tuple[str, str], float] = {}

    # ---------------------------------------------------------- chargers

    def _hash_tag(self, tag: str | None) -> str | None:
        # Tags only arrive over a link, and links only exist once run() has loaded the salt.
        assert self._hasher is not None
        return self._hasher(tag)

    def add_charger(self, charger: OcppCharger, emit_event: EventSink | None = None) -> ChargerSession:
        if charger.charge_point_id in self.sessions:
            raise ValueError(f"charge_point_id {charger.charge_point_id!r} is used by two assets "
                             f"({self.sessions[charger.charge_point_id].charger.id!r} and {charger.id!r})")
        # A charger with an upstream CPO backend is proxied (drivers.ocpp.proxy).
        session_class = ProxiedSession if charger.upstream is not None else ChargerSession
        session = session_class(charger, emit_event or self.emit_event, self._hash_tag)
        session.pacer = self.pacer
        session.state_dir = Path(self.cfg.id_tag_salt_file).parent
        self.sessions[charger.charge_point_id] = session
        self._by_asset[charger.id] = charger.charge_point_id
        return session

    def remove_charger(self, asset_id: str) -> None:
        cp_id = self._by_asset.pop(asset_id, None)
        if cp_id is None:
            return
        session = self.sessions.pop(cp_id, None)
        if session is not None:
            session.on_disconnected("charger removed from the central system")
            session.close()
        link = self._links.pop(cp_id, None)
        if link is not None:
            asyncio.ensure_future(link.close(1001, "charger removed"))

    def session(self, asset_id: str) -> ChargerSession:
        return self.sessions[self._by_asset[asset_id]]

    def authorize(self, id_tag: str) -> bool:
        policy = self.cfg.authorize
        if policy.mode == "accept_all":
            return bool(id_tag)
        return any(hmac.compare_digest(id_tag.encode(), allowed.encode()) for allowed in policy.id_tags)

    # --------------------------------------------------------- handshake

    def _charge_point_id(self, path: str) -> str | None:
        return charge_point_id(self.cfg.path, path)

    def _worth_reporting(self, kind: str, who: str) -> bool:
        """One refusal event per charger and kind per minute: a misconfigured charger retries forever."""
        now = time.monotonic()
        if len(self._last_refusal) > 1000:
            self._last_refusal.clear()
        last = self._last_refusal.get((kind, who))
        if last is not None and now - last < REFUSAL_EVENT_INTERVAL_S:
            return False
        self._last_refusal[(kind, who)] = now
        return True

    def _refuse(self, connection: ServerConnection, status: int, text: str):
        response = connection.respond(status, text + "\n")
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Basic realm="ocpp"'
        return response

    async def _process_request(self, connection: ServerConnection, request: Request):
        remote = _remote(connection)
        cp_id = self._charge_point_id(request.path)
        session = self.sessions.get(cp_id) if cp_id else None
        if session is None:
            shown = (cp_id or request.path)[:64]
            if self._worth_reporting("unknown", shown):
                log.warning("refused unknown charge point %r from %s", shown, remote)
                self.emit_event("ocpp_unknown_charge_point", None, {"charge_point_id": shown, "remote": remote})
            return self._refuse(connection, 404, "unknown charge point")
        try:
            password = await asyncio.to_thread(session.charger.password)
        except ValueError as error:  # configured but not to be had: fail closed
            if self._worth_reporting("auth", cp_id):
                log.error("refused charge point %s from %s: its %s", cp_id, remote, error)
                session.emit("ocpp_auth_failed", {"remote": remote, "reason": f"gateway: {error}"})
            return self._refuse(connection, 401, "invalid credentials")
        if password is not None and self.cfg.security_profile in (1, 2):
            why = check_basic(request.headers.get("Authorization"), cp_id, password)
            if why:
                if self._worth_reporting("auth", cp_id):
                    log.warning("refused charge point %s from %s: %s", cp_id, remote, why)
                    session.emit("ocpp_auth_failed", {"remote": remote, "reason": why})
                return self._refuse(connection, 401, "invalid credentials")
        return None

    def _select_subprotocol(self, connection: ServerConnection, offered) -> Subprotocol | None:
        cp_id = self._charge_point_id(connection.request.path)
        session = self.sessions.get(cp_id)
        wanted = session.charger.ocpp_version if session else "auto"
        allowed = list(SUBPROTOCOLS.values()) if wanted == "auto" else [SUBPROTOCOLS[wanted]]
        for name in allowed:
            if name in offered:
                return Subprotocol(name)
        raise NegotiationError(f"charger offers {', '.join(offered) or 'no subprotocol'}; want {', '.join(allowed)}")

    # -------------------------------------------------------- connection

    async def _handle(self, connection: ServerConnection) -> None:
        cp_id = self._charge_point_id(connection.request.path)
        session = self.sessions.get(cp_id)
        if session is None:  # removed during the handshake
            await connection.close(1008, "unknown charge point")
            return
        previous = self._links.get(cp_id)
        if previous is not None:
            await previous.close(1000, "replaced by a new connection")
        self._links[cp_id] = connection
        version = VERSIONS.get(connection.subprotocol, "1.6")
        point_class = session.point_class(POINT_CLASSES[version])
        point = point_class(cp_id, connection, session, self.authorize, self.cfg.heartbeat_interval_s,
                            self.cfg.call_timeout_s, pacer=self.pacer)
        session.on_link(point, version)
        session.on_connected(version, _remote(connection))
        point.arm_boot_grace(self.cfg.boot_grace_s)
        commands = asyncio.create_task(command_loop(point, session, version), name=f"ocpp-commands-{cp_id}")
        reason = "closed"
        try:
            await point.start()
        except ConnectionClosed as closed:
            reason = f"link closed ({closed.rcvd.code if closed.rcvd else 'no close frame'})"
        finally:
            point.disarm_boot_grace()
            commands.cancel()
            session.on_link_closed(point)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await commands
            if self._links.get(cp_id) is connection:
                del self._links[cp_id]
                session.on_disconnected(reason)

    async def run(self) -> None:
        if self._hasher is None:
            self._hasher = TagHasher(await asyncio.to_thread(load_or_create_salt, self.cfg.id_tag_salt_file))
        for charger in self._pending:
            self.add_charger(charger)
        self._pending = []
        context = await asyncio.to_thread(server_ssl_context, self.cfg)
        if self.cfg.security_profile < 3:
            open_ids = [s.charger.charge_point_id for s in self.sessions.values()
                        if s.charger.password_file is None and s.charger.password_env is None]
            if open_ids:
                log.warning("%d charger(s) without password: anyone can connect as them (security profile %d): %s",
                            len(open_ids), self.cfg.security_profile, ", ".join(open_ids[:10]) + (" ..." if len(open_ids) > 10 else ""))
        async with serve(
            self._handle, self.cfg.host, self.cfg.port, ssl=context,
            subprotocols=[Subprotocol(p) for p in SUBPROTOCOLS.values()],
            select_subprotocol=self._select_subprotocol,
            process_request=self._process_request,
            ping_interval=self.cfg.ping_interval_s, ping_timeout=self.cfg.ping_interval_s,
            open_timeout=10, close_timeout=2, compression=None,
        ) as server:
            self.bound_port = next(iter(server.sockets)).getsockname()[1]
            log.info("OCPP central system on %s:%d%s (security profile %d, %d chargers)", self.cfg.host,
                     self.bound_port, self.cfg.path, self.cfg.security_profile, len(self.sessions))
            self.started.set()
            try:
                await asyncio.Future()
            finally:
                self.started.clear()
                for session in self.sessions.values():
                    session.on_disconnected("central system stopped")
                    session.close()


def _remote(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"
