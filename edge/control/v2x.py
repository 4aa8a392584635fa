"""What a bidirectional EV's battery allows: the charger's power range narrowed by energy.

The driver reports the range the charger and the car allow by power (``p_min_kw``
charging, ``p_max_kw`` discharging, edge/asset.py); only the controller knows the
driver's preferences, so the battery's energy rules are applied here, to the cycle's
process image, before the band is built:

- never below the minimum state of charge: the car's own V2X minimum (its
  ``evMinV2XEnergyRequest``), the driver's ``min_soc_pct`` on ``ev/preferences`` and the
  profile's ``ev_charging.v2x_min_soc_pct``, whichever leaves least to give;
- never so much discharge that the energy needed by departure can no longer be charged
  at the charger's maximum in the time left;
- never charging above the car's maximum state of charge.

Each rule must hold for any power in the band held for ``horizon_s`` (an aFRR activation
can last a quarter hour), not only for the next cycle: the range is what the VPP may
activate, so it must be deliverable for as long as the VPP may ask for it.  With no
figure for the battery's energy at all, nothing is discharged.

Pure: no I/O, no clock (the caller passes the time).  Powers in kW with the flexedge
sign (export positive: discharging is positive), energies in kWh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EPSILON_KW = 1e-9
DEPARTURE_NOW_H = 1e-9  # a time to departure below this (3.6 µs) is departure now: no division by it


@dataclass(frozen=True, slots=True)
class BatteryEnergy:
    """What is known about the battery's energy now; None: not known."""

    above_min_kwh: float | None  # can still be discharged before the minimum state of charge
    below_max_kwh: float | None  # can still be charged before the maximum state of charge
    need_kwh: float | None  # still to be charged by departure (>= 0)
    time_to_departure_s: float | None  # None: no departure known


@dataclass(frozen=True, slots=True)
class EnergyRange:
    p_min_kw: float
    p_max_kw: float
    limited_by: str | None  # "minimum_soc", "departure_energy", "maximum_soc", "energy_unknown" or None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def energy_range(p_min_kw: float, p_max_kw: float, energy: BatteryEnergy, horizon_s: float) -> EnergyRange:
    """Narrow [p_min_kw, p_max_kw] (the charger's and car's power limits) to what the battery
    allows for ``horizon_s``.  The result always satisfies p_min_kw' <= p_max_kw' and lies
    within the given range; a departure that cannot be met any more leaves charging at the
    maximum as the only choice."""
    if not (math.isfinite(p_min_kw) and math.isfinite(p_max_kw)) or p_min_kw > p_max_kw:
        raise ValueError(f"need a finite range p_min_kw <= p_max_kw, got [{p_min_kw}, {p_max_kw}]")
    if not (math.isfinite(horizon_s) and horizon_s >= 1.0):
        raise ValueError(f"horizon_s must be finite and at least 1 s, got {horizon_s}")
    hours = horizon_s / 3600.0
    low, high, why = p_min_kw, p_max_kw, None

    def cap_high(value: float, reason: str) -> None:
        nonlocal high, why
        if value < high - EPSILON_KW:
            high, why = value, reason

    above_min = _finite(energy.above_min_kwh)
    if above_min is None:
        cap_high(min(high, 0.0), "energy_unknown")
    else:
        cap_high(max(0.0, above_min) / hours, "minimum_soc")

    need, time_left_s = _finite(energy.need_kwh), _finite(energy.time_to_departure_s)
    if need is not None and time_left_s is not None and time_left_s > 0:
        max_charge_kw = max(0.0, -p_min_kw)
        # Running at P for the horizon (or until departure, if sooner) adds P x w to the need
        # (discharging) or takes it away (charging); what is left must fit into the time after
        # it at the maximum charge.
        window_h = min(hours, time_left_s / 3600.0)
        after_h = time_left_s / 3600.0 - window_h
        if window_h > DEPARTURE_NOW_H:
            cap_high((max_charge_kw * after_h - need) / window_h, "departure_energy")
        else:  # departure is now (a time left that rounds to nothing): no discharge, and what is needed at the maximum
            cap_high(0.0 if need <= 0 else p_min_kw, "departure_energy")

    below_max = _finite(energy.below_max_kwh)
    if below_max is not None:
        floor = -max(0.0, below_max) / hours
        if floor > low + EPSILON_KW:
            low = floor
            if why is None:
                why = "maximum_soc"

    high = min(max(high, p_min_kw), p_max_kw)
    low = min(max(low, p_min_kw), high)
    return EnergyRange(low, high, why)
