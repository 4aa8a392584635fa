"""The daemon: wires the profile's drivers, the controller and the uplink on one loop.

Every driver runs in its own supervised task: a driver that raises is logged,
reported upstream and restarted with capped backoff, while the control cycle
and the other drivers go on.  Telemetry and events pass through one ordered
outbox to the uplink, which spools each message before sending it; so do the
1-min consumption and 15-min validation aggregates (edge/control/aggregates.py), which
every cycle's telemetry feeds.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from typing import Any, Awaitable, Callable

from drivers import registry
from edge import __version__
from edge.control.aggregates import CONSUMPTION_INTERVAL_S, VALIDATION_INTERVAL_S, Aggregator
from edge.control.cycle import ControlledAsset, Controller
from edge.runtime.cycle_clock import CycleClock
from edge.gridorders import SOURCE_PERSISTED, GridOperatorLink, GridOrders
from edge.runtime.health import CycleStats
from edge.control.order_store import OrderStore, OrderStoreError, StoredOrders, orders_path
from edge.config.profile import Profile
from edge.control.ratings import RatingsWatch
from edge.runtime.backoff import Backoff
from edge.runtime.sdnotify import SystemdNotifier
from edge.control.setpoints import iso_time
from edge.uplink.spool import Spool
from edge.uplink.mqtt import Uplink

log = logging.getLogger("flexedge.daemon")

OUTBOX_LIMIT = 10_000  # messages waiting for the spool; beyond that telemetry is dropped (counted)
RELEASE_GRACE_S = 1.0  # on shutdown, time given to drivers to release their devices


class Gateway:
    def __init__(
        self,
        profile: Profile,
        *,
        aggregate_intervals_s: tuple[float, float] = (CONSUMPTION_INTERVAL_S, VALIDATION_INTERVAL_S),
    ):
        """``aggregate_intervals_s`` (consumption, validation) is for tests: the contract is 1 and 15 min."""
        self.profile = profile
        self.stats = CycleStats()
        self.notifier = SystemdNotifier()
        self.outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.dropped_outbox = 0
        self.assets: list[ControlledAsset] = []
        # One clock for the site: the control ticks, and the polls that land just before them.
        self.clock = CycleClock(profile.control.cycle_s)
        registry.prepare_site(profile)  # the hubs drivers share, e.g. the chargers' one central system
        for asset in profile.assets:
            driver = registry.create_driver(asset, profile.control.cycle_s, self.emit_event, clock=self.clock)
            self.assets.append(
                ControlledAsset(
                    id=asset.id,
                    kind=asset.kind,
                    driver_name=asset.driver,
                    controllable=asset.controllable and asset.kind != "meter",
                    connection_point=getattr(asset, "connection_point", False),
                    driver=driver,
                    ramp_kw_per_s=asset.ramp_kw_per_s,
                    merit=(asset.priority, asset.dispatch_cost_per_mwh),
                )
            )
        self.uplink: Uplink | None = None
        self.controller: Controller | None = None
        self.deie: GridOperatorLink | None = None  # with grid.deie: the grid operator's link (drivers/deie/)
        self.order_store: OrderStore | None = None  # with grid.deie: the operator's orders survive a restart
        self.aggregator = Aggregator(profile.site.id, *aggregate_intervals_s)
        self.aggregator_failures = 0
        # The profile's ratings against what each device states about itself (edge/control/ratings.py).
        self.ratings = RatingsWatch(zip(profile.assets, (a.driver for a in self.assets)), self.emit_event)

    # ------------------------------------------------------------- events

    def emit_event(self, event_type: str, asset_id: str | None, detail: dict[str, Any]) -> None:
        log.info("event %s%s %s", event_type, f" [{asset_id}]" if asset_id else "", detail)
        if event_type == "command_failed" and self.controller is not None:
            self.controller.step_soon()  # its share goes to the others now, or is an incapacity now
        payload = {"ts": iso_time(time.time()), "site_id": self.profile.site.id, "type": event_type,
                   "asset_id": asset_id, "detail": detail}
        self._enqueue("events", payload)

    def _enqueue(self, stream: str, payload: dict[str, Any]) -> None:
        if self.outbox.qsize() >= OUTBOX_LIMIT and stream == "telemetry":
            self.dropped_outbox += 1
            return
        self.outbox.put_nowait((stream, payload))

    def _publish_live(self, subtopic: str, payload: dict[str, Any]) -> None:
        if self.uplink is not None:
            self.uplink.publish_live(subtopic, payload)

    def _on_setpoint(self, raw: bytes) -> None:
        if self.controller is not None:
            self.controller.on_setpoint(raw)

    def _on_schedule(self, raw: bytes) -> None:
        if self.controller is not None:
            self.controller.on_schedule(raw)

    def _on_ev_preferences(self, raw: bytes) -> None:
        if self.controller is not None:
            self.controller.on_ev_preferences(raw)

    def _apply_grid_orders(self, orders: GridOrders) -> None:
        """The controller enforces the DEIE's orders; the store keeps them for the next start."""
        try:
            self.controller.apply_grid_orders(orders)
        finally:
            if self.order_store is not None:
                self.order_store.put(orders)

    def _restore_grid_orders(self, stored: StoredOrders | None, error: OrderStoreError | None) -> None:
        """Put the orders saved before the restart back in force, or report why they cannot be."""
        path = str(self.order_store.path)
        if error is not None:
            log.error("%s; starting as if the DEIE link had been lost (on_link_loss: %s)",
                      error, self.profile.grid.deie.on_link_loss)
            self.emit_event("grid_order_restore_failed", None, {"path": path, "error": str(error)})
            self.deie.assume_link_lost()
            return
        if stored is None or not stored.in_force:
            return
        orders = stored.orders
        log.warning("grid operator orders from before the restart back in force (given %s, %s): "
                    "export limit %s kW, disconnected %s, Q %s kvar, tan(phi) %s",
                    iso_time(stored.given_at_s), orders.source, orders.export_limit_kw, orders.disconnected,
                    orders.reactive_setpoint_kvar, orders.tan_phi)
        self.emit_event("grid_order_restored", None, {
            "export_limit_kw": orders.export_limit_kw, "disconnected": orders.disconnected,
            "reactive_setpoint_kvar": orders.reactive_setpoint_kvar, "tan_phi": orders.tan_phi,
            "source": orders.source, "given_at": iso_time(stored.given_at_s), "path": path,
        })
        self.deie.restore(orders.with_(source=SOURCE_PERSISTED),
                          link_loss_default=orders.source == "link_loss_default")

    # ---------------------------------------------------------------- run

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        profile = self.profile
        spool_cfg = profile.uplink.spool
        spool = await asyncio.to_thread(Spool, spool_cfg.path, int(spool_cfg.max_mb * 1024 * 1024))
        stored_orders, stored_orders_error = None, None
        if profile.grid.deie is not None:
            self.order_store = OrderStore(orders_path(spool_cfg.path), self.emit_event)
            try:
                stored_orders = await self.order_store.load()
            except OrderStoreError as error:  # never a reason not to start: reported below
                stored_orders_error = error
        birth = {
            "state": "online",
            "version": __version__,
            "site_id": profile.site.id,
            "assets": [{"id": a.id, "kind": a.kind, "driver": a.driver_name} for a in self.assets],
        }
        self.uplink = Uplink(profile, spool, self._on_setpoint, birth, self.emit_event,
                             on_message={"schedule": self._on_schedule, "ev/preferences": self._on_ev_preferences},
                             on_repaired=self.stats.count_repaired)
        self.controller = Controller(
            profile, self.assets, self._enqueue, self._publish_live, self.emit_event, self.stats,
            on_cycle=self._after_cycle, clock=self.clock,
        )
        tasks = [
            asyncio.create_task(self.uplink.run(), name="uplink"),
            asyncio.create_task(self._publisher(), name="publisher"),
            asyncio.create_task(self.stats.loop_lag.run(), name="loop-lag"),
            asyncio.create_task(self._supervise("cycle clock", self.clock.run), name="cycle-clock"),
        ]
        if profile.grid.deie is not None:
            self.deie = registry.create_grid_link(profile.grid.deie, self._apply_grid_orders, self.emit_event)
            # No await since the tasks above were created, and none before the drivers' tasks below:
            # the orders from before the restart are in force before any device hears a command.
            self._restore_grid_orders(stored_orders, stored_orders_error)
            tasks.append(asyncio.create_task(self._supervise("deie", self.deie.run), name="deie"))
        driver_tasks = [
            asyncio.create_task(self._supervise(f"driver {a.id}", a.driver.run), name=f"driver-{a.id}")
            for a in self.assets
        ]
        control_task = asyncio.create_task(self._supervise("controller", self.controller.run), name="controller")
        log.info(
            "flexedge %s: site %s, %d asset(s), cycle %.1f s, broker %s:%d",
            __version__, profile.site.id, len(self.assets), profile.control.cycle_s,
            profile.uplink.mqtt.host, profile.uplink.mqtt.port,
        )
        # Everything made so far (modules, profile, drivers, simulator-free state)
        # lives as long as the daemon: keep it out of the collector's full passes,
        # which otherwise scan it all, 45-60 ms on the loop several times a minute
        # at 500 chargers, and find nothing to free.
        gc.freeze()
        self.notifier.ready(f"site {profile.site.id}: {len(self.assets)} assets")
        self.emit_event("gateway_started", None, {"version": __version__, "assets": [a.id for a in self.assets]})
        try:
            await stop.wait()
        finally:
            self.notifier.stopping()
            log.info("stopping: releasing devices")
            control_task.cancel()
            if self.controller is not None:
                self.controller.stop()  # nothing may command a device again after the release below
            for asset in self.assets:
                if asset.commanded_kw is not None:
                    asset.driver.set_target_kw(None)
                    asset.commanded_kw = None
                if asset.commanded_kvar is not None:
                    asset.driver.set_target_kvar(None)
                    asset.commanded_kvar = None
            await asyncio.sleep(min(RELEASE_GRACE_S, profile.control.cycle_s))
            for task in driver_tasks:
                task.cancel()
            await asyncio.gather(control_task, *driver_tasks, return_exceptions=True)
            # the intervals in progress go out as partial: the next start reports the rest
            for stream, payload in self.aggregator.flush(time.time()):
                self._enqueue(stream, payload)
            await self._flush_outbox(timeout_s=2.0)
            # close() waits for PUBACKs in flight, publishes the shutdown status
            # and ends the uplink's run(); only then are the helpers cancelled.
            try:
                await asyncio.wait_for(self.uplink.close(), 3.0)
            except (asyncio.TimeoutError, Exception) as error:  # shutting down: report, do not hang
                log.warning("uplink close: %s", error or "timeout")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.order_store is not None:
                await self.order_store.flush(timeout_s=2.0)
            await asyncio.to_thread(spool.close)
            log.info("stopped")

    def _after_cycle(self) -> None:
        self.notifier.watchdog()
        self.ratings.check()  # cheap: only a driver whose ratings changed is judged
        telemetry = self.controller.last_telemetry if self.controller is not None else None
        if not telemetry:
            return
        site_voltage_v = self._site_voltage_v()
        if self.deie is not None:
            site = telemetry["site"]
            self.deie.report(site["p_kw"], site["q_kvar"], site_voltage_v)
        self._aggregate(telemetry, site_voltage_v)

    def _aggregate(self, telemetry: dict[str, Any], site_voltage_v: float | None) -> None:
        """Feed the cycle's telemetry to the aggregator; queue the intervals it closed (spooled by the publisher)."""
        image = self.controller.process_image  # the snapshot the cycle decided and reported from
        asset_voltages_v = {}
        for asset in self.assets:
            reading = image.get(asset.id)
            asset_voltages_v[asset.id] = reading.voltage_v if reading is not None and reading.online else None
        try:
            closed = self.aggregator.add(telemetry, site_voltage_v, asset_voltages_v, mono_s=time.monotonic())
        except Exception:  # noqa: BLE001 -- we run inside the control cycle: a bug here must not stop it
            self.aggregator_failures += 1
            if self.aggregator_failures in (1, 10) or self.aggregator_failures % 1000 == 0:
                log.exception("aggregator failed (%d times so far); control goes on", self.aggregator_failures)
            return
        for stream, payload in closed:
            self._enqueue(stream, payload)

    def _site_voltage_v(self) -> float | None:
        """The connection-point meter's voltage, else the first asset that measures one."""
        image = self.controller.process_image
        ordered = sorted(self.assets, key=lambda a: not a.connection_point)
        for asset in ordered:
            reading = image.get(asset.id)
            if reading is not None and reading.online and reading.voltage_v is not None:
                return reading.voltage_v
        return None

    async def _publisher(self) -> None:
        assert self.uplink is not None
        while True:
            stream, payload = await self.outbox.get()
            try:
                await self.uplink.publish(stream, payload)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not spool a %s message", stream)
            finally:
                self.outbox.task_done()

    async def _flush_outbox(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.outbox.join(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("%d message(s) not spooled at shutdown", self.outbox.qsize())

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run ``run`` forever; restart it with capped backoff and jitter if it fails."""
        backoff = Backoff(first_s=1.0, cap_s=30.0, jitter=(0.8, 1.2))
        while True:
            started = time.monotonic()
            try:
                await run()
                log.error("%s returned unexpectedly; restarting", name)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.exception("%s crashed; restarting", name)
                self.emit_event("task_crashed", None, {"task": name, "error": repr(error)[:300]})
            if time.monotonic() - started > 60:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay())


async def run_gateway(profile: Profile) -> None:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Gateway(profile).run(stop)
