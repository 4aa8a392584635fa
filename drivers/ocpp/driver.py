"""One ``AssetDriver`` per charger, all sharing the site's central system.

The daemon builds drivers one asset at a time (``create(asset, cycle_s,
emit_event)``), but OCPP needs one websocket server per site.  The drivers
therefore share servers through a registry keyed by listen address:
the first driver whose ``run()`` starts creates and starts the
``OcppCentralSystem`` for its ``OcppServer`` settings, the others register
their charger with it, and the last one to stop closes it.  Two different
``OcppServer`` settings on one address are an error.

Which ``OcppServer`` a charger uses: the one given to ``OcppChargerDriver``,
else the one set with ``configure_site(server)`` (the daemon calls it with the
profile's site-level OCPP settings before creating drivers), else defaults.
Its failsafe share of the site's connection limits likewise: given, else set
with ``configure_failsafe(shares)`` (``drivers.ocpp.prepare_site``), else its
own ``failsafe_kw``, else none.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from edge.asset import AssetDriver, AssetReading, DeviceRating, DispatchContext, EventSink, PowerPlan

from drivers.ocpp.central import OcppCentralSystem
from drivers.ocpp.config import OcppCharger, OcppServer
from drivers.ocpp.session import ChargerSession

_site_server: OcppServer | None = None
_site_failsafe: dict[str, tuple[float, float | None]] = {}


def configure_site(server: OcppServer | None) -> None:
    """Set the site-level OCPP server settings used by drivers created afterwards."""
    global _site_server
    _site_server = server


def configure_failsafe(shares: dict[str, tuple[float, float | None]]) -> None:
    """Set each charger's failsafe (import kW, export kW or None) by asset id, for drivers created afterwards."""
    global _site_failsafe
    _site_failsafe = dict(shares)


def site_server() -> OcppServer:
    return _site_server if _site_server is not None else OcppServer()


@dataclass
class _Shared:
    system: OcppCentralSystem
    task: asyncio.Task
    users: int = 0


_shared: dict[tuple[str, int], _Shared] = {}


def shared_system(server: OcppServer) -> OcppCentralSystem | None:
    """The running central system for these settings, if a driver started one (tests, diagnostics)."""
    shared = _shared.get((server.host, server.port))
    return shared.system if shared else None


@contextlib.asynccontextmanager
async def attached(server: OcppServer, charger: OcppCharger, emit_event: EventSink):
    """Register ``charger`` with the shared central system for ``server``; yield (session, server task)."""
    key = (server.host, server.port)
    shared = _shared.get(key)
    if shared is None or shared.task.done():
        system = OcppCentralSystem(server, emit_event=emit_event)
        shared = _Shared(system, asyncio.create_task(system.run(), name=f"ocpp-server-{server.port}"))
        _shared[key] = shared
    elif shared.system.cfg != server:
        raise ValueError(f"two different OCPP server settings for {server.host}:{server.port}")
    session = shared.system.add_charger(charger, emit_event)
    shared.users += 1
    try:
        yield session, shared.task
    finally:
        shared.system.remove_charger(charger.id)
        shared.users -= 1
        if shared.users == 0 and _shared.get(key) is shared:
            del _shared[key]
            shared.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await shared.task


class OcppChargerDriver(AssetDriver):
    def __init__(self, asset: OcppCharger, cycle_s: float, emit_event: EventSink, server: OcppServer | None = None,
                 failsafe: tuple[float, float | None] | None = None):
        super().__init__(asset.id, cycle_s, emit_event)
        self.asset = asset
        self.server = server if server is not None else site_server()
        if failsafe is None:
            failsafe = _site_failsafe.get(asset.id)
        if failsafe is None and asset.failsafe_kw is not None:
            failsafe = (asset.failsafe_kw, None)
        self.failsafe = failsafe
        self.session: ChargerSession | None = None
        self._target_kw: float | None = None
        self._target_given = False
        self._plan: PowerPlan | None = None
        self._context: DispatchContext | None = None
        self._ratings: dict[str, DeviceRating] = {}  # the last the charger stated; see device_ratings

    async def run(self) -> None:
        async with attached(self.server, self.asset, self.emit_event) as (session, server_task):
            session.hold_s = self.asset.hold_s(self.cycle_s)
            session.failsafe_kw = self.failsafe
            session.plan, session.context = self._plan, self._context
            if self._target_given:
                session.set_target_kw(self._target_kw)
            session.command_log = self.command_log
            self.session = session
            try:
                # Raises if the shared server fails (port in use, bad TLS files): the
                # daemon's supervisor restarts this driver, which starts a new server.
                await asyncio.shield(server_task)
            finally:
                self.session = None

    def reading(self) -> AssetReading:
        if self.session is None:
            return AssetReading(online=False, p_min_kw=0.0, p_max_kw=0.0, detail="central system not running")
        return self.session.reading()

    def device_ratings(self) -> dict[str, DeviceRating]:
        """2.0.1: the EVSE's maximum power (device model EVSE Power maxLimit) as ``max_power_kw``,
        compared with the charger's rating from the profile.  1.6 chargers state none."""
        session = self.session
        if session is not None and session.device_max_power is not None \
                and self._ratings.get("max_power_kw") != session.device_max_power:
            self._ratings = {"max_power_kw": session.device_max_power}
        return self._ratings

    def set_target_kw(self, target_kw: float | None) -> None:
        self._target_kw, self._target_given = target_kw, True
        if self.session is not None:
            self.session.set_target_kw(target_kw)

    def set_plan(self, plan: PowerPlan | None) -> None:
        """Sent as the periods after the current target (drivers.ocpp.schedule); newest wins."""
        self._plan = plan
        if self.session is not None:
            self.session.set_plan(plan)

    @property
    def wants_dispatch_context(self) -> bool:  # type: ignore[override]
        """A charger that follows AFRRSignal (the profile says so, or its device model did on this link)."""
        session = self.session
        return self.asset.v2x.afrr_signal is True or (session is not None and session.features.afrr_signal)

    def set_dispatch_context(self, context: DispatchContext | None) -> None:
        self._context = context
        if self.session is not None:
            self.session.set_dispatch_context(context)
