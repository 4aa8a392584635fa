"""From a power target to the limit of a charging profile, and back.

Pure functions, so the minimum-current rule and the unit conversions are
testable without a charger.  A charger can deliver 0 or anything in
[min_kw, rated_kw]: a target in the gap between is rounded down to 0
(charging at the minimum would import more than the controller asked for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from drivers.ocpp.config import OcppCharger


@dataclass(frozen=True, slots=True)
class ChargeLimit:
    """A limit as sent on the wire, with the power it stands for."""

    value: float  # in ``unit``, per phase for amps
    unit: str  # "W" or "A"
    power_kw: float  # the charging power it allows (>= 0)
    phases: int


def limit_for_target(charger: OcppCharger, target_kw: float | None) -> ChargeLimit:
    """The limit that makes ``charger`` import at most ``-target_kw`` kW.

    ``target_kw`` follows the flexedge sign convention (import negative);
    positive targets mean "do not charge".  None relaxes to the full rating.
    Raises ValueError for a non-finite target.
    """
    if target_kw is None:
        charge_kw = charger.rated_kw
    else:
        if not math.isfinite(target_kw):
            raise ValueError(f"target_kw must be finite, got {target_kw}")
        charge_kw = min(max(-target_kw, 0.0), charger.rated_kw)
    if charge_kw + 1e-9 < charger.min_kw:
        charge_kw = 0.0
    volts_phases = charger.voltage_v * charger.phases
    if charger.limit_unit == "A":
        amps = charge_kw * 1000.0 / volts_phases
        amps = math.floor(amps) if charger.integer_limits else math.floor(amps * 10) / 10
        if 0 < amps < charger.min_current_a:  # rounding must not fall into the gap
            amps = 0.0
        return ChargeLimit(float(amps), "A", amps * volts_phases / 1000.0, charger.phases)
    watts = math.floor(charge_kw * 1000.0) if charger.integer_limits else math.floor(charge_kw * 10000) / 10
    return ChargeLimit(float(watts), "W", watts / 1000.0, charger.phases)


def needs_sending(previous: ChargeLimit | None, new: ChargeLimit, deadband_kw: float) -> bool:
    """Whether ``new`` differs enough from the limit in force to be worth a SetChargingProfile."""
    if previous is None or previous.unit != new.unit:
        return True
    if (previous.power_kw == 0) != (new.power_kw == 0):
        return True  # stopping or starting charging is never within a deadband
    return abs(previous.power_kw - new.power_kw) > deadband_kw
