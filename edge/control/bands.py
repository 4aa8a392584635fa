"""Modes and bands: the activation requested (setpoint, schedule, fallback, plus FCR),
the baselines (measured, frozen, planned) and each asset's band for the allocation
(docs/dispatch.md).  Mixed into ``edge.control.cycle.Controller``, whose state it uses.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge.control.allocation import AssetBand
from edge.asset import AssetReading
from edge.control.setpoints import iso_time

if TYPE_CHECKING:
    from edge.control.cycle import ControlledAsset

log = logging.getLogger("flexedge.control")


def held_range(reading: AssetReading, p_min: float, p_max: float) -> tuple[float, float]:
    """The range to count on: a device that refused its target only at what it measures now."""
    if not reading.command_refused or reading.p_kw is None:
        return p_min, p_max
    held = min(max(reading.p_kw, p_min), p_max)
    return held, held


@dataclass(frozen=True, slots=True)
class RefusedBand:
    """The assets counted at their measured power because they refused their target, and the band
    (kW, from their baselines) they would otherwise offer."""

    asset_ids: tuple[str, ...] = ()
    up_kw: float = 0.0
    down_kw: float = 0.0


class BandsMixin:
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
                held_min, held_max = held_range(reading, p_min, p_max)
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

    def _band_now(self, readings: dict[str, AssetReading]) -> tuple[float, float]:
        bands, _ = self._bands(readings, freeze=self.state.active)
        return sum(b.up_kw for b in bands), sum(b.down_kw for b in bands)

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
