"""One websocket to a charger's CPO backend, reconnected while it is wanted.

``UpstreamSocket(cfg, own_id, subprotocol, on_open, on_message, on_close)``: ``run()``
connects (TLS verifying the backend's certificate for security profiles 2 and 3, a client
certificate for 3, HTTP Basic for 1 and 2), calls ``on_open()``, hands every frame to
``on_message(text)`` and, when the link ends, ``on_close(reason)``; then waits a capped,
jittered backoff and connects again, until cancelled.  ``send(text)`` fails with
``ConnectionError`` when there is no link or the send does not finish in time.  Files
(password, certificates) are read in a thread; every handshake has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from typing import Awaitable, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from edge.runtime.backoff import Backoff

from drivers.ocpp.proxy.config import UpstreamLink

log = logging.getLogger("flexedge.drivers.ocpp.proxy")

RETRY_FIRST_S = 1.0
RETRY_CAP_S = 60.0
SEND_TIMEOUT_S = 5.0


def client_ssl_context(cfg: UpstreamLink) -> ssl.SSLContext:
    """Verifies the backend's certificate and host name (never CERT_NONE).  Blocking (reads files)."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(cfg.ca_file) if cfg.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cfg.security_profile == 3:
            context.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"upstream TLS files (ca_file/cert_file/key_file): {error}") from None
    return context


def basic_auth_header(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class UpstreamSocket:
    def __init__(self, cfg: UpstreamLink, own_id: str, subprotocol: str,
                 on_open: Callable[[], Awaitable[None]], on_message: Callable[[str], Awaitable[None]],
                 on_close: Callable[[str], None]):
        self.cfg = cfg
        self.own_id = own_id
        self.subprotocol = subprotocol
        self.url = cfg.station_url(own_id)
        self.shown_url = cfg.shown_url(own_id)
        self._on_open, self._on_message, self._on_close = on_open, on_message, on_close
        self._websocket: ClientConnection | None = None
        self.attempts = 0  # connection attempts that failed in a row
        self.first_attempt_done = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._websocket is not None

    async def send(self, text: str) -> None:
        websocket = self._websocket
        if websocket is None:
            raise ConnectionError("backend not connected")
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await websocket.send(text)
        except (ConnectionClosed, TimeoutError) as error:
            raise ConnectionError(f"backend link: {type(error).__name__}") from None

    async def drop(self, reason: str) -> None:
        """Close the link (the run loop reconnects after its backoff)."""
        websocket = self._websocket
        if websocket is not None:
            await websocket.close(1011, reason[:100])

    async def _open(self) -> ClientConnection:
        cfg = self.cfg
        headers: dict[str, str] = {}
        context = None
        if cfg.security_profile >= 2:
            context = await asyncio.to_thread(client_ssl_context, cfg)
        if cfg.security_profile <= 2:
            password = await asyncio.to_thread(cfg.password)
            if password is not None:
                headers = basic_auth_header(cfg.charge_point_id or self.own_id, password)
        websocket = await connect(self.url, subprotocols=[self.subprotocol], additional_headers=headers, ssl=context,
                                  open_timeout=cfg.connect_timeout_s, close_timeout=2, ping_interval=20,
                                  ping_timeout=20, compression=None, max_size=2**20)
        if websocket.subprotocol != self.subprotocol:
            await websocket.close(1002, "subprotocol not agreed")
            raise ConnectionError(f"the backend did not agree to {self.subprotocol} "
                                  f"(answered {websocket.subprotocol or 'none'})")
        return websocket

    async def run(self) -> None:
        backoff = Backoff(RETRY_FIRST_S, RETRY_CAP_S)
        while True:
            try:
                async with asyncio.timeout(self.cfg.connect_timeout_s + 1.0):
                    websocket = await self._open()
            except (OSError, TimeoutError, WebSocketException, ConnectionError, ValueError, ssl.SSLError) as error:
                reason = _why(error)
                self.attempts += 1
                if self.attempts == 1 or self.attempts % 10 == 0:
                    log.warning("%s: backend %s unreachable (%s); attempt %d", self.own_id, self.shown_url, reason,
                                self.attempts)
                self.first_attempt_done.set()
                self._on_close(reason)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self.attempts = 0
            self._websocket = websocket
            reason = "closed"
            try:
                self.first_attempt_done.set()
                await self._on_open()
                async for frame in websocket:
                    await self._on_message(frame if isinstance(frame, str) else frame.decode("utf-8", "replace"))
                reason = f"closed by the backend ({websocket.close_code})"
            except ConnectionClosed as closed:
                reason = f"link lost ({closed.rcvd.code if closed.rcvd else 'no close frame'})"
            finally:
                self._websocket = None
                if not websocket.close_code:
                    asyncio.ensure_future(websocket.close())
            self._on_close(reason)
            await asyncio.sleep(backoff.next_delay())


def _why(error: BaseException) -> str:
    if isinstance(error, InvalidStatus):
        return f"HTTP {error.response.status_code}"
    if isinstance(error, TimeoutError):
        return "timeout"
    return f"{type(error).__name__}: {error}"[:200]
