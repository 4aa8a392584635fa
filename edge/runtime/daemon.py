"""The daemon: wires the profile's drivers, the controller and the uplink on one loop.

Every driver runs in its own supervised task: a driver that raises is logged,
reported upstream and restarted with capped backoff, while the control cycle
and the other drivers go on.  Telemetry and events pass through one ordered
outbox to the uplink, which spools each message before sending it; so do the
1-min consumption and 15-min validation aggregates (edge/control/aggregates.py), which
every cycle's telemetry feeds.

Two kinds of parts: those that live as long as the process (the spool, the uplink and
its MQTT session, the outbox and its publisher, the statistics, the aggregator, the
grid operator's order store, the local HTTP endpoint), and those built from the profile
(the cycle clock, the drivers, the controller, the DEIE link, the ratings watch), built
by the same code at start-up and on a reload (SIGHUP, :meth:`Gateway.reload`;
edge/runtime/reload.py says what a reload may change).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from pathlib import Path
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
from edge.local.health import SpoolWrites
from edge.local.server import LocalHttpServer
from edge.runtime.backoff import Backoff
from edge.runtime.logs import log_fields
from edge.runtime.reload import ProfileChanges, compare, read_for_reload
from edge.runtime.sdnotify import SystemdNotifier
from edge.control.setpoints import iso_time
from edge.uplink.spool import Spool
from edge.uplink.mqtt import Uplink

log = logging.getLogger("flexedge.daemon")

OUTBOX_LIMIT = 10_000  # messages waiting for the spool; beyond that telemetry is dropped (counted)
RELEASE_GRACE_S = 1.0  # on shutdown, time given to drivers to release their devices
RELOAD_WAIT_AT_STOP_S = 5.0  # a reload under way when the daemon stops: its bounded steps end first
SETTLE_MAX_S = 120.0  # the site counts as settled once every asset has been online, or this long after start


class Gateway:
    def __init__(
        self,
        profile: Profile,
        *,
        profile_path: str | Path | None = None,
        aggregate_intervals_s: tuple[float, float] = (CONSUMPTION_INTERVAL_S, VALIDATION_INTERVAL_S),
    ):
        """``profile_path``: the file a reload reads again (None: no reload).
        ``aggregate_intervals_s`` (consumption, validation) is for tests: the contract is 1 and 15 min."""
        self.profile = profile
        self.profile_path = Path(profile_path).absolute() if profile_path is not None else None
        # ---- for the life of the process
        self.stats = CycleStats()
        self.notifier = SystemdNotifier()
        self.outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.dropped_outbox = 0
        self.spool_writes = SpoolWrites()  # whether the spool takes writes, for /health
        # The local HTTP endpoint (docs/local.md): it reads this gateway, never the other way round.
        self.local_http = LocalHttpServer(self) if profile.local_http is not None else None
        self.uplink: Uplink | None = None
        self.order_store: OrderStore | None = None  # with grid.deie: the operator's orders survive a restart
        # The site id cannot change without a restart: the intervals in progress go on across a reload.
        self.aggregator = Aggregator(profile.site.id, *aggregate_intervals_s)
        self.aggregator_failures = 0
        self._reload_lock = asyncio.Lock()  # one reload at a time: SIGHUPs in a row wait for each other
        self._reloads: set[asyncio.Task] = set()
        self._running = False
        self._settle_by_mono: float | None = None  # until then, the collector's second freeze waits (_settled)
        # ---- built from the profile (again on a reload)
        # One clock for the site: the control ticks, and the polls that land just before them.
        self.clock = CycleClock(profile.control.cycle_s)
        self.assets: list[ControlledAsset] = self._build_assets(profile, kept={})
        self.controller: Controller | None = None
        self.deie: GridOperatorLink | None = None  # with grid.deie: the grid operator's link (drivers/deie/)
        # The profile's ratings against what each device states about itself (edge/control/ratings.py).
        self.ratings = RatingsWatch(zip(profile.assets, (a.driver for a in self.assets)), self.emit_event)
        self._site_tasks: dict[str, asyncio.Task] = {}  # "cycle-clock", "deie", "controller"
        self._driver_tasks: dict[str, asyncio.Task] = {}  # by asset id

    # ------------------------------------------------------------- events

    def emit_event(self, event_type: str, asset_id: str | None, detail: dict[str, Any]) -> None:
        fields = {"event": event_type, "asset": asset_id} if asset_id is not None else {"event": event_type}
        fields.update((f"detail_{key}" if key in ("event", "asset") else key, value) for key, value in detail.items())
        log_fields(log, logging.INFO, "", **fields)
        if event_type == "command_failed" and self.controller is not None:
            self.controller.step_soon()  # its share goes to the others now, or is an incapacity now
        payload = {"ts": iso_time(time.time()), "site_id": self.profile.site.id, "type": event_type,
                   "asset_id": asset_id, "detail": detail}
        if self.local_http is not None:
            self.local_http.note_event(payload)
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
            self.controller.on_setpoint(raw, apply_soon=True)

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

    # ------------------------------------------------- the parts built from the profile

    def _build_assets(self, profile: Profile, kept: dict[str, ControlledAsset]) -> list[ControlledAsset]:
        """The profile's assets, in its order: ``kept`` ones as they are (driver running), the others new."""
        registry.prepare_site(profile)  # the hubs drivers share, e.g. the chargers' one central system
        assets = []
        for asset in profile.assets:
            if asset.id in kept:
                assets.append(kept[asset.id])
                continue
            driver = registry.create_driver(asset, profile.control.cycle_s, self.emit_event, clock=self.clock)
            assets.append(ControlledAsset(
                id=asset.id,
                kind=asset.kind,
                driver_name=asset.driver,
                controllable=asset.controllable and asset.kind != "meter",
                connection_point=getattr(asset, "connection_point", False),
                driver=driver,
                ramp_kw_per_s=asset.ramp_kw_per_s,
                merit=(asset.priority, asset.dispatch_cost_per_mwh),
            ))
        return assets

    def _new_controller(self, profile: Profile) -> Controller:
        return Controller(profile, self.assets, self._enqueue, self._publish_live, self.emit_event, self.stats,
                          on_cycle=self._after_cycle, clock=self.clock)

    def _start_site_tasks(self) -> None:
        """A task for each part that has none yet: the clock, the DEIE link, each driver, the controller.

        No await in here: the grid operator's orders put in force before are in force
        before any driver task runs, so before any device hears a command."""
        def start(name: str, what: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task:
            return asyncio.create_task(self._supervise(what, run), name=name)

        if "cycle-clock" not in self._site_tasks:
            self._site_tasks["cycle-clock"] = start("cycle-clock", "cycle clock", self.clock.run)
        if self.deie is not None and "deie" not in self._site_tasks:
            self._site_tasks["deie"] = start("deie", "deie", self.deie.run)
        for asset in self.assets:
            if asset.id not in self._driver_tasks:
                self._driver_tasks[asset.id] = start(f"driver-{asset.id}", f"driver {asset.id}", asset.driver.run)
        self._site_tasks["controller"] = start("controller", "controller", self.controller.run)

    async def _stop_controller(self) -> None:
        """From now on nothing commands a device (the caller releases or hands them over)."""
        task = self._site_tasks.pop("controller", None)
        if task is not None:
            task.cancel()
        if self.controller is not None:
            self.controller.stop()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def _release(self, assets: list[ControlledAsset]) -> None:
        for asset in assets:
            if asset.commanded_kw is not None:
                asset.driver.set_target_kw(None)
                asset.commanded_kw = None
            if asset.commanded_kvar is not None:
                asset.driver.set_target_kvar(None)
                asset.commanded_kvar = None

    async def _stop_tasks(self, tasks: list[asyncio.Task]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _birth(self) -> dict[str, Any]:
        return {
            "state": "online",
            "version": __version__,
            "site_id": self.profile.site.id,
            "profile": {"sha256": self.profile.source_sha256, "version": self.profile.version},
            "assets": [{"id": a.id, "kind": a.kind, "driver": a.driver_name} for a in self.assets],
        }

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
        self.uplink = Uplink(profile, spool, self._on_setpoint, self._birth(), self.emit_event,
                             on_message={"schedule": self._on_schedule, "ev/preferences": self._on_ev_preferences},
                             on_repaired=self.stats.count_repaired)
        self.controller = self._new_controller(profile)
        tasks = [
            asyncio.create_task(self.uplink.run(), name="uplink"),
            asyncio.create_task(self._publisher(), name="publisher"),
            asyncio.create_task(self.stats.loop_lag.run(), name="loop-lag"),
        ]
        if self.local_http is not None:
            tasks.append(asyncio.create_task(self._supervise("local http", self.local_http.run), name="local-http"))
        if profile.grid.deie is not None:
            self.deie = registry.create_grid_link(profile.grid.deie, self._apply_grid_orders, self.emit_event)
            self._restore_grid_orders(stored_orders, stored_orders_error)
        self._start_site_tasks()
        log.info(
            "flexedge %s: site %s, %d asset(s), cycle %.1f s, broker %s:%d, profile %s (sha256 %s)",
            __version__, profile.site.id, len(self.assets), profile.control.cycle_s,
            profile.uplink.mqtt.host, profile.uplink.mqtt.port, profile.version or "without version",
            (profile.source_sha256 or "none")[:12],
        )
        # Everything made so far (modules, profile, drivers, simulator-free state)
        # lives as long as the daemon: keep it out of the collector's full passes,
        # which otherwise scan it all, 45-60 ms on the loop several times a minute
        # at 500 chargers, and find nothing to free.
        gc.freeze()
        self._settle_by_mono = time.monotonic() + SETTLE_MAX_S
        self.notifier.ready(f"site {profile.site.id}: {len(self.assets)} assets")
        self.emit_event("gateway_started", None, {"version": __version__, "assets": [a.id for a in self.assets]})
        self._running = True
        try:
            await stop.wait()
        finally:
            self._running = False
            self.notifier.stopping()
            await self._end_reloads()
            log.info("stopping: releasing devices")
            await self._stop_controller()  # nothing may command a device again after the release below
            self._release(self.assets)
            await asyncio.sleep(min(RELEASE_GRACE_S, self.profile.control.cycle_s))
            await self._stop_tasks(list(self._driver_tasks.values()))
            self._driver_tasks.clear()
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
            await self._stop_tasks(tasks + list(self._site_tasks.values()))
            self._site_tasks.clear()
            if self.order_store is not None:
                await self.order_store.flush(timeout_s=2.0)
            await asyncio.to_thread(spool.close)
            log.info("stopped")

    # ------------------------------------------------------------- reload

    def request_reload(self) -> None:
        """SIGHUP: reload in a task of its own; reloads run one after the other."""
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> str:
        """Read the profile file again and swap it in, or keep the one in force and say why.

        Returns what happened: ``reloaded``, ``unchanged``, ``failed`` (the file is invalid or
        names a file that cannot be used), ``refused`` (a change that needs a restart) or
        ``ignored`` (not running, or no file to read)."""
        async with self._reload_lock:
            if not self._running or self.profile_path is None:
                log.warning("reload ignored: %s", "no profile file" if self._running else "not running")
                return "ignored"
            self.notifier.reloading(f"reloading {self.profile_path}")
            outcome = "failed"
            try:
                outcome = await self._reload(self.profile_path)
            except Exception as error:  # noqa: BLE001 -- a bug in a reload must not stop the gateway
                log.exception("reload failed")
                self.emit_event("profile_reload_failed", None, {"path": str(self.profile_path),
                                                                "problems": [f"internal error: {error!r}"[:300]]})
            finally:
                self.notifier.ready(f"site {self.profile.site.id}: {len(self.assets)} assets ({outcome})")
            return outcome

    async def _reload(self, path: Path) -> str:
        read = await asyncio.to_thread(read_for_reload, path)
        old = self.profile
        if read.profile is None:
            log_fields(log, logging.ERROR, "profile reload failed, the profile in force stays: "
                       + "; ".join(read.problems), path=str(path))
            self.emit_event("profile_reload_failed", None, {"path": str(path), "problems": read.problems})
            return "failed"
        new = read.profile
        if new.source_sha256 is not None and new.source_sha256 == old.source_sha256:
            log_fields(log, logging.INFO, "profile reload: file unchanged, nothing to do", path=str(path),
                       sha256=new.source_sha256)
            return "unchanged"
        changes = compare(old, new)
        if changes.restart_keys:
            log_fields(log, logging.ERROR, "profile reload refused, the profile in force stays: "
                       f"{', '.join(changes.restart_keys)} changed, which needs a restart (systemctl restart flexedge)",
                       path=str(path), keys=changes.restart_keys)
            self.emit_event("profile_reload_refused", None, {"path": str(path), "keys": changes.restart_keys,
                                                             "sha256": new.source_sha256})
            return "refused"
        released = await self._swap(new, changes)
        detail = {"old_sha256": old.source_sha256, "new_sha256": new.source_sha256, "version": new.version,
                  "assets_added": changes.added, "assets_removed": changes.removed,
                  "assets_changed": changes.changed, "assets_released": released,
                  "sections_changed": changes.sections}
        self.emit_event("profile_reloaded", None, detail)
        return "reloaded"

    async def _swap(self, new: Profile, changes: ProfileChanges) -> list[str]:
        """Put ``new`` in force: the spool, the uplink, the outbox and the telemetry sequence stay; the
        drivers of unchanged assets go on; the controller, the clock (if the cycle changed) and the
        DEIE link (if its settings changed) are built again, by the code start-up uses.  Returns the
        ids of the assets released."""
        old, old_controller = self.profile, self.controller
        await self._stop_controller()
        leaving = set(changes.removed) | set(changes.changed)
        # Under a grid operator's order a changed asset is not released (it would produce without the
        # limit meanwhile): its new driver takes over the command in force.  A removed asset leaves our control.
        hand_over = old_controller is not None and old_controller.grid_orders.active
        released = [a for a in self.assets if a.id in changes.removed or (a.id in changes.changed and not hand_over)]
        if released:
            self._release(released)
            await asyncio.sleep(min(RELEASE_GRACE_S, old.control.cycle_s))
        await self._stop_tasks([self._driver_tasks.pop(asset_id) for asset_id in leaving if asset_id in self._driver_tasks])
        if new.control.cycle_s != old.control.cycle_s:  # every driver left with the old clock (compare())
            await self._stop_tasks([self._site_tasks.pop("cycle-clock")])
            self.clock = CycleClock(new.control.cycle_s)
        deie_changed = new.grid.deie != old.grid.deie
        if deie_changed and "deie" in self._site_tasks:
            await self._stop_tasks([self._site_tasks.pop("deie")])
        # From here to the tasks' start, no await: grid orders arriving meanwhile went to the old
        # controller (stopped, it commands nothing), whose orders the new one takes over.
        self.profile = new
        self.assets = self._build_assets(new, kept={a.id: a for a in self.assets if a.id not in leaving})
        self.ratings = RatingsWatch(zip(new.assets, (a.driver for a in self.assets)), self.emit_event)
        self.controller = self._new_controller(new)
        if old_controller is not None:
            _carry_over(old_controller, self.controller)
        if deie_changed:
            self.deie = registry.create_grid_link(new.grid.deie, self._apply_grid_orders, self.emit_event)
            orders = self.controller.grid_orders
            if orders.active or orders.reactive_setpoint_kvar is not None or orders.tan_phi is not None:
                self.deie.restore(orders.with_(source=SOURCE_PERSISTED),
                                  link_loss_default=orders.source == "link_loss_default")
        self._start_site_tasks()
        self.uplink.set_birth(self._birth())
        if released:
            log.warning("profile reload released %s (limits disabled) before starting their drivers again, if kept",
                        ", ".join(a.id for a in released))
        return [a.id for a in released]

    async def _end_reloads(self) -> None:
        """At stop: a reload not yet started is dropped; one under way ends first (its steps are bounded)."""
        for task in list(self._reloads):
            if not self._reload_lock.locked():
                task.cancel()
        try:
            await asyncio.wait_for(self._reload_lock.acquire(), RELOAD_WAIT_AT_STOP_S)
        except asyncio.TimeoutError:
            log.warning("a profile reload did not end within %.0f s; stopping anyway", RELOAD_WAIT_AT_STOP_S)
            for task in list(self._reloads):
                task.cancel()
            await asyncio.gather(*self._reloads, return_exceptions=True)

    # ---------------------------------------------------------- per cycle

    def _after_cycle(self) -> None:
        self.notifier.watchdog()
        if self._settle_by_mono is not None:
            self._settled()
        self.ratings.check()  # cheap: only a driver whose ratings changed is judged
        if self.local_http is not None:
            self.local_http.after_cycle()  # defers its work to the loop's next turn
        telemetry = self.controller.last_telemetry if self.controller is not None else None
        if not telemetry:
            return
        site_voltage_v = self._site_voltage_v()
        if self.deie is not None:
            site = telemetry["site"]
            self.deie.report(site["p_kw"], site["q_kvar"], site_voltage_v)
        self._aggregate(telemetry, site_voltage_v)

    def _settled(self) -> None:
        """Once the site has settled (every asset online, its links and sessions built), freeze
        the collector's view again: hundreds of charger links are built after the start's
        freeze, and full passes over them are 20-40 ms on the loop, finding nothing to free.
        Once only: what is frozen is never collected, so a freeze at every change would leak."""
        image = self.controller.process_image if self.controller is not None else {}
        if (image and all(reading.online for reading in image.values())) or time.monotonic() >= self._settle_by_mono:
            self._settle_by_mono = None
            gc.freeze()
            log.debug("site settled: %d objects kept out of the collector's passes", gc.get_freeze_count())

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
            self.spool_writes.started()
            try:
                await self.uplink.publish(stream, payload)
                self.spool_writes.succeeded()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.spool_writes.failed(error)
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


def _carry_over(old: Controller, new: Controller) -> None:
    """What the VPP and the grid operator asked for stays in force across a reload: the setpoint (or
    the fallback ramp, or the schedule deciding), the schedules, the replay memories, the grid orders.
    EV drivers' preferences do not (the chargers' sessions are read again from the drivers)."""
    for name in ("setpoint", "last_setpoint_at", "mode", "schedule_id", "fallback_activation_kw"):
        setattr(new.state, name, getattr(old.state, name))
    new.validator = old.validator
    new.validator.control = new.profile.control  # the ids seen stay; the new timing rules apply
    new.schedule_validator = old.schedule_validator
    new.schedules = old.schedules
    if new.ev is not None:
        new.ev.schedules = old.schedules
    new.grid_orders = old.grid_orders


async def run_gateway(profile: Profile, profile_path: str | Path | None = None) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the profile from ``profile_path``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(profile, profile_path=profile_path)
    loop.add_signal_handler(signal.SIGHUP, gateway.request_reload)
    await gateway.run(stop)
