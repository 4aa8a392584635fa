"""EV smart charging: one session's charging plan at 15-minute resolution, and the driver's preferences.

Pure: no I/O, no clock.  The controller (wired elsewhere) replans every slot
with the energy delivered so far and turns the current slot's planned power into
the charger's baseline; FRR activations and the grid operator's (DEIE) orders
then move the charger from that baseline as for any other asset, so the plan
always yields to them.

Planning.  Slots are the quarter hours of UTC epoch time (every time zone's
offset is a whole number of quarter hours, so they are local quarter hours too).
Slot 0 contains ``now``; the last slot contains the departure.  Only the part of
a slot inside [now, departure) is usable, so the first and last slots may be
partial.  In each slot the charger is off or runs between its minimum and its
cap, never in between; the cap is the least of the charger's maximum, the EV's
maximum (if known) and the power available in that slot (site or connection
limits; None = unlimited).  A slot whose cap is below the minimum is unusable.

Slots are filled cheapest first (equal prices: earliest first, so without a
tariff the EV charges as soon as possible; a slot without a price comes after
every priced one), each at its cap, until the need is met.  The last slot
filled takes the rest; if the rest is below that slot's minimum energy, the slot
runs at its minimum and the excess is taken back from the dearest slots already
filled, as far as their own minimum allows, and whatever cannot be taken back is
over-delivered (less than one slot at minimum power).  When even every usable
slot at its cap cannot deliver the need, the plan is every usable slot at its
cap and the shortfall (need - that energy) is reported with the reason.

Powers in a plan are charging powers, magnitudes >= 0 (``charge_kw``);
``ChargingPlan.site_power_kw_at`` gives the flexedge sign (import negative) for
the baseline: charging at 7 kW is -7 kW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from edge.asset import EvStatus  # noqa: F401  (the car's charging needs, used in annotations)
from edge.config.functions import MAX_EV_KWH, EvDefaults  # noqa: F401  (EvDefaults: the profile's section, used here)
from edge.control.setpoints import SetpointRejected, iso_time, parse_time

SLOT_S = 900.0  # 15 min, the smart-charging resolution (MAESHA IE-04-04)
MAX_PLAN_SLOTS = 8 * 96  # 8 days; a departure further out is planned as if it were then
ENERGY_EPSILON_KWH = 1e-6
MAX_EV_KW = 1000.0


class EvPreferencesRejected(Exception):
    """Driver preferences refused; ``reason`` names the field."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


PREFERENCE_FIELDS = frozenset({"departure", "energy_kwh", "target_soc_pct", "battery_capacity_kwh", "ev_max_kw",
                               "min_soc_pct"})


@dataclass(frozen=True, slots=True)
class EvSessionNeeds:
    """What one session needs, from the driver's preferences or the profile defaults."""

    departure_s: float  # epoch s
    # "driver" and "default": over the whole session (subtract what was delivered before
    # planning); "target_soc" and "ev": still needed now (see ``energy_is_remaining``).
    energy_kwh: float
    ev_max_kw: float | None  # the EV's own maximum charging power, if known
    departure_source: Literal["driver", "ev", "default"]
    energy_source: Literal["driver", "target_soc", "ev", "default"]
    min_soc_pct: float | None = None  # the driver's minimum state of charge for V2X, if given

    @property
    def energy_is_remaining(self) -> bool:
        """True when ``energy_kwh`` is what is still needed now (from a state of charge or the car)."""
        return self.energy_source in ("target_soc", "ev")


def _bounded(preferences: Mapping[str, Any], field: str, low: float, high: float, low_open: bool) -> float | None:
    value = preferences.get(field)
    if value is None:  # absent or null: not given
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvPreferencesRejected(f"{field}: must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise EvPreferencesRejected(f"{field}: must be finite, got {value}")
    if (value <= low if low_open else value < low) or value > high:
        bracket = "(" if low_open else "["
        raise EvPreferencesRejected(f"{field}: must be in {bracket}{low:g}, {high:g}], got {value:g}")
    return float(value)


def session_needs(
    preferences: Mapping[str, Any] | None,
    now_s: float,
    session_started_s: float,
    defaults: EvDefaults,
    soc_pct: float | None = None,
    car: "EvStatus | None" = None,
) -> EvSessionNeeds:
    """Validate the driver's preferences (None: none given) and fill the gaps from the car's
    charging needs (``car``: ISO 15118 NotifyEVChargingNeeds, through the charger), then from
    the defaults.  The driver's word comes first, the car's next, the profile's last.

    Preferences: ``departure`` (ISO 8601 with zone, or epoch s; in the future, within
    ``max_departure_after_h``), and at most one of ``energy_kwh`` or ``target_soc_pct``
    (which needs ``battery_capacity_kwh``, and the EV's present ``soc_pct`` to be of use:
    without it the default energy applies); ``ev_max_kw`` optionally.  A default departure
    that has already passed (a session longer than the default) rolls forward to the end
    of the next slot, so that the EV charges as soon as possible.
    """
    prefs: Mapping[str, Any] = {} if preferences is None else preferences
    if not isinstance(prefs, Mapping):
        raise EvPreferencesRejected(f"must be a JSON object, got {type(prefs).__name__}")
    unknown = set(prefs) - PREFERENCE_FIELDS
    if unknown:
        raise EvPreferencesRejected(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")

    departure_source: Literal["driver", "ev", "default"]
    car_departure_s = _car_value(car, "departure_s", now_s, now_s + defaults.max_departure_after_h * 3600)
    if prefs.get("departure") is not None:
        try:
            departure_s = parse_time(prefs["departure"], "departure")
        except SetpointRejected as error:
            raise EvPreferencesRejected(error.reason) from None
        if departure_s <= now_s:
            raise EvPreferencesRejected(f"departure: {iso_time(departure_s)} is already past")
        if departure_s > now_s + defaults.max_departure_after_h * 3600:
            raise EvPreferencesRejected(
                f"departure: {(departure_s - now_s) / 3600:.1f} h ahead, more than {defaults.max_departure_after_h:g} h"
            )
        departure_source = "driver"
    elif car_departure_s is not None:
        departure_s, departure_source = car_departure_s, "ev"
    else:
        departure_s = session_started_s + defaults.default_departure_after_h * 3600
        if departure_s <= now_s:
            departure_s = (math.floor(now_s / SLOT_S) + 2) * SLOT_S
        departure_source = "default"

    energy_kwh = _bounded(prefs, "energy_kwh", 0.0, MAX_EV_KWH, low_open=False)
    target_soc_pct = _bounded(prefs, "target_soc_pct", 0.0, 100.0, low_open=False)
    capacity_kwh = _bounded(prefs, "battery_capacity_kwh", 0.0, MAX_EV_KWH, low_open=True)
    ev_max_kw = _bounded(prefs, "ev_max_kw", 0.0, MAX_EV_KW, low_open=True)
    min_soc_pct = _bounded(prefs, "min_soc_pct", 0.0, 100.0, low_open=False)
    if ev_max_kw is None:
        ev_max_kw = _car_value(car, "max_charge_kw", 0.0, MAX_EV_KW)
    if energy_kwh is not None and target_soc_pct is not None:
        raise EvPreferencesRejected("give at most one of energy_kwh or target_soc_pct")
    if target_soc_pct is not None and capacity_kwh is None:
        raise EvPreferencesRejected("battery_capacity_kwh: needed with target_soc_pct")
    if capacity_kwh is not None and target_soc_pct is None:
        raise EvPreferencesRejected("battery_capacity_kwh: only used with target_soc_pct")

    energy_source: Literal["driver", "target_soc", "ev", "default"]
    car_energy_kwh = _car_value(car, "energy_to_target_kwh", 0.0, MAX_EV_KWH, clamp=True)
    if energy_kwh is not None:
        energy_source = "driver"
    elif target_soc_pct is not None and capacity_kwh is not None and soc_pct is not None and math.isfinite(soc_pct):
        energy_kwh = max(0.0, (target_soc_pct - min(max(soc_pct, 0.0), 100.0)) / 100.0 * capacity_kwh)
        energy_source = "target_soc"
    elif car_energy_kwh is not None:
        energy_kwh, energy_source = car_energy_kwh, "ev"
    else:
        energy_kwh = defaults.default_energy_kwh
        energy_source = "default"
    return EvSessionNeeds(departure_s, energy_kwh, ev_max_kw, departure_source, energy_source, min_soc_pct)


def _car_value(car: "EvStatus | None", name: str, low: float, high: float, clamp: bool = False) -> float | None:
    """A figure from the car's charging needs if it is usable: finite and in [low, high]
    (``clamp``: brought into it); otherwise None, and the next source applies."""
    value = getattr(car, name, None) if car is not None else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if clamp:
        return min(max(float(value), low), high)
    return float(value) if low < value <= high else None


# ------------------------------------------------------------------ planning


@dataclass(frozen=True, slots=True)
class ChargingPlan:
    slot_start_s: tuple[float, ...]  # epoch s, quarter hours; slot 0 contains the planning time
    usable_s: tuple[float, ...]  # part of each slot inside [now, departure)
    charge_kw: tuple[float, ...]  # charging power per slot, magnitude >= 0; 0 or in [min, cap]
    cap_kw: tuple[float, ...]  # the most each slot allows (0: unusable, cap below the charger's minimum)
    energy_needed_kwh: float
    expected_energy_kwh: float  # by departure, if the plan is followed
    max_energy_kwh: float  # every usable slot at its cap
    shortfall_kwh: float  # energy_needed - expected, 0 when the need is met
    reason: str | None  # why there is a shortfall; None when there is none
    expected_cost: float | None  # sum of energy x price; None when a slot used has no price

    def slot_index(self, t_s: float) -> int | None:
        if not self.slot_start_s:
            return None
        index = int(math.floor(t_s / SLOT_S) - math.floor(self.slot_start_s[0] / SLOT_S))
        return index if 0 <= index < len(self.slot_start_s) else None

    def charge_kw_at(self, t_s: float) -> float:
        """Planned charging power at ``t_s`` (magnitude; 0 outside the plan)."""
        index = self.slot_index(t_s)
        return 0.0 if index is None else self.charge_kw[index]

    def site_power_kw_at(self, t_s: float) -> float:
        """The same with the flexedge sign (import negative): the charger's baseline."""
        return -self.charge_kw_at(t_s)


def planning_slots(now_s: float, departure_s: float) -> list[tuple[float, float]]:
    """The slots a plan covers: [(slot start, slot end)], slot 0 containing ``now_s``.
    The caller builds ``prices`` and ``available_kw`` on this grid (e.g. edge.control.schedules.on_grid)."""
    if departure_s <= now_s:
        return []
    first = math.floor(now_s / SLOT_S)
    last = min(math.ceil(departure_s / SLOT_S), first + MAX_PLAN_SLOTS)
    return [(k * SLOT_S, (k + 1) * SLOT_S) for k in range(first, last)]


def _at(values: Sequence[float | None] | None, index: int) -> float | None:
    if values is None or index >= len(values):
        return None
    value = values[index]
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def plan_charging(
    now_s: float,
    departure_s: float,
    energy_needed_kwh: float,
    charger_min_kw: float,
    charger_max_kw: float,
    ev_max_kw: float | None = None,
    prices: Sequence[float | None] | None = None,
    available_kw: Sequence[float | None] | None = None,
) -> ChargingPlan:
    """Plan one session from ``now_s`` to ``departure_s`` (see the module docstring).

    ``prices`` and ``available_kw`` are per planning slot (index 0 = the slot containing
    ``now_s``; see ``planning_slots``); missing entries and None mean no price / no limit.
    ``available_kw`` is charging power available to this charger (a magnitude; <= 0 means none).
    """
    for name, value in (("now_s", now_s), ("departure_s", departure_s), ("energy_needed_kwh", energy_needed_kwh),
                        ("charger_min_kw", charger_min_kw), ("charger_max_kw", charger_max_kw)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if charger_min_kw < 0 or charger_max_kw < charger_min_kw:
        raise ValueError(f"need 0 <= charger_min_kw <= charger_max_kw, got {charger_min_kw:g}, {charger_max_kw:g}")
    if ev_max_kw is not None and not (math.isfinite(ev_max_kw) and ev_max_kw >= 0):
        raise ValueError(f"ev_max_kw must be finite and >= 0, got {ev_max_kw}")
    need_kwh = max(0.0, energy_needed_kwh)

    grid = planning_slots(now_s, departure_s)
    n = len(grid)
    device_max_kw = charger_max_kw if ev_max_kw is None else min(charger_max_kw, ev_max_kw)
    usable_s = [min(end, departure_s) - max(start, now_s) for start, end in grid]
    cap_kw: list[float] = []
    for i in range(n):
        available = _at(available_kw, i)
        cap = device_max_kw if available is None else min(device_max_kw, max(0.0, available))
        # A cap below the minimum cannot be run at: the slot is off.
        cap_kw.append(cap if cap > 0 and cap >= charger_min_kw - 1e-9 else 0.0)
    cap_kwh = [cap_kw[i] * usable_s[i] / 3600 for i in range(n)]
    min_kwh = [charger_min_kw * usable_s[i] / 3600 for i in range(n)]
    max_energy_kwh = sum(cap_kwh)

    def rank(i: int) -> tuple[int, float, int]:
        price = _at(prices, i)
        return (1, 0.0, i) if price is None else (0, price, i)

    energy_kwh = [0.0] * n
    chosen: list[int] = []
    remaining_kwh = need_kwh
    for j in sorted((i for i in range(n) if cap_kwh[i] > 0), key=rank):
        if remaining_kwh <= ENERGY_EPSILON_KWH:
            break
        given_back_kwh = 0.0
        if remaining_kwh >= cap_kwh[j] - ENERGY_EPSILON_KWH:
            take_kwh = cap_kwh[j]
        elif remaining_kwh >= min_kwh[j]:
            take_kwh = remaining_kwh
        else:
            # Below this slot's minimum: run it at the minimum and take the excess
            # back from the dearest slots already filled, down to their own minimum.
            take_kwh = min_kwh[j]
            excess_kwh = take_kwh - remaining_kwh
            for k in reversed(chosen):
                give_kwh = min(excess_kwh - given_back_kwh, energy_kwh[k] - min_kwh[k])
                if give_kwh > 0:
                    energy_kwh[k] -= give_kwh
                    given_back_kwh += give_kwh
                if excess_kwh - given_back_kwh <= ENERGY_EPSILON_KWH:
                    break
        energy_kwh[j] = take_kwh
        chosen.append(j)
        remaining_kwh += given_back_kwh - take_kwh

    charge_kw = []
    for i in range(n):
        power = energy_kwh[i] * 3600 / usable_s[i] if energy_kwh[i] > 0 else 0.0
        if power > 0:
            power = min(max(power, charger_min_kw), cap_kw[i])  # float dust must not leave [min, cap]
        charge_kw.append(power)
    expected_kwh = sum(energy_kwh)
    shortfall_kwh = need_kwh - expected_kwh
    shortfall_kwh = shortfall_kwh if shortfall_kwh > ENERGY_EPSILON_KWH else 0.0

    reason = None
    if shortfall_kwh > 0:
        reason = _shortfall_reason(need_kwh, max_energy_kwh, departure_s, now_s, n, usable_s,
                                   charger_min_kw, charger_max_kw, ev_max_kw, device_max_kw)
    cost = None
    if all(_at(prices, i) is not None for i in range(n) if energy_kwh[i] > 0):
        cost = sum(energy_kwh[i] * (_at(prices, i) or 0.0) for i in range(n) if energy_kwh[i] > 0)

    return ChargingPlan(
        slot_start_s=tuple(start for start, _ in grid),
        usable_s=tuple(usable_s),
        charge_kw=tuple(charge_kw),
        cap_kw=tuple(cap_kw),
        energy_needed_kwh=need_kwh,
        expected_energy_kwh=expected_kwh,
        max_energy_kwh=max_energy_kwh,
        shortfall_kwh=shortfall_kwh,
        reason=reason,
        expected_cost=cost,
    )


def _shortfall_reason(
    need_kwh: float, max_energy_kwh: float, departure_s: float, now_s: float, n: int, usable_s: list[float],
    charger_min_kw: float, charger_max_kw: float, ev_max_kw: float | None, device_max_kw: float,
) -> str:
    if n == 0:
        return f"departure {iso_time(departure_s)} has passed: nothing can be charged"
    if device_max_kw <= 0 or device_max_kw < charger_min_kw - 1e-9:
        return (f"the EV's maximum power ({device_max_kw:g} kW) is below the charger's minimum "
                f"({charger_min_kw:g} kW): it cannot charge")
    unlimited_kwh = device_max_kw * sum(usable_s) / 3600
    if unlimited_kwh < need_kwh - ENERGY_EPSILON_KWH:
        by = "the EV's" if ev_max_kw is not None and ev_max_kw < charger_max_kw else "the charger's"
        return (f"not enough time: {need_kwh:.2f} kWh needed by {iso_time(departure_s)}, but at most "
                f"{max_energy_kwh:.2f} kWh can be charged ({by} maximum {device_max_kw:g} kW"
                f"{', and site limits' if max_energy_kwh < unlimited_kwh - ENERGY_EPSILON_KWH else ''})")
    return (f"site limits: {need_kwh:.2f} kWh needed by {iso_time(departure_s)}, but the power available "
            f"allows at most {max_energy_kwh:.2f} kWh ({unlimited_kwh:.2f} kWh without the limits)")
