"""The local HTTP endpoint: the status page, /metrics, /health, /api/state and /api/live.

Served by websockets' server: plain GETs are answered from ``process_request`` (one
response per connection), and ``/api/live`` is upgraded to a websocket that carries one
JSON message per control cycle.  Read-only: GET and HEAD, anything else is 405.

Nothing here can hold up the control cycle: the cycle's hook only defers the work to the
next turn of the loop, a snapshot is O(assets), metrics are formatted in a thread, and each
websocket client has a short queue of its own: a client that falls behind is dropped, the
cycle never waits for it.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from edge.local.auth import AuthFileError, BasicAuth
from edge.local.metrics import GatewayMetrics
from edge.local.source import StatusSource
from edge.local.state import StatusBook, encode

log = logging.getLogger("flexedge.local")
# websockets notes every HTTP answer as a "rejected" handshake at INFO: keep that out of the daemon's log.
_wire_log = logging.getLogger("flexedge.local.wire")
_wire_log.setLevel(logging.WARNING)

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {  # path -> (file in static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
LIVE_QUEUE_MESSAGES = 8  # cycles a websocket client may fall behind before it is dropped
# What a live client's socket may hold on our side: small and fixed (no autotuning to megabytes),
# so a client that stops reading fills it within a few cycles and is dropped, its memory freed.
LIVE_SEND_BUFFER_BYTES = 16 * 1024
LIVE_CLIENTS_MAX = 16
BIND_RETRY_S = 60.0
CLOSE_TIMEOUT_S = 2.0


class _LiveClient:
    def __init__(self, connection: ServerConnection, queue_size: int):
        self.connection = connection
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)


class LocalHttpServer:
    """One per gateway; ``run()`` serves until cancelled.  The gateway calls ``after_cycle()``
    at the end of each control cycle and ``note_event(payload)`` for each event."""

    def __init__(self, source: StatusSource, live_queue_messages: int = LIVE_QUEUE_MESSAGES):
        self.source = source
        self.book = StatusBook(source)
        self.metrics = GatewayMetrics(source, self._last_cycle_age_s)
        self.live_queue_messages = live_queue_messages
        self.clients: set[_LiveClient] = set()
        self.clients_dropped = 0
        self.bound: tuple[str, int] | None = None  # (host, port) once listening
        self._auth: BasicAuth | None = None
        self._static: dict[str, bytes] = {}
        self._failures = 0

    # ------------------------------------------------------ from the gateway

    def note_event(self, payload: dict[str, Any]) -> None:
        self.book.note_event(payload)

    def after_cycle(self) -> None:
        """Called inside the control cycle: only schedules the work for the loop's next turn."""
        asyncio.get_running_loop().call_soon(self._publish_cycle)

    def _publish_cycle(self) -> None:
        try:
            point = self.book.after_cycle()
            self.metrics.after_cycle()
            if not self.clients:
                self.book.events_sent_up_to_now()
                return
            text = encode(self.book.live_message(point))
            for client in list(self.clients):
                try:
                    client.queue.put_nowait(text)
                except asyncio.QueueFull:
                    self._drop(client)
        except Exception:  # noqa: BLE001 -- the status page must never take the gateway down
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 1000 == 0:
                log.exception("status page update failed (%d times so far)", self._failures)

    def _drop(self, client: _LiveClient) -> None:
        self.clients.discard(client)
        self.clients_dropped += 1
        log.warning("status page client %s dropped: %d updates behind", _peer(client.connection),
                    self.live_queue_messages)
        transport = client.connection.transport
        if transport is not None:
            transport.abort()  # no closing handshake: it would wait for the client that is not reading

    def _last_cycle_age_s(self) -> float | None:
        last = self.book.last_cycle_mono
        return None if last is None else max(0.0, time.monotonic() - last)

    # ---------------------------------------------------------------- serving

    async def run(self) -> None:
        cfg = self.source.profile.local_http
        if cfg is None:
            return await asyncio.Event().wait()
        try:
            self._static = await asyncio.to_thread(_load_static)
            self._auth = await asyncio.to_thread(BasicAuth.load, cfg.basic_auth_file) if cfg.basic_auth_file else None
        except (AuthFileError, OSError) as error:
            log.error("local HTTP endpoint not started: %s", error)
            self.source.emit_event("local_http_failed", None, {"host": cfg.host, "port": cfg.port, "error": str(error)})
            return await asyncio.Event().wait()  # fail closed, and do not retry: the file needs a person
        server = await self._listen(cfg.host, cfg.port)
        try:
            await asyncio.Event().wait()
        finally:
            for client in list(self.clients):
                self._drop_quietly(client)
            server.close()
            try:
                await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT_S)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 -- shutting down: never hang here
                pass

    async def _listen(self, host: str, port: int) -> Server:
        """Listen, or say once why not and try again every minute: the gateway goes on meanwhile."""
        reported = None
        while True:
            try:
                server = await serve(
                    self._live, host, port, process_request=self._answer, server_header="flexedge",
                    compression=None, max_size=4096, max_queue=4, write_limit=LIVE_SEND_BUFFER_BYTES,
                    open_timeout=10, close_timeout=1,
                    ping_interval=20, ping_timeout=20, logger=_wire_log)
            except OSError as error:
                # asyncio words it "error while attempting to bind on address (...): ..."; the errno says it plainly
                text = os.strerror(error.errno) if error.errno and error.errno > 0 else error.strerror or str(error)
                if text != reported:
                    log.error("local HTTP endpoint: cannot listen on %s:%d: %s; the gateway runs without it "
                              "(tried again every %g s)", host, port, text, BIND_RETRY_S)
                    self.source.emit_event("local_http_failed", None, {"host": host, "port": port, "error": text})
                    reported = text
                await asyncio.sleep(BIND_RETRY_S)
                continue
            sockets = list(server.sockets)
            self.bound = sockets[0].getsockname()[:2] if sockets else (host, port)
            cfg = self.source.profile.local_http
            log.info("local HTTP endpoint: status page http://%s/, metrics, health, api (%s)", _authority(host, port),
                     "Basic auth" if self._auth is not None else "no auth")
            if cfg is not None and not cfg.loopback and self._auth is None:
                log.warning("local HTTP endpoint on %s is reachable from the network and has no basic_auth_file", host)
            return server

    async def _live(self, connection: ServerConnection) -> None:
        client = _LiveClient(connection, self.live_queue_messages)
        sock = connection.transport.get_extra_info("socket") if connection.transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LIVE_SEND_BUFFER_BYTES)
        self.clients.add(client)
        try:
            while client in self.clients:
                await connection.send(await client.queue.get())
        except ConnectionClosed:
            pass
        finally:
            self.clients.discard(client)

    def _drop_quietly(self, client: _LiveClient) -> None:
        self.clients.discard(client)
        if client.connection.transport is not None:
            client.connection.transport.abort()

    async def _answer(self, connection: ServerConnection, request: Request) -> Response | None:
        """Every request: auth, then the method, then the path.  None: go on with the websocket upgrade."""
        method = getattr(request, "method", "GET")
        if self._auth is not None and not self._auth.allows(request.headers.get("Authorization")):
            return _response(401, b"authentication required\n", "text/plain; charset=utf-8",
                             extra={"WWW-Authenticate": 'Basic realm="flexedge", charset="UTF-8"'})
        if method not in ("GET", "HEAD"):
            return _response(405, b"read-only: GET or HEAD\n", "text/plain; charset=utf-8",
                             extra={"Allow": "GET, HEAD"})
        head = method == "HEAD"
        path = request.path.split("?", 1)[0]
        if path == "/api/live":
            if request.headers.get("Upgrade", "").lower() != "websocket" or head:
                return _response(426, b"/api/live is a websocket\n", "text/plain; charset=utf-8",
                                 extra={"Upgrade": "websocket"})
            if len(self.clients) >= LIVE_CLIENTS_MAX:
                return _response(503, b"too many live clients\n", "text/plain; charset=utf-8")
            return None
        if path in PAGES:
            name, content_type = PAGES[path]
            extra = {"Content-Security-Policy": PAGE_POLICY} if name == "index.html" else {}
            return _response(200, self._static[name], content_type, head, extra)
        if path == "/metrics":
            body, content_type = await self.metrics.render(request.headers.get("Accept"))
            return _response(200, body, content_type, head)
        if path == "/health":
            health = self.book.health()
            return _response(200 if health.ok else 503, encode(health.body()).encode(), "application/json", head)
        if path == "/api/state":
            document = self.book.snapshot()
            body = await asyncio.to_thread(encode, document)
            return _response(200, body.encode(), "application/json", head)
        return _response(404, b"not found\n", "text/plain; charset=utf-8", head)


def _response(status: int, body: bytes, content_type: str, head: bool = False,
              extra: dict[str, str] | None = None) -> Response:
    headers = Headers()
    headers["Date"] = email.utils.formatdate(usegmt=True)
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Connection"] = "close"
    for key, value in (extra or {}).items():
        headers[key] = value
    return Response(status, http.HTTPStatus(status).phrase, headers, b"" if head else body)


def _load_static() -> dict[str, bytes]:
    return {name: (STATIC / name).read_bytes() for name, _ in PAGES.values()}


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer(connection: ServerConnection) -> str:
    try:
        return "%s:%s" % connection.remote_address[:2]
    except Exception:  # noqa: BLE001 -- only for a log line
        return "?"
