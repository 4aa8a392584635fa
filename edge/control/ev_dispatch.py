"""EV chargers in the cycle beyond their band: plans handed to the chargers, the battery's
energy rules for bidirectional EVs, and the activation signal for chargers that follow one.

Mixed into ``edge.control.cycle.Controller``, whose state it uses:

- ``_send_ev_plans``: each charger's charging plan (edge/control/ev_sessions.py) goes to
  its driver as a ``PowerPlan`` whenever it is made again, None when the EV leaves, so a
  charger that loses the gateway keeps a sensible plan (an OCPP multi-period profile).
- ``_limit_ev_energy``: a bidirectional EV's range in the cycle's process image is narrowed
  to what its battery allows (edge/control/v2x.py): the minimum state of charge, the energy
  needed by departure, the maximum state of charge.  The band, the allocation, the telemetry
  and the grid operator's reports of the cycle all see the narrowed range.
- ``_dispatch_contexts``: baseline, band and the site's activation level for drivers that
  ask for them (an OCPP 2.1 charger that runs its own aFRR loop on AFRRSignal).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from edge.asset import AssetReading, DispatchContext, EvStatus, PowerPlan
from edge.config.functions import EvDefaults
from edge.control.ev_planner import SLOT_S, ChargingPlan
from edge.control.setpoints import iso_time
from edge.control.v2x import BatteryEnergy, energy_range

log = logging.getLogger("flexedge.ev")

V2X_DEFAULTS = EvDefaults()  # a site without an ev_charging section still keeps its EVs' batteries safe


def power_plan(plan: ChargingPlan, made_at_s: float) -> PowerPlan:
    """The charging plan as the driver takes it: its usable quarter hours, charging negative."""
    slots = []
    for start, usable, charge_kw in zip(plan.slot_start_s, plan.usable_s, plan.charge_kw):
        if usable <= 0:
            continue
        end = start + SLOT_S
        slots.append((start, end, -charge_kw))
    return PowerPlan(tuple(slots), made_at_s)


def battery_energy(ev: EvStatus, min_soc_pct: float, capacity_kwh: float | None, need: float | None,
                   departure_s: float | None, now_s: float) -> BatteryEnergy:
    """What is known of the battery: the car's own figures, and a floor at ``min_soc_pct`` where
    the state of charge and the capacity are known; the one that leaves least to give wins."""
    candidates = []
    if ev.energy_above_min_kwh is not None and math.isfinite(ev.energy_above_min_kwh):
        candidates.append(ev.energy_above_min_kwh)
    capacity = capacity_kwh if capacity_kwh is not None else ev.capacity_kwh
    if ev.soc_pct is not None and capacity is not None and math.isfinite(ev.soc_pct) and math.isfinite(capacity):
        candidates.append((ev.soc_pct - min_soc_pct) / 100.0 * capacity)
    above_min = min(candidates) if candidates else None
    if need is None and ev.energy_to_target_kwh is not None and math.isfinite(ev.energy_to_target_kwh):
        need = max(0.0, ev.energy_to_target_kwh)
    if departure_s is None:
        departure_s = ev.departure_s
    time_left = None if departure_s is None or not math.isfinite(departure_s) else departure_s - now_s
    return BatteryEnergy(above_min, ev.energy_below_max_kwh, need, time_left)


class EvDispatchMixin:
    # ------------------------------------------------------------ plans

    def _send_ev_plans(self, now: float) -> None:
        if self.ev is None or self._stopped:
            return
        sent: dict[str, ChargingPlan | None] = self._plans_sent
        for asset in self.assets:
            if asset.kind != "ev_charger" or not asset.controllable:
                continue
            session = self.ev.sessions.get(asset.id)
            plan = session.plan if session is not None else None
            if sent.get(asset.id) is plan:
                continue
            sent[asset.id] = plan
            asset.driver.set_plan(None if plan is None else power_plan(plan, now))

    # ----------------------------------------------------- battery energy

    def _limit_ev_energy(self, now: float, readings: dict[str, AssetReading]) -> None:
        """Narrow each bidirectional EV's range in ``readings`` (the cycle's image) in place."""
        defaults = self.profile.ev_charging or V2X_DEFAULTS
        info: dict[str, dict[str, Any]] = {}
        for asset in self.assets:
            reading = readings.get(asset.id)
            if asset.kind != "ev_charger" or reading is None or reading.ev is None or not reading.online:
                continue
            ev = reading.ev
            planned = self.ev.need_now(asset.id) if self.ev is not None else None
            need = departure = driver_min = None
            if planned is not None:
                need, departure, driver_min = planned
            min_soc = max(defaults.v2x_min_soc_pct, driver_min or 0.0)
            capacity = self._preferred_capacity(asset.id)
            p_min = reading.p_min_kw if reading.p_min_kw is not None else 0.0
            p_max = reading.p_max_kw if reading.p_max_kw is not None else 0.0
            if p_max <= 0 and not ev.bidirectional:
                info[asset.id] = {"min_soc_pct": None, "limited_by": None}
                continue
            energy = battery_energy(ev, min_soc, capacity, need, departure, now)
            narrowed = energy_range(min(p_min, p_max), p_max, energy, defaults.v2x_horizon_s)
            info[asset.id] = {"min_soc_pct": min_soc, "limited_by": narrowed.limited_by,
                              "need_kwh": energy.need_kwh}
            if (narrowed.p_min_kw, narrowed.p_max_kw) != (p_min, p_max):
                readings[asset.id] = dataclasses.replace(reading, p_min_kw=narrowed.p_min_kw, p_max_kw=narrowed.p_max_kw)
        self._ev_energy_info = info

    def _preferred_capacity(self, asset_id: str) -> float | None:
        session = self.ev.sessions.get(asset_id) if self.ev is not None else None
        prefs = session.preferences if session is not None else None
        value = prefs.get("battery_capacity_kwh") if prefs else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    # --------------------------------------------------- activation signal

    def _dispatch_contexts(self, allocation, bands) -> None:
        if self._stopped:
            return
        by_id = {b.asset_id: b for b in bands}
        activation = allocation.activation_kw
        band = allocation.band_up_kw if activation >= 0 else allocation.band_down_kw
        level = 0.0 if band <= 0 else max(-1.0, min(1.0, activation / band))
        for asset in self.assets:
            if not getattr(asset.driver, "wants_dispatch_context", False):
                continue
            asset_band = by_id.get(asset.id)
            if asset_band is None or not self.state.active:
                asset.driver.set_dispatch_context(None)
                continue
            asset.driver.set_dispatch_context(DispatchContext(
                baseline_kw=asset_band.baseline_kw,
                band_up_kw=max(0.0, asset_band.p_max_kw - asset_band.baseline_kw),
                band_down_kw=max(0.0, asset_band.baseline_kw - asset_band.p_min_kw),
                activation_level=level,
            ))

    # ---------------------------------------------------------- telemetry

    def _ev_telemetry(self, asset_id: str, reading: AssetReading, now: float) -> dict[str, Any] | None:
        """The charger's ``ev`` block (docs/mqtt-api.md), None without an EV."""
        ev = reading.ev
        if ev is None or not reading.online:
            return None
        info = self._ev_energy_info.get(asset_id, {})
        planned = self.ev.need_now(asset_id) if self.ev is not None else None
        departure = planned[1] if planned is not None else ev.departure_s
        need = planned[0] if planned is not None else ev.energy_to_target_kwh
        p_max = reading.p_max_kw if reading.p_max_kw is not None else 0.0
        p_min = reading.p_min_kw if reading.p_min_kw is not None else 0.0
        return {
            "bidirectional": ev.bidirectional,
            "soc_pct": _r(ev.soc_pct if ev.soc_pct is not None else reading.soc_pct),
            "departure": None if departure is None or not math.isfinite(departure) else iso_time(departure),
            "energy_to_departure_kwh": _r(need),
            "charge_max_kw": _r(max(0.0, -p_min)),
            "discharge_max_kw": _r(max(0.0, p_max)),
            "min_soc_pct": _r(info.get("min_soc_pct")),
            "limited_by": info.get("limited_by"),
            "operation_mode": ev.operation_mode,
            "energy_charged_kwh": _r(ev.energy_charged_kwh),
            "energy_discharged_kwh": _r(ev.energy_discharged_kwh),
        }


def _r(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 3)

