"""The control cycle: read the latest asset states, decide, write, publish.

One cycle every ``control.cycle_s`` on the monotonic clock, scheduled as
``t0 + k * cycle_s`` so it never drifts; a cycle that starts more than one
period late skips the missed ticks and counts them.  A setpoint is applied the
moment it is accepted (``on_setpoint``), not at the next tick; the tick
re-evaluates it against fresh readings every cycle.

Nothing here awaits a device: drivers are read through snapshots and commanded
through ``set_target_kw``, which never blocks (see edge/asset.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from edge.control.allocation import Allocation, AssetBand, allocate
from edge.control.fcr import FcrDroop
from edge.control.qu import QuDroop
from edge.control.ev_sessions import EvSessions
from edge.control.schedules import ScheduleBook, ScheduleDraft, ScheduleRejected, ScheduleValidator
from edge.asset import AssetDriver, AssetReading, EventSink, VoltVarCurve
from edge.runtime.backoff import Backoff
from edge.gridorders import NO_ORDERS, GridOrders, effective_export_limit_kw
from edge.runtime.health import CycleStats
from edge.config.profile import Profile
from edge.control.setpoints import Setpoint, SetpointRejected, SetpointValidator, iso_time

log = logging.getLogger("flexedge.control")

TARGET_DEADBAND_KW = 0.001  # a change smaller than this is not re-sent to a device
RELEASE_SETTLE_CYCLES = 5  # a released device is taken to be back at its own power after this long
RELEASE_SETTLE_MIN_S = 10.0
SCHEDULE_ON_LOOP_BYTES = 64 * 1024  # larger schedules are structure-checked in a worker thread
MAX_LARGE_SCHEDULES_IN_CHECK = 2  # more at once are refused "busy": the thread's queue stays short
REFUSED_RETRY_CAP_S = 30.0  # a device that keeps refusing is asked again at most this far apart

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


@dataclass(frozen=True, slots=True)
class Incapacity:
    """What the site cannot deliver now: the activation asked for, or the band committed to."""

    causes: tuple[str, ...]  # "band", "discrete_band", "export_limit", "import_limit", "grid_order", "committed_band_up", ...
    shortfall_kw: float  # activation asked for but not deliverable (kW, >= 0)
    band_shortfall_up_kw: float  # committed upward band not available
    band_shortfall_down_kw: float


@dataclass(frozen=True, slots=True)
class RefusedBand:
    """The assets counted at their measured power because they refused their target, and the band
    (kW, from their baselines) they would otherwise offer."""

    asset_ids: tuple[str, ...] = ()
    up_kw: float = 0.0
    down_kw: float = 0.0


@dataclass(frozen=True, slots=True)
class ReactiveShare:
    """A site reactive-power request shared across the assets that can follow it."""

    requested_kvar: float  # at the connection point, + over-excited (injecting)
    targets_kvar: dict[str, float]
    site_kvar: float  # predicted site reactive power with these targets


class Controller:
    def __init__(
        self,
        profile: Profile,
        assets: list[ControlledAsset],
        publish: Publish,
        publish_live: PublishLive,
        emit_event: EventSink,
        stats: CycleStats | None = None,
        on_cycle: Callable[[], None] | None = None,
    ):
        self.profile = profile
        self.assets = assets
        self.publish = publish
        self.publish_live = publish_live
        self.emit_event = emit_event
        self.stats = stats or CycleStats()
        self.on_cycle = on_cycle or (lambda: None)
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

    # ----------------------------------------------------------- setpoints

    def on_setpoint(self, raw: bytes) -> None:
        """Validate a setpoint from the uplink, ack it, and apply it at once."""
        now = time.time()
        band_up, band_down = self._band_now(now)
        try:
            setpoint = self.validator.validate(raw, now, band_up, band_down, self.state.setpoint)
        except Exception as error:  # noqa: BLE001 -- a validator bug refuses the message too, never applies it
            rejection = error if isinstance(error, SetpointRejected) else \
                SetpointRejected(None, self._intake_bug("setpoint", error))
            log.warning("setpoint %s rejected: %s", rejection.setpoint_id or "(no id)", rejection.reason)
            self.publish_live(
                "setpoint/ack",
                {"id": rejection.setpoint_id, "status": "rejected", "reason": rejection.reason, "ts": iso_time(now), "activation_kw": None},
            )
            self.emit_event("setpoint_rejected", None, {"id": rejection.setpoint_id, "reason": rejection.reason})
            return
        self.state.setpoint = setpoint
        self.state.last_setpoint_at = now
        if self.state.mode != "setpoint":
            log.info("setpoint %s in force: %+.3f kW", setpoint.id, setpoint.activation_kw)
        self.state.mode = "setpoint"
        self.publish_live(
            "setpoint/ack",
            {"id": setpoint.id, "status": "accepted", "reason": None, "ts": iso_time(now), "activation_kw": setpoint.activation_kw},
        )
        self.step(now)

    # ----------------------------------------------------------- schedules

    def on_schedule(self, raw: bytes) -> None:
        """Validate a schedule from the uplink, ack it, and put it in the book (docs/schedules.md).

        The structure of a large schedule (a week of 1-minute slots is about 0.1 s of CPU) is
        checked on a thread of its own, so the loop keeps its cadence; the rest, and the ack, on the loop.
        """
        if len(raw) > SCHEDULE_ON_LOOP_BYTES:
            if len(self._tasks) >= MAX_LARGE_SCHEDULES_IN_CHECK or self._stopped:
                self._schedule_refused(ScheduleRejected(None, f"busy: {len(self._tasks)} large schedules (over "
                                       f"{SCHEDULE_ON_LOOP_BYTES // 1024} KiB) are being checked; send it again later"))
                return
            task = asyncio.get_running_loop().create_task(self._on_large_schedule(raw))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            draft = self.schedule_validator.structure(raw)
        except Exception as error:  # noqa: BLE001 -- ScheduleRejected, or a validator bug: refused either way
            self._schedule_refused(error)
            return
        self._judge_schedule(draft)

    async def _on_large_schedule(self, raw: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            draft = await loop.run_in_executor(self._schedule_checker, self.schedule_validator.structure, raw)
        except Exception as error:  # noqa: BLE001 -- ScheduleRejected, or a validator bug: refused either way
            self._schedule_refused(error)
            return
        if not self._stopped:
            self._judge_schedule(draft)

    def _judge_schedule(self, draft: ScheduleDraft) -> None:
        now = time.time()
        try:
            schedule = self.schedule_validator.judge(draft, now, self.schedules)
            if schedule.kind == "baseline" and schedule.asset_id not in {a.id for a in self.assets if a.controllable}:
                raise ScheduleRejected(schedule.id, f"asset_id: no controllable asset {schedule.asset_id!r} on this site")
        except Exception as error:  # noqa: BLE001 -- ScheduleRejected, or a validator bug: refused either way
            self._schedule_refused(error, draft.kind)
            return
        self.schedules.add(schedule)
        log.info("schedule %s (%s) accepted: %d slots of %d s from %s", schedule.id, schedule.kind,
                 len(schedule.values), schedule.resolution_s, iso_time(schedule.start_s))
        self.publish_live("schedule/ack", {"id": schedule.id, "status": "accepted", "reason": None,
                                           "ts": iso_time(now), "kind": schedule.kind})
        self.step(now)

    def _schedule_refused(self, error: Exception, kind: str | None = None) -> None:
        rejection = error if isinstance(error, ScheduleRejected) else \
            ScheduleRejected(None, self._intake_bug("schedule", error))
        log.warning("schedule %s rejected: %s", rejection.schedule_id or "(no id)", rejection.reason)
        self.publish_live("schedule/ack", {"id": rejection.schedule_id, "status": "rejected",
                                           "reason": rejection.reason, "ts": iso_time(time.time()), "kind": kind})
        self.emit_event("schedule_rejected", None, {"id": rejection.schedule_id, "reason": rejection.reason})

    def on_ev_preferences(self, raw: bytes) -> None:
        """A driver's departure time and energy need for the EV at a charger (docs/schedules.md)."""
        now = time.time()
        if self.ev is None:
            asset_id, reason = None, "smart charging is off on this site (no ev_charging in the profile)"
        else:
            readings = {a.id: a.driver.reading() for a in self.assets}
            try:
                asset_id, reason = self.ev.on_preferences(raw, now, readings)
            except Exception as error:  # noqa: BLE001 -- a validator bug refuses the message, never applies it
                asset_id, reason = None, self._intake_bug("ev/preferences", error)
        self.publish_live("ev/preferences/ack", {"asset_id": asset_id, "status": "rejected" if reason else "accepted",
                                                 "reason": reason, "ts": iso_time(now)})
        if reason:
            log.warning("EV preferences for %s rejected: %s", asset_id, reason)
            self.emit_event("ev_preferences_rejected", asset_id, {"reason": reason})
            return
        self.step(now)

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

    def _intake_bug(self, topic: str, error: Exception) -> str:
        """An unexpected failure while validating an inbound message: counted, logged, and the reason for its ack."""
        self.intake_failures += 1
        if self.intake_failures in (1, 10) or self.intake_failures % 1000 == 0:
            log.error("validating a message on %s failed (%d so far); it is rejected", topic, self.intake_failures,
                      exc_info=error)
        return f"internal error while validating ({type(error).__name__}); the message was not applied"

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
        t0 = time.monotonic()
        tick = 0
        while True:
            tick += 1
            deadline = t0 + tick * cycle_s
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
            self.step(now)
            self.last_telemetry = self.telemetry(now)
            self.publish("telemetry", self.last_telemetry)
            self.stats.record(duration_s=time.monotonic() - started, lateness_s=lateness_s)
            self.on_cycle()

    def step(self, now: float) -> Allocation:
        """Decide and write: the heart of the cycle, also run when a setpoint arrives."""
        state = self.state
        mono = time.monotonic()
        dt = 0.0 if state.last_step_mono is None else max(0.0, mono - state.last_step_mono)
        state.last_step_mono = mono
        readings = {a.id: a.driver.reading() for a in self.assets}
        self._track_online(readings)

        self.schedules.expire(now)
        self._planned_kw = self._planned_baselines(now, readings)
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

    def _requested_activation(self, now: float, dt: float) -> tuple[float, float | None]:
        """(activation kW, site power kW or None): what the VPP asks for now.

        A valid real-time setpoint first; else a schedule in force (an
        ``activation`` value, or a ``site_power`` value that the caller turns
        into an activation once it knows the site's baseline); else the
        fallback ramp to zero after a setpoint ends; else nothing.
        """
        state = self.state
        control = self.profile.control
        setpoint = state.setpoint
        if setpoint is not None:
            reason = None
            if now >= setpoint.expires_at:
                reason = "expired"
                self.emit_event("setpoint_expired", None, {"id": setpoint.id, "expired_at": iso_time(setpoint.expires_at)})
            elif now - setpoint.received_at > control.setpoint_timeout_s:
                reason = "timeout"
            if reason is None:
                return setpoint.activation_kw, None
            state.setpoint = None
            state.mode = "fallback"
            state.fallback_activation_kw = setpoint.activation_kw
            log.warning("no valid setpoint in force (%s): activation ramps to zero unless a schedule is in force", reason)
            self.emit_event(
                "fallback",
                None,
                {"reason": reason, "setpoint_id": setpoint.id, "from_activation_kw": setpoint.activation_kw,
                 "ramp_kw_per_s": control.fallback.ramp_kw_per_s},
            )
        scheduled = self._scheduled(now)
        if scheduled is not None:
            schedule, value = scheduled
            if state.mode != "schedule" or state.schedule_id != schedule.id:
                log.info("schedule %s (%s) decides the activation", schedule.id, schedule.kind)
            state.mode, state.schedule_id = "schedule", schedule.id
            return (0.0, value) if schedule.kind == "site_power" else (value, None)
        state.schedule_id = None
        if state.mode == "schedule":
            state.mode = "idle"
            log.info("no schedule in force any more: devices released")
        if state.mode == "fallback":
            step = control.fallback.ramp_kw_per_s * dt
            value = state.fallback_activation_kw
            value = max(0.0, value - step) if value > 0 else min(0.0, value + step)
            state.fallback_activation_kw = value
            if value == 0.0:
                state.mode = "idle"
                log.info("fallback complete: activation zero, devices released")
            return value, None
        return 0.0, None

    def _planned_baselines(self, now: float, readings: dict[str, AssetReading]) -> dict[str, tuple[float, str]]:
        """Each asset's planned baseline now: a baseline schedule from the VPP first, else an EV's plan."""
        planned: dict[str, tuple[float, str]] = {}
        if self.ev is not None:
            chargers = [a.id for a in self.assets if a.kind == "ev_charger" and a.controllable]
            plans = self.ev.update(now, readings, chargers, self._ev_headroom(readings, chargers))
            planned.update((asset_id, (kw, "ev_plan")) for asset_id, kw in plans.items())
        for asset in self.assets:
            value = self.schedules.value_at(f"baseline:{asset.id}", now)
            if isinstance(value, float) and asset.controllable and readings[asset.id].online:
                planned[asset.id] = (value, "schedule")
        return planned

    def _ev_headroom(self, readings: dict[str, AssetReading], chargers: list[str]):
        """The import the site can take for EV charging in a future quarter hour: its import
        limit then (the profile's, tightened by a connection-limits schedule) less what the
        rest of the site imports now.  None without an import limit."""
        others_kw = 0.0
        for asset in self.assets:
            reading = readings[asset.id]
            if asset.id in chargers or asset.kind == "meter" or not reading.online or reading.p_kw is None:
                continue
            others_kw += reading.p_kw
        if self._meter is not None:
            meter = readings[self._meter.id]
            if meter.online and meter.p_kw is not None:
                charging = sum(readings[c].p_kw or 0.0 for c in chargers if readings[c].online)
                others_kw = meter.p_kw - charging
        profile_import = self.profile.grid.import_limit_kw

        def headroom_kw(start_s: float, end_s: float) -> float | None:
            limit, _ = self.schedules.grid_limits_kw(start_s, profile_import, None)
            return None if limit is None else limit + others_kw  # + export of the rest adds room

        return headroom_kw

    def _scheduled(self, now: float):
        """(schedule, value) of the activation or site-power schedule deciding now, or None.

        For a site-power schedule the value is the scheduled site power (asked
        with a baseline of 0; the caller subtracts the real one)."""
        value, schedule = self.schedules.scheduled_activation_kw(now, 0.0)
        return None if schedule is None or value is None else (schedule, value)

    def _bands(self, readings: dict[str, AssetReading], freeze: bool) -> tuple[list[AssetBand], float]:
        bands: list[AssetBand] = []
        measured_in_bands = 0.0
        uncontrolled = 0.0
        refused: list[str] = []
        refused_up_kw = refused_down_kw = 0.0
        for asset in self.assets:
            reading = readings[asset.id]
            if asset.kind == "meter":
                continue
            usable = reading.online and reading.p_kw is not None and math.isfinite(reading.p_kw)
            if not (asset.controllable and usable):
                if usable:
                    uncontrolled += reading.p_kw
                continue
            settling = asset.released_baseline_kw is not None and time.monotonic() < asset.released_until_mono
            own_power = asset.released_baseline_kw if settling else reading.p_kw
            if freeze and asset.frozen_baseline_kw is None:
                asset.frozen_baseline_kw = own_power
            baseline = asset.frozen_baseline_kw if freeze else own_power
            if asset.id in self._planned_kw:  # the VPP's prosumption plan, or the EV's charging plan
                baseline = self._planned_kw[asset.id][0]
            p_min, p_max = self._range(asset, reading, baseline)
            if reading.command_refused:
                # It refused its last target (or never confirmed it): count on what it does now, no more;
                # the rest of its band goes to the others, and what none can take is an incapacity.
                held_min, held_max = _held_range(reading, p_min, p_max)
                refused_up_kw += max(0.0, p_max - max(held_max, baseline))
                refused_down_kw += max(0.0, min(held_min, baseline) - p_min)
                refused.append(asset.id)
                p_min, p_max = held_min, held_max
            if self.grid_orders.disconnected:
                # Decoupling ordered by the grid operator: nothing on site may produce.
                p_max = 0.0
                p_min = min(p_min, 0.0)
            ramp_kw = asset.ramp_kw_per_s * self.profile.control.cycle_s if asset.ramp_kw_per_s else None
            bands.append(AssetBand(asset.id, baseline, p_min, p_max, reading.p_gap_kw,
                                   present_kw=reading.p_kw, ramp_kw=ramp_kw, merit=asset.merit))
            measured_in_bands += reading.p_kw
        meter = self._meter
        if meter is not None:
            meter_reading = readings[meter.id]
            if meter_reading.online and meter_reading.p_kw is not None:
                uncontrolled = meter_reading.p_kw - measured_in_bands
        self._refused = RefusedBand(tuple(refused), refused_up_kw, refused_down_kw)
        return bands, uncontrolled

    @staticmethod
    def _range(asset: ControlledAsset, reading: AssetReading, baseline: float) -> tuple[float, float]:
        p_min = reading.p_min_kw if reading.p_min_kw is not None else 0.0
        p_max = reading.p_max_kw if reading.p_max_kw is not None else max(baseline, 0.0)
        if asset.kind == "pv":
            # A PV inverter cannot produce more than the sun gives: without the
            # device's available-power figure the baseline is the best estimate.
            available = reading.p_available_kw if reading.p_available_kw is not None else baseline
            p_min, p_max = max(0.0, p_min), max(0.0, min(p_max, available))
        if p_max < p_min:
            p_max = p_min
        return p_min, p_max

    def _band_now(self, now: float) -> tuple[float, float]:
        readings = {a.id: a.driver.reading() for a in self.assets}
        bands, _ = self._bands(readings, freeze=self.state.active)
        return sum(b.up_kw for b in bands), sum(b.down_kw for b in bands)

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

    def _fcr_activation(self, readings: dict[str, AssetReading], mono: float, now: float) -> float:
        """The FCR droop's activation from its frequency source; a bad measurement is an event."""
        fcr = self.fcr
        reading = readings.get(fcr.config.frequency_source)
        frequency = reading.frequency_hz if reading is not None and reading.online else None
        measured_at = mono - max(0.0, now - reading.read_at) if reading is not None and reading.online else None
        activation = fcr.update(frequency, mono, measured_at)
        self._function_state("fcr", fcr.measurement_problem if not fcr.measurement_ok else None,
                             fcr.config.frequency_source)
        return activation

    def _qu_request_kvar(self, readings: dict[str, AssetReading]) -> float | None:
        qu = self.qu
        reading = readings.get(qu.config.voltage_source)
        mono, now = time.monotonic(), time.time()
        voltage = reading.voltage_v if reading is not None and reading.online else None
        measured_at = mono - max(0.0, now - reading.read_at) if reading is not None and reading.online else None
        request = qu.update(voltage, mono, measured_at)
        self._function_state("q_u", qu.measurement_problem if not qu.measurement_ok else None, qu.config.voltage_source)
        return request

    def _function_state(self, function: str, problem: str | None, source: str) -> None:
        """``local_function`` events when a function's measurement goes bad and when it is good again."""
        previous = self._function_problems[function]
        if (problem is None) == (previous is None):
            self._function_problems[function] = problem
            return
        self._function_problems[function] = problem
        if problem is not None:
            log.warning("%s: measurement from %s unusable: %s", function, source, problem)
        self.emit_event("local_function", source, {
            "function": function, "measurement_ok": problem is None, "problem": problem,
        })

    def _share_reactive(self, readings: dict[str, AssetReading], allocation: Allocation) -> ReactiveShare | None:
        """The grid operator's Q or tan(phi) order, else the Q(U) request, shared pro rata to
        each asset's reactive rating.

        tan(phi) = Q / P at the connection point, both in the flexedge signs,
        with P the site power this cycle's targets give.  For the grid
        operator's orders, reactive power the controller cannot command
        (other assets; with a connection-point meter, all the site's) is
        measured and compensated, as for P; Q(U) asks the controlled assets
        for their curve's reactive power, so nothing is compensated.
        """
        orders = self.grid_orders
        compensate = True
        if orders.reactive_setpoint_kvar is not None:
            requested = orders.reactive_setpoint_kvar
        elif orders.tan_phi is not None:
            requested = orders.tan_phi * allocation.site_kw
        elif self.qu is not None and (q_u := self._qu_request_kvar(readings)) is not None:
            requested, compensate = q_u, False
        else:
            return None
        capable: dict[str, float] = {}
        running_curve_kvar = 0.0  # the reactive capability of the inverters that run the curve themselves
        measured_capable = uncontrolled = 0.0
        for asset in self.assets:
            reading = readings[asset.id]
            if asset.kind == "meter" or not reading.online:
                continue
            q_max = reading.q_max_kvar
            q_max = q_max if q_max is not None and math.isfinite(q_max) and q_max > 0 else None
            if not compensate and asset.id in self._curve_assets:
                running_curve_kvar += q_max or 0.0
                continue
            q_kvar = reading.q_kvar if reading.q_kvar is not None and math.isfinite(reading.q_kvar) else 0.0
            if asset.controllable and q_max is not None:
                capable[asset.id] = q_max
                measured_capable += q_kvar
            else:
                uncontrolled += q_kvar
        if self._meter is not None:
            meter = readings[self._meter.id]
            if meter.online and meter.q_kvar is not None and math.isfinite(meter.q_kvar):
                uncontrolled = meter.q_kvar - measured_capable
        total_capability = sum(capable.values())
        if not compensate:
            uncontrolled = 0.0
            if running_curve_kvar > 0:  # the inverters that run the curve deliver their part of it
                requested *= total_capability / (total_capability + running_curve_kvar)
        wanted = min(max(requested - uncontrolled, -total_capability), total_capability)
        targets = {asset_id: wanted * q_max / total_capability for asset_id, q_max in capable.items()}
        return ReactiveShare(requested, targets, uncontrolled + sum(targets.values()))

    def _inverter_curves(self, readings: dict[str, AssetReading]) -> frozenset[str]:
        """Q(U) in inverter mode: keep the curve in every inverter that can run it, and say which run it now.

        Only an inverter that reads back the curve as in force counts as running it; until then
        (and if it refuses the curve) it gets its share of the gateway's request like any asset.
        A grid operator's reactive-power or tan(phi) order switches the curves off: the order is
        then shared among all assets like any other, and the curves come back when it ends.
        """
        curve = self._inverter_curve
        if curve is None:
            return frozenset()
        orders = self.grid_orders
        order_in_force = orders.reactive_setpoint_kvar is not None or orders.tan_phi is not None
        running = set()
        for asset in self.assets:
            driver = asset.driver
            if not asset.controllable or not driver.volt_var_available:
                continue
            driver.set_volt_var(None if order_in_force else curve)
            if not order_in_force and driver.volt_var_in_force and readings[asset.id].online:
                running.add(asset.id)
        return frozenset(running)

    def _write_reactive(self, share: ReactiveShare | None) -> None:
        if self._stopped:
            return
        for asset in self.assets:
            target = share.targets_kvar.get(asset.id) if share is not None else None
            if _changed(asset.commanded_kvar, target):
                asset.commanded_kvar = target
                asset.driver.set_target_kvar(target)

    def _incapacity(self, requested_kw: float, allocation: Allocation) -> Incapacity | None:
        """The shortfall to report, or None.  Ramping toward an activation the band
        covers is not an incapacity: the assets are on their way."""
        control = self.profile.control
        threshold = control.incapacity_threshold_kw
        causes: list[str] = []
        deliverable = min(max(requested_kw, -allocation.band_down_kw), allocation.band_up_kw)
        if allocation.limited_by in ("export_limit", "import_limit", "discrete_band"):
            deliverable = allocation.activation_kw
        shortfall = abs(requested_kw - deliverable)
        if shortfall > threshold:
            cause = allocation.limited_by or "band"
            if cause == "export_limit" and self.grid_orders.active:
                cause = "grid_order"
            refused = self._refused
            lost_kw = refused.up_kw if requested_kw > deliverable else refused.down_kw
            if cause == "band" and lost_kw > threshold:
                # the band the refusing devices took with them explains all of it, or part
                causes.extend(("command_refused",) if lost_kw >= shortfall - threshold else (cause, "command_refused"))
            else:
                causes.append(cause)
        else:
            shortfall = 0.0
        short_up = short_down = 0.0
        if control.committed_band_up_kw is not None and allocation.band_up_kw < control.committed_band_up_kw - threshold:
            short_up = control.committed_band_up_kw - allocation.band_up_kw
            causes.append("committed_band_up")
        if control.committed_band_down_kw is not None and allocation.band_down_kw < control.committed_band_down_kw - threshold:
            short_down = control.committed_band_down_kw - allocation.band_down_kw
            causes.append("committed_band_down")
        if not causes:
            return None
        return Incapacity(tuple(causes), shortfall, short_up, short_down)

    def _limited_by(self, allocation: Allocation | None) -> str | None:
        if allocation is None:
            return None
        incapacity = self.state.incapacity
        if incapacity is not None and incapacity.causes[:1] == ("command_refused",):
            return "command_refused"
        return allocation.limited_by

    def _incapacity_events(self, incapacity: Incapacity | None) -> None:
        """``incapacity`` at once when a shortfall starts or its causes change, and when it ends."""
        previous, self.state.incapacity = self.state.incapacity, incapacity
        if incapacity is None:
            if previous is not None:
                log.info("incapacity ended (was: %s)", ", ".join(previous.causes))
                self.emit_event("incapacity", None, {"state": "ended", "causes": list(previous.causes)})
            return
        if previous is not None and previous.causes == incapacity.causes:
            return
        allocation = self.state.allocation
        log.warning("incapacity: %s, shortfall %.1f kW", ", ".join(incapacity.causes), incapacity.shortfall_kw)
        self.emit_event("incapacity", None, {
            "state": "started" if previous is None else "changed",
            "causes": list(incapacity.causes),
            "shortfall_kw": round(incapacity.shortfall_kw, 3),
            "band_shortfall_up_kw": round(incapacity.band_shortfall_up_kw, 3),
            "band_shortfall_down_kw": round(incapacity.band_shortfall_down_kw, 3),
            "requested_kw": round(self.state.last_requested_kw, 3),
            "refusing_assets": list(self._refused.asset_ids),
            "band_up_kw": round(allocation.band_up_kw, 3) if allocation else None,
            "band_down_kw": round(allocation.band_down_kw, 3) if allocation else None,
        })

    def _limit_events(self, allocation: Allocation, now: float) -> None:
        kind = allocation.limited_by if allocation.limited_by in ("export_limit", "import_limit") else None
        if allocation.limit_violation_kw > 0:
            kind = kind or "limit_violation"
        if kind != self.state.limit_event:
            if kind:
                self.emit_event(
                    "grid_limit",
                    None,
                    {"limit": kind, "state": "reached", "requested_kw": round(allocation.requested_kw, 3),
                     "activation_kw": round(allocation.activation_kw, 3), "predicted_site_kw": round(allocation.site_kw, 3),
                     "violation_kw": round(allocation.limit_violation_kw, 3)},
                )
            else:
                self.emit_event("grid_limit", None, {"limit": self.state.limit_event, "state": "cleared"})
            self.state.limit_event = kind

    def _track_online(self, readings: dict[str, AssetReading]) -> None:
        for asset in self.assets:
            online = readings[asset.id].online
            if asset.was_online is not None and online != asset.was_online and not online:
                # The driver reported it; the controller forgets the command so
                # that a reconnecting device gets the current target again.
                asset.commanded_kw = None
                asset.commanded_kvar = None
            asset.was_online = online

    # ---------------------------------------------------------- telemetry

    def telemetry(self, now: float) -> dict[str, Any]:
        allocation = self.state.allocation
        readings = {a.id: a.driver.reading() for a in self.assets}
        targets = allocation.targets_kw if allocation else {}
        assets_out: dict[str, Any] = {}
        sum_p = sum_q = 0.0
        any_p = any_q = False
        socs = []
        site_baseline = 0.0
        for asset in self.assets:
            reading = readings[asset.id]
            baseline = baseline_method = None
            if asset.kind != "meter" and reading.online and reading.p_kw is not None:
                if asset.id in self._planned_kw:
                    baseline, baseline_method = self._planned_kw[asset.id]
                elif asset.frozen_baseline_kw is not None:
                    baseline, baseline_method = asset.frozen_baseline_kw, "frozen"
                else:
                    baseline, baseline_method = reading.p_kw, "measured"
            target = targets.get(asset.id) if asset.commanded_kw is not None else None
            reactive = self.state.reactive
            q_target = reactive.targets_kvar.get(asset.id) if reactive is not None and asset.commanded_kvar is not None else None
            band_up = band_down = 0.0
            if asset.id in targets and baseline is not None:
                p_min, p_max = _held_range(reading, *self._range(asset, reading, baseline))
                band_up, band_down = max(0.0, p_max - baseline), max(0.0, baseline - p_min)
            assets_out[asset.id] = {
                "kind": asset.kind,
                "online": reading.online,
                "degraded": reading.degraded,
                "p_kw": _round(reading.p_kw),
                "q_kvar": _round(reading.q_kvar),
                "baseline_kw": _round(baseline),
                "baseline_method": baseline_method,
                "setpoint_kw": _round(target),
                "activation_kw": _round(target - baseline if target is not None and baseline is not None else 0.0 if baseline is not None else None),
                "band_up_kw": _round(band_up),
                "band_down_kw": _round(band_down),
                "band_gap_kw": [_round(v) for v in reading.p_gap_kw] if reading.p_gap_kw and asset.id in targets else None,
                "soc_pct": _round(reading.soc_pct),
                "q_setpoint_kvar": _round(q_target),
            }
            if asset.kind != "meter":
                if reading.online and reading.p_kw is not None:
                    sum_p += reading.p_kw
                    any_p = True
                    site_baseline += baseline if baseline is not None else 0.0
                if reading.online and reading.q_kvar is not None:
                    sum_q += reading.q_kvar
                    any_q = True
                if reading.online and reading.soc_pct is not None:
                    socs.append(reading.soc_pct)
        site_p = sum_p if any_p else None
        site_q = sum_q if any_q else None
        meter_online = False
        if self._meter is not None:
            meter_reading = readings[self._meter.id]
            if meter_reading.online and meter_reading.p_kw is not None:
                meter_online = True
                # The meter sees uncontrolled load too: the site baseline is the
                # meter's power minus the activation the assets deliver.
                site_baseline = meter_reading.p_kw - (sum_p - site_baseline)
                site_p = meter_reading.p_kw
                site_q = meter_reading.q_kvar
        activation = allocation.activation_kw if allocation else 0.0
        return {
            "ts": iso_time(now),
            "site_id": self.profile.site.id,
            "cycle_s": self.profile.control.cycle_s,
            "mode": self.state.mode,
            "setpoint_id": self.state.setpoint.id if self.state.setpoint else None,
            "schedule_id": self.state.schedule_id,
            "site": {
                "p_kw": _round(site_p),
                "q_kvar": _round(site_q),
                "baseline_kw": _round(site_baseline if any_p or meter_online else None),
                "setpoint_kw": _round(site_baseline + activation if any_p or meter_online else None),
                "activation_requested_kw": _round(self.state.last_requested_kw),
                "activation_kw": _round(activation),
                "band_up_kw": _round(allocation.band_up_kw if allocation else 0.0),
                "band_down_kw": _round(allocation.band_down_kw if allocation else 0.0),
                "soc_pct": _round(sum(socs) / len(socs)) if socs else None,
                "online": any(r.online for r in readings.values()),
                "metered": meter_online,
                "limited_by": self._limited_by(allocation),
                "import_limit_kw": _round(self.state.limits_kw[0]),
                "export_limit_kw": _round(self.state.limits_kw[1]),
                "q_requested_kvar": _round(self.state.reactive.requested_kvar) if self.state.reactive else None,
                "q_setpoint_kvar": _round(self.state.reactive.site_kvar) if self.state.reactive else None,
            },
            "assets": assets_out,
            "grid_orders": {
                "export_limit_kw": self.grid_orders.export_limit_kw,
                "disconnected": self.grid_orders.disconnected,
                "reactive_setpoint_kvar": self.grid_orders.reactive_setpoint_kvar,
                "tan_phi": self.grid_orders.tan_phi,
                "source": self.grid_orders.source,
            },
            "functions": self._functions_telemetry(),
            "gateway": self.stats.snapshot(),
        }

    def _functions_telemetry(self) -> dict[str, Any]:
        fcr, qu = self.fcr, self.qu
        return {
            "fcr": None if fcr is None else {
                "frequency_hz": _round(fcr.frequency_hz), "deviation_mhz": _round(fcr.deviation_mhz),
                "target_kw": round(fcr.target_kw, 3), "activation_kw": round(fcr.activation_kw, 3),
                "measurement_ok": fcr.measurement_ok,
            },
            "q_u": None if qu is None else {
                "voltage_v": _round(qu.voltage_v), "v_pu": _round(qu.v_pu), "request_kvar": _round(qu.request_kvar),
                "measurement_ok": qu.measurement_ok, "mode": qu.config.mode,
                "inverter_curve_assets": sorted(self._curve_assets),
            },
        }


def _volt_var_curve(config) -> VoltVarCurve:
    """The profile's Q(U) curve for an inverter: v_pu as % of its nominal voltage, q_pct of its VarMax."""
    return VoltVarCurve(tuple((point.v_pu * 100.0, point.q_pct) for point in config.curve), config.response_time_s)


def _held_range(reading: AssetReading, p_min: float, p_max: float) -> tuple[float, float]:
    """The range to count on: a device that refused its target only at what it measures now."""
    if not reading.command_refused or reading.p_kw is None:
        return p_min, p_max
    held = min(max(reading.p_kw, p_min), p_max)
    return held, held


def _changed(previous: float | None, target: float | None) -> bool:
    """Whether a target (None: release) must be sent: it differs beyond the deadband."""
    if target is None or previous is None:
        return target is not previous
    return abs(target - previous) >= TARGET_DEADBAND_KW


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 3)
