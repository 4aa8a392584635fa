"""Smart charging in the control cycle: a charging plan for every EV plugged in.

A session starts when a charger reports an EV (its band reaches below 0) and
ends when the EV leaves.  Each session is planned with ``edge.control.ev_planner``
against the tariff schedule (``edge.control.schedules``): at the start, at every
quarter hour, and when the driver's preferences or the tariffs change.  The
plan's power for the current slot becomes the charger's baseline: the
controller commands it even when no activation is in force, and an FRR
activation or a grid order moves the charger from it as from any baseline.

Preferences arrive per charger on ``<prefix>/<site>/ev/preferences``:
``{"asset_id", "departure", "energy_kwh" | "target_soc_pct" + "battery_capacity_kwh",
"ev_max_kw"}`` (docs/schedules.md); what they leave out comes from the profile's
``ev_charging`` defaults.  Pure bookkeeping: no I/O, the caller passes the time.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from edge.asset import AssetReading, EventSink
from edge.uplink.intake import InboundRejected, bounded, check_model, excerpt, load_object
from edge.uplink.messages import EvPreferencesMessage
from edge.config.types import ID_PATTERN
from edge.control.ev_planner import (
    SLOT_S,
    ChargingPlan,
    EvDefaults,
    EvPreferencesRejected,
    EvSessionNeeds,
    plan_charging,
    planning_slots,
    session_needs,
)
from edge.control.schedules import ScheduleBook, on_grid, time_weighted_mean
from edge.control.setpoints import iso_time

log = logging.getLogger("flexedge.ev")


@dataclass
class EvSession:
    asset_id: str
    started_s: float
    preferences: dict[str, Any] | None = None
    delivered_kwh: float = 0.0
    last_sample_s: float | None = None
    plan: ChargingPlan | None = None
    needs: EvSessionNeeds | None = None  # what the plan was made for
    remaining_kwh: float | None = None  # still to be charged by departure, when planned
    delivered_at_plan_kwh: float = 0.0
    planned_slot: int | None = None  # the quarter hour the plan was made in
    planned_for: tuple[Any, ...] = field(default_factory=tuple)  # what the plan depended on


MAX_PREFERENCES_BYTES = 16 * 1024


class EvSessions:
    def __init__(self, defaults: EvDefaults, schedules: ScheduleBook, emit_event: EventSink):
        self.defaults = defaults
        self.schedules = schedules
        self.emit_event = emit_event
        self.sessions: dict[str, EvSession] = {}
        self._headroom_kw: Callable[[float, float], float | None] | None = None

    def on_preferences(self, raw: bytes, now_s: float, readings: dict[str, AssetReading]) -> tuple[str | None, str | None]:
        """Take a driver's preferences; (asset id, None) when accepted, (asset id or None, reason) when not."""
        try:
            payload = load_object(raw, MAX_PREFERENCES_BYTES)
        except InboundRejected as error:
            return None, error.reason
        asset_id = payload.pop("asset_id", None)
        if not (isinstance(asset_id, str) and re.fullmatch(ID_PATTERN, asset_id)):
            got = "nothing" if asset_id is None else excerpt(asset_id)
            return None, f"asset_id: required, the charger's asset id (an id of the site profile), got {got}"
        session = self.sessions.get(asset_id)
        if session is None:
            return asset_id, f"asset_id: no EV is plugged in at {asset_id!r}"
        reading = readings.get(asset_id)
        try:
            session_needs(payload, now_s, session.started_s, self.defaults, reading.soc_pct if reading else None,
                          reading.ev if reading else None)
        except EvPreferencesRejected as rejection:
            return asset_id, bounded(rejection.reason)
        try:
            # The contract's model has the last word on structure (types, ranges).
            check_model(EvPreferencesMessage, {"asset_id": asset_id, **payload})
        except InboundRejected as error:
            return asset_id, error.reason
        session.preferences = payload
        session.plan = None  # replanned at the next step
        return asset_id, None

    def update(self, now_s: float, readings: dict[str, AssetReading], chargers: list[str],
               headroom_kw: Callable[[float, float], float | None] | None = None) -> dict[str, float]:
        """Follow the sessions and return each planned charger's power for now (kW, negative: charging).

        ``headroom_kw(start_s, end_s)``: the import the site can still take for EV
        charging in that quarter hour under its import limit (None: unlimited); it
        is shared equally among the EVs plugged in when their plans are made.
        """
        planned: dict[str, float] = {}
        self._headroom_kw = headroom_kw
        tariff_key = tuple(s.id for s in self.schedules.in_force("tariff"))
        tariff_key += tuple(s.id for s in self.schedules.in_force("connection_limits"))
        for asset_id in chargers:
            reading = readings[asset_id]
            # A full bidirectional EV can have nothing left to charge and still be plugged in.
            plugged = reading.online and (reading.p_min_kw is not None and reading.p_min_kw < 0 or reading.ev is not None)
            session = self.sessions.get(asset_id)
            if not plugged:
                if session is not None:
                    del self.sessions[asset_id]
                    log.info("%s: EV left after %.2f kWh", asset_id, session.delivered_kwh)
                continue
            if session is None:
                session = self.sessions[asset_id] = EvSession(asset_id, now_s)
            self._meter(session, reading, now_s)
            slot = math.floor(now_s / SLOT_S)
            # The car's charging needs arriving or changing make a new plan too.
            key = tariff_key + (reading.ev.needs_at_s if reading.ev is not None else None,)
            if session.plan is None or session.planned_slot != slot or session.planned_for != key:
                self._plan(session, reading, now_s, slot, key)
            if session.plan is not None:
                planned[asset_id] = session.plan.site_power_kw_at(now_s)
        return planned

    def need_now(self, asset_id: str) -> tuple[float, float, float | None] | None:
        """(energy still needed now in kWh, departure epoch s, driver's min SoC %) of the session at
        ``asset_id``, from its last plan and what was delivered since; None without a planned session."""
        session = self.sessions.get(asset_id)
        if session is None or session.needs is None or session.remaining_kwh is None:
            return None
        need_kwh = max(0.0, session.remaining_kwh - (session.delivered_kwh - session.delivered_at_plan_kwh))
        return need_kwh, session.needs.departure_s, session.needs.min_soc_pct

    def _meter(self, session: EvSession, reading: AssetReading, now_s: float) -> None:
        """Net energy delivered so far, from the metered power between samples (a bidirectional EV
        that discharges takes energy back)."""
        if session.last_sample_s is not None and reading.p_kw is not None and math.isfinite(reading.p_kw):
            session.delivered_kwh += -reading.p_kw * max(0.0, now_s - session.last_sample_s) / 3600
        session.last_sample_s = now_s

    def _plan(self, session: EvSession, reading: AssetReading, now_s: float, slot: int, tariff_key) -> None:
        max_kw = max(0.0, -(reading.p_min_kw or 0.0))
        min_kw = -reading.p_gap_kw[0] if reading.p_gap_kw else 0.0
        try:
            needs = session_needs(session.preferences, now_s, session.started_s, self.defaults, reading.soc_pct,
                                  reading.ev)
        except EvPreferencesRejected as rejection:  # e.g. the departure given has passed: plan on the defaults
            log.warning("%s: preferences no longer usable (%s): planning on the defaults", session.asset_id, rejection.reason)
            session.preferences = None
            needs = session_needs(None, now_s, session.started_s, self.defaults, reading.soc_pct, reading.ev)
        grid = planning_slots(now_s, needs.departure_s)
        prices = None
        if grid and self.schedules.in_force("tariff"):
            slots = self.schedules.slots("tariff", grid[0][0], grid[-1][1])
            prices = on_grid(slots, grid[0][0], SLOT_S, len(grid), time_weighted_mean)
        available = None
        if grid and self._headroom_kw is not None:
            # An equal share of the site's headroom per EV: plans made one by one
            # must not each count on all of it.
            sharing = max(1, len(self.sessions))
            available = [None if (h := self._headroom_kw(start, end)) is None else max(0.0, h) / sharing
                         for start, end in grid]
        # Energy from a state of charge or from the car is what is still needed now; the driver's
        # or the default energy is for the whole session, less what was delivered.
        remaining_kwh = max(0.0, needs.energy_kwh if needs.energy_is_remaining else needs.energy_kwh - session.delivered_kwh)
        plan = plan_charging(now_s, needs.departure_s, remaining_kwh, min(min_kw, max_kw), max_kw, needs.ev_max_kw,
                             prices, available)
        first = session.plan is None and session.planned_slot is None
        session.plan, session.planned_slot, session.planned_for = plan, slot, tariff_key
        session.needs, session.remaining_kwh, session.delivered_at_plan_kwh = needs, remaining_kwh, session.delivered_kwh
        if plan.shortfall_kwh > 0:
            log.warning("%s: %.2f kWh short of the %.2f kWh needed by departure: %s", session.asset_id,
                        plan.shortfall_kwh, remaining_kwh, plan.reason)
        self.emit_event("ev_plan", session.asset_id, {
            "first": first,
            "departure": iso_time(needs.departure_s), "departure_source": needs.departure_source,
            "energy_needed_kwh": round(remaining_kwh, 3), "energy_source": needs.energy_source,
            "delivered_kwh": round(session.delivered_kwh, 3),
            "expected_energy_kwh": round(plan.expected_energy_kwh, 3), "shortfall_kwh": round(plan.shortfall_kwh, 3),
            "reason": plan.reason, "charge_kw_now": round(plan.charge_kw_at(now_s), 3),
            "expected_cost": None if plan.expected_cost is None else round(plan.expected_cost, 4),
        })

