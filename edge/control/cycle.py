"""The control cycle: take the process image, decide, write, publish.

One cycle every ``control.cycle_s`` on the site's monotonic clock (edge/runtime/cycle_clock.py),
at ``t0 + k * cycle_s`` so it never drifts; a cycle that starts more than one
period late skips the missed ticks and counts them.  Polled devices are read just
before each tick; at the tick every asset's reading is taken once (the process
image), and the decision, the telemetry, the aggregates and the grid operator's
reports of that cycle all come from that one snapshot.  A setpoint is applied the
moment it is accepted (``on_setpoint``), not at the next tick; the tick
re-evaluates it against fresh readings every cycle.

Nothing here awaits a device: drivers are read through snapshots and commanded
through ``set_target_kw``, which never blocks (see edge/asset.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from edge.control.allocation import Allocation, allocate
from edge.control.fcr import FcrDroop
from edge.control.qu import QuDroop
from edge.control.ev_sessions import EvSessions
from edge.control.schedules import ScheduleBook, ScheduleValidator
from edge.asset import AssetDriver, AssetReading, EventSink
from edge.runtime.backoff import Backoff
from edge.runtime.cycle_clock import CycleClock
from edge.gridorders import NO_ORDERS, GridOrders, effective_export_limit_kw
from edge.runtime.health import CycleStats
from edge.config.profile import Profile
from edge.control.setpoints import Setpoint, SetpointValidator
from edge.control.bands import BandsMixin, RefusedBand
from edge.control.ev_dispatch import EvDispatchMixin
from edge.control.inbound import InboundMixin
from edge.control.incapacity import Incapacity, IncapacityMixin
from edge.control.reactive import ReactiveMixin, ReactiveShare, _volt_var_curve
from edge.control.telemetry import TelemetryMixin

log = logging.getLogger("flexedge.control")

TARGET_DEADBAND_KW = 0.001  # a change smaller than this is not re-sent to a device
RELEASE_SETTLE_CYCLES = 5  # a released device is taken to be back at its own power after this long
RELEASE_SETTLE_MIN_S = 10.0
REFUSED_RETRY_CAP_S = 30.0  # a device that keeps refusing is asked again at most this far apart
IMAGE_SLICE_ASSETS = 50  # the cycle reads its process image this many assets per loop turn

# Publishes a message on a spooled stream ("telemetry", "events") without blocking.
Publish = Callable[[str, dict[str, Any]], None]
# Sends a message that is not spooled (setpoint acks).
PublishLive = Callable[[str, dict[str, Any]], None]


@dataclass
class ControlledAsset:
    id: str
    kind: str
    driver_name: str
    controllable: bool
    connection_point: bool
    driver: AssetDriver
    ramp_kw_per_s: float | None = None  # None: reaches any target by the next cycle
    merit: tuple[float, float] = (100, 0.0)  # (priority, dispatch cost): merit order, lower first
    frozen_baseline_kw: float | None = None
    # After a release the device takes a while to return to its own power; a new
    # activation in that time starts from the baseline it had, not from a
    # reading still carrying the old activation.
    released_baseline_kw: float | None = None
    released_until_mono: float = 0.0
    commanded_kw: float | None = None  # the last target sent; None = released
    commanded_kvar: float | None = None  # the last reactive-power target sent; None = released
    was_online: bool | None = None
    # A device that refused its target is asked again to hold its power, paced by this backoff,
    # so that it is trusted again as soon as it accepts a command (docs/dispatch.md).
    refused_retry: Backoff = field(default_factory=lambda: Backoff(first_s=1.0, cap_s=REFUSED_RETRY_CAP_S))
    refused_retry_at_mono: float = 0.0
    trusted_since_mono: float | None = None  # taking its targets again since (after a refusal)


@dataclass
class ControlState:
    setpoint: Setpoint | None = None
    mode: str = "idle"  # "setpoint", "schedule", "fallback" or "idle"
    schedule_id: str | None = None  # the schedule deciding the activation, in mode "schedule"
    limits_kw: tuple[float | None, float | None] = (None, None)  # (import, export) in force this cycle
    fallback_activation_kw: float = 0.0
    last_requested_kw: float = 0.0
    active: bool = False  # baselines frozen: an activation or a limit is in force
    limit_event: str | None = None
    last_step_mono: float | None = None
    allocation: Allocation | None = None
    last_setpoint_at: float | None = None  # epoch s of the last accepted setpoint
    reactive: "ReactiveShare | None" = None  # the reactive-power order being enforced, if any
    incapacity: "Incapacity | None" = None  # the shortfall being reported, if any


class Controller(InboundMixin, BandsMixin, EvDispatchMixin, ReactiveMixin, IncapacityMixin, TelemetryMixin):
    """The control cycle's façade: intake (edge/control/inbound.py), modes and bands
    (bands.py), EV plans and batteries (ev_dispatch.py), reactive power (reactive.py),
    incapacity (incapacity.py) and telemetry (telemetry.py) are mixed in; the cycle itself,
    the writes and the grid orders are here."""

    def __init__(
        self,
        profile: Profile,
        assets: list[ControlledAsset],
        publish: Publish,
        publish_live: PublishLive,
        emit_event: EventSink,
        stats: CycleStats | None = None,
        on_cycle: Callable[[], None] | None = None,
        clock: CycleClock | None = None,
    ):
        self.profile = profile
        self.assets = assets
        self.publish = publish
        self.publish_live = publish_live
        self.emit_event = emit_event
        self.stats = stats or CycleStats()
        self.on_cycle = on_cycle or (lambda: None)
        self.clock = clock or CycleClock(profile.control.cycle_s)
        # The cycle's snapshot of every asset's reading, taken at the tick (the process image).
        self.process_image: dict[str, AssetReading] = {}
        self.state = ControlState()
        self.grid_orders: GridOrders = NO_ORDERS
        self.last_telemetry: dict[str, Any] | None = None
        self.validator = SetpointValidator(profile.control)
        self.intake_failures = 0  # inbound messages refused because validation itself failed (a bug)
        self._refused = RefusedBand()
        self._step_soon: asyncio.TimerHandle | None = None
        self._last_step_soon_mono = float("-inf")
        self._stopped = False
        self._tasks: set[asyncio.Task] = set()  # large schedules being checked in a thread
        # Its own single thread: large schedules wait for each other, not the spool's to_thread calls.
        self._schedule_checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="schedule-check")
        self._meter = next((a for a in assets if a.connection_point), None)
        functions = profile.functions
        self.fcr = FcrDroop(functions.fcr) if functions and functions.fcr else None
        self.qu = QuDroop(functions.q_u) if functions and functions.q_u else None
        # Q(U) in inverter mode: the curve for the inverters that can run it (model 705), and
        # which assets run it this cycle.
        self._inverter_curve = _volt_var_curve(functions.q_u) if self.qu and functions.q_u.mode == "inverter" else None
        self._curve_assets: frozenset[str] = frozenset()
        self._function_problems: dict[str, str | None] = {"fcr": None, "q_u": None}
        self.schedules = ScheduleBook()
        self.schedule_validator = ScheduleValidator()
        self.ev = EvSessions(profile.ev_charging, self.schedules, emit_event) if profile.ev_charging else None
        # Assets whose baseline is planned: (power now, "schedule" | "ev_plan").  They are
        # commanded to it even with no activation in force.
        self._planned_kw: dict[str, tuple[float, str]] = {}
        self._plans_sent: dict[str, Any] = {}  # the plan each charger's driver was last given
        self._ev_energy_info: dict[str, dict[str, Any]] = {}  # this cycle's battery rules per V2X charger

    # ------------------------------------------------------------- wake-up

    def step_soon(self) -> None:
        """Decide again on the next turn of the loop, not at the next tick: a device refused its
        target, and its share must go to the others (or be reported) within the same cycle.
        At most one such extra step per quarter cycle, so refusals cannot chain steps."""
        if self._stopped or self._step_soon is not None:
            return
        loop = asyncio.get_running_loop()
        delay_s = max(0.0, self._last_step_soon_mono + self.profile.control.cycle_s / 4 - time.monotonic())
        self._step_soon = loop.call_later(delay_s, self._step_now)

    def _step_now(self) -> None:
        self._step_soon = None
        if self._stopped:
            return
        self._last_step_soon_mono = time.monotonic()
        self.step(time.time())

    def stop(self) -> None:
        """No command to any device from now on (the daemon releases them next): a refusal, a
        setpoint, a schedule checked in a thread or a grid order arriving while it stops changes nothing."""
        self._stopped = True
        if self._step_soon is not None:
            self._step_soon.cancel()
            self._step_soon = None
        for task in self._tasks:
            task.cancel()
        self._schedule_checker.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------- grid orders

    def apply_grid_orders(self, orders: GridOrders) -> Allocation:
        """Put the grid operator's orders in force and act on them at once."""
        previous, self.grid_orders = self.grid_orders, orders
        allocation = self.step(time.time())
        if orders != previous:
            log.warning("grid operator orders now: export limit %s, disconnected %s (%s)",
                        orders.export_limit_kw, orders.disconnected, orders.source)
            self.emit_event("grid_order_applied", None, {
                "export_limit_kw": orders.export_limit_kw, "disconnected": orders.disconnected,
                "reactive_setpoint_kvar": orders.reactive_setpoint_kvar, "tan_phi": orders.tan_phi,
                "source": orders.source, "predicted_site_kw": round(allocation.site_kw, 3),
            })
        return allocation

    # --------------------------------------------------------------- cycle

    async def run(self) -> None:
        cycle_s = self.profile.control.cycle_s
        clock = self.clock
        tick = clock.upcoming_tick() - 1
        while True:
            tick += 1
            deadline = clock.tick_at(tick)
            delay = deadline - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            started = time.monotonic()
            lateness_s = started - deadline
            if lateness_s >= cycle_s:
                missed = int(lateness_s // cycle_s)
                tick += missed
                self.stats.missed_cycles += missed
                log.warning("control cycle %.0f ms late: %d cycle(s) skipped", lateness_s * 1000, missed)
            now = time.time()
            # Read, decide and write, report, then the bookkeeping: each waits one turn of the loop,
            # so that the links (an OCPP frame to forward, a device's answer) are served between
            # them rather than behind the whole cycle; each part is a few ms at 200 assets.
            image, work_s = await self._read_image()
            await asyncio.sleep(0)
            resumed = time.monotonic()
            self.step(now, image)
            self.process_image = image  # as decided on (the battery rules narrow it in place)
            work_s += time.monotonic() - resumed
            await asyncio.sleep(0)
            resumed = time.monotonic()
            self.last_telemetry = self.telemetry(now, image)
            self.publish("telemetry", self.last_telemetry)
            self.stats.record(duration_s=work_s + time.monotonic() - resumed, lateness_s=lateness_s)
            await asyncio.sleep(0)
            self.on_cycle()

    async def _read_image(self) -> tuple[dict[str, AssetReading], float]:
        """The cycle's process image, ``IMAGE_SLICE_ASSETS`` readings per loop turn (a reading is
        the driver's last known state, taken from memory; at hundreds of assets the whole image
        is a few ms), and the time the reading took, the turns between not counted."""
        image: dict[str, AssetReading] = {}
        assets, work_s = self.assets, 0.0
        for start in range(0, len(assets), IMAGE_SLICE_ASSETS):
            if start:
                await asyncio.sleep(0)
            began = time.monotonic()
            for asset in assets[start:start + IMAGE_SLICE_ASSETS]:
                image[asset.id] = asset.driver.reading()
            work_s += time.monotonic() - began
        return image, work_s

    def take_image(self) -> dict[str, AssetReading]:
        """Every asset's reading as it is now: one snapshot, taken once per tick."""
        return {a.id: a.driver.reading() for a in self.assets}

    def step(self, now: float, readings: dict[str, AssetReading] | None = None) -> Allocation:
        """Decide and write: the heart of the cycle, also run when a setpoint arrives.

        ``readings`` is the cycle's process image; outside the cycle (a setpoint, a grid
        order) the newest readings are taken."""
        state = self.state
        mono = time.monotonic()
        dt = 0.0 if state.last_step_mono is None else max(0.0, mono - state.last_step_mono)
        state.last_step_mono = mono
        if readings is None:
            readings = self.take_image()
        self._track_online(readings)

        self.schedules.expire(now)
        self._planned_kw = self._planned_baselines(now, readings)
        self._send_ev_plans(now)
        self._limit_ev_energy(now, readings)  # in place: the image carries the battery's limits
        requested, site_power_kw = self._requested_activation(now, dt)
        if self.fcr is not None:
            requested += self._fcr_activation(readings, mono, now)
        bands, uncontrolled_kw = self._bands(
            readings, freeze=requested != 0.0 or site_power_kw is not None or state.active)
        if site_power_kw is not None:  # a site-power schedule: the activation is what moves the site there
            requested += site_power_kw - (uncontrolled_kw + sum(b.baseline_kw for b in bands))
        grid = self.profile.grid
        import_limit_kw, export_limit_kw = self.schedules.grid_limits_kw(now, grid.import_limit_kw, grid.export_limit_kw)
        export_limit_kw = effective_export_limit_kw(export_limit_kw, self.grid_orders)
        state.limits_kw = (import_limit_kw, export_limit_kw)
        allocation_started = time.perf_counter()
        allocation = allocate(requested, bands, uncontrolled_kw, export_limit_kw, import_limit_kw,
                              strategy=self.profile.control.allocation)
        self.stats.record_allocation(time.perf_counter() - allocation_started)

        # Baselines stay frozen while an activation or a grid limit is in force.
        limit_binding = (allocation.limited_by in ("export_limit", "import_limit") or allocation.limit_violation_kw > 0
                         or self.grid_orders.active or site_power_kw is not None)
        now_active = requested != 0.0 or limit_binding or any(abs(allocation.targets_kw[b.asset_id] - b.baseline_kw) > TARGET_DEADBAND_KW for b in bands)
        if now_active and not state.active:
            for band in bands:
                asset = self._asset(band.asset_id)
                if asset.frozen_baseline_kw is None:
                    asset.frozen_baseline_kw = band.baseline_kw
        state.active = now_active
        if not now_active:
            settle_s = max(RELEASE_SETTLE_CYCLES * self.profile.control.cycle_s, RELEASE_SETTLE_MIN_S)
            for asset in self.assets:
                if asset.frozen_baseline_kw is not None:
                    asset.released_baseline_kw = asset.frozen_baseline_kw
                    asset.released_until_mono = mono + settle_s
                asset.frozen_baseline_kw = None

        self._write(allocation, release=not now_active, readings=readings)
        self._dispatch_contexts(allocation, bands)
        self._curve_assets = self._inverter_curves(readings)
        state.reactive = self._share_reactive(readings, allocation)
        self._write_reactive(state.reactive)
        self._limit_events(allocation, now)
        state.allocation = allocation
        state.last_requested_kw = requested
        self._incapacity_events(self._incapacity(requested, allocation))
        return allocation

    # ------------------------------------------------------------ helpers

    def _asset(self, asset_id: str) -> ControlledAsset:
        for asset in self.assets:
            if asset.id == asset_id:
                return asset
        raise KeyError(asset_id)

    def _write(self, allocation: Allocation, release: bool, readings: dict[str, AssetReading]) -> None:
        if self._stopped:
            return
        mono = time.monotonic()
        for asset in self.assets:
            if not asset.controllable or asset.kind == "meter":
                continue
            target = allocation.targets_kw.get(asset.id)
            if release:  # no activation: devices go back to their own behaviour, chargers to their plans
                target = target if asset.id in self._planned_kw else None
            if target is None and asset.id not in allocation.targets_kw and not release:
                continue  # offline: nothing to command
            if readings[asset.id].command_refused:
                # Only the paced retry goes out (its measured power moves with noise; a release may go
                # at once): a device that refuses is not sent a new target every time it reads different.
                asset.trusted_since_mono = None
                send = target is None and asset.commanded_kw is not None
                if target is not None and mono >= asset.refused_retry_at_mono:
                    asset.refused_retry_at_mono = mono + asset.refused_retry.next_delay()
                    send = True
            else:
                if asset.refused_retry.attempt:
                    # The backoff is forgotten only once the device has taken its targets for a while: one
                    # that accepts holding its power but refuses its share is then asked ever less often.
                    if asset.trusted_since_mono is None:
                        asset.trusted_since_mono = mono
                    elif mono - asset.trusted_since_mono >= REFUSED_RETRY_CAP_S:
                        asset.refused_retry.reset()
                        asset.refused_retry_at_mono = 0.0
                send = _changed(asset.commanded_kw, target)
            if send:
                asset.commanded_kw = target
                asset.driver.set_target_kw(target)

    def _write_reactive(self, share: ReactiveShare | None) -> None:
        if self._stopped:
            return
        for asset in self.assets:
            target = share.targets_kvar.get(asset.id) if share is not None else None
            if _changed(asset.commanded_kvar, target):
                asset.commanded_kvar = target
                asset.driver.set_target_kvar(target)

    def _track_online(self, readings: dict[str, AssetReading]) -> None:
        for asset in self.assets:
            online = readings[asset.id].online
            if asset.was_online is not None and online != asset.was_online and not online:
                # The driver reported it; the controller forgets the command so
                # that a reconnecting device gets the current target again.
                asset.commanded_kw = None
                asset.commanded_kvar = None
            asset.was_online = online


def _changed(previous: float | None, target: float | None) -> bool:
    """Whether a target (None: release) must be sent: it differs beyond the deadband."""
    if target is None or previous is None:
        return target is not previous
    return abs(target - previous) >= TARGET_DEADBAND_KW


