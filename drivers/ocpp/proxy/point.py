"""A proxied charger's session and connection classes, as the central system builds them.

``ProxiedSession`` is the charger's ``ChargerSession`` with its ``ChargerProxy`` (which
outlives the links) and the reading's note; ``proxied_point_class(CentralPoint16)`` etc. put
``ProxiedPoint`` in front of a version's connection class, so every frame from the charger
passes the proxy first.
"""

from __future__ import annotations

from typing import Any

from edge.asset import UpstreamStatus

from drivers.ocpp.pacing import message_priority
from drivers.ocpp.proxy.forward import PASSED, ChargerProxy
from drivers.ocpp.session import ChargerSession


class ProxiedSession(ChargerSession):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.charger.upstream is not None
        self.proxy = ChargerProxy(self, self.charger.upstream)
        self.quiet = False  # set while the gateway reads a message the backend answers

    def _fall_back(self, limit, purpose, why) -> bool:
        # A unit fallback (W refused: A) keeps the proxied purpose, which the charger combines
        # with the backend's profiles; a Tx purpose would not.
        fell_back = super()._fall_back(limit, purpose, why)
        if fell_back:
            self.command_charger = self.proxy.commanded(self.command_charger)
        return fell_back

    def emit(self, event_type: str, detail: dict[str, Any]) -> None:
        if self.quiet and event_type == "authorization_rejected":
            return
        super().emit(event_type, detail)

    def point_class(self, base: type) -> type:
        return proxied_point_class(base)

    def on_link(self, point: Any, version: str) -> None:
        if self.state_dir is not None:
            self.proxy.use_folder(self.state_dir / "ocpp-upstream")
        point.proxy = self.proxy
        self.proxy.attach(point, version)

    def on_link_closed(self, point: Any) -> None:
        self.proxy.detach(point)

    def close(self) -> None:
        self.proxy.close()

    def upstream_status(self) -> UpstreamStatus:
        proxy = self.proxy
        return UpstreamStatus(connected=proxy.connected, queued=len(proxy.queue), host=proxy.host)

    @property
    def upstream(self) -> dict[str, Any]:
        """For telemetry: {connected, queued, url_host}."""
        return self.proxy.status()

    def _detail_notes(self) -> str:
        proxy = self.proxy
        note = f"; proxied to {proxy.host}"
        if not proxy.connected:
            note += f" (backend unreachable, {len(proxy.queue)} queued)"
        elif proxy.queue:
            note += f" ({len(proxy.queue)} queued)"
        return super()._detail_notes() + note


class ProxiedPoint:
    """Mixin before a CentralPoint class: frames go through the charger's proxy first.

    The receive loop of ``PrebuiltCalls.start`` with the proxy around the pacer's turn: what
    goes upstream unchanged is sent before the turn (``ChargerProxy.ahead_of_turn``), so the
    forwarding path never queues behind the gateway's own bursts; the gateway's reading of
    it, and everything else, waits for the turn as on any link.
    """

    proxy: ChargerProxy

    async def start(self) -> None:
        recv, pacer, proxy = self._connection.recv, self.pacer, self.proxy
        while True:
            raw = await recv()
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8", "replace")
            self.logger.info("%s: receive message %s", self.id, raw)
            item = await proxy.ahead_of_turn(self, raw)
            if item is PASSED:
                continue
            if pacer is not None:
                await pacer.take(message_priority(raw))
            if item is None:
                await self.route_message(raw)
            else:
                await proxy.in_turn(self, item)


_classes: dict[type, type] = {}


def proxied_point_class(point_class: type) -> type:
    if point_class not in _classes:
        _classes[point_class] = type(f"Proxied{point_class.__name__}", (ProxiedPoint, point_class), {})
    return _classes[point_class]
