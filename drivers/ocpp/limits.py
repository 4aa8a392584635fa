"""From a power target to the limit of a charging profile, and back; the site's failsafe shares.

Pure functions, so the minimum-current rule and the unit conversions are
testable without a charger.  A charger can deliver 0 or anything in
[min_kw, rated_kw]: a target in the gap between is rounded down to 0
(charging at the minimum would import more than the controller asked for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from drivers.ocpp.config import OcppCharger


# A limit is rounded down to what the charger takes (0.1, or 1 with integer_limits), but a value a
# float's last bit below a step (16 A computed from 11.04 kW is 15.999999...) belongs to that step.
ROUNDING_SLACK = 1e-6


def round_down(value: float, integer: bool) -> float:
    """``value`` rounded down to a whole number (``integer``) or to one decimal, float dust forgiven."""
    if integer:
        return float(math.floor(value + ROUNDING_SLACK))
    return math.floor(value * 10 + ROUNDING_SLACK) / 10


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
        amps = round_down(amps, charger.integer_limits)
        if 0 < amps < charger.min_current_a:  # rounding must not fall into the gap
            amps = 0.0
        return ChargeLimit(float(amps), "A", amps * volts_phases / 1000.0, charger.phases)
    watts = round_down(charge_kw * 1000.0, charger.integer_limits)
    return ChargeLimit(float(watts), "W", watts / 1000.0, charger.phases)


def needs_sending(previous: ChargeLimit | None, new: ChargeLimit, deadband_kw: float) -> bool:
    """Whether ``new`` differs enough from the limit in force to be worth a SetChargingProfile."""
    if previous is None or previous.unit != new.unit:
        return True
    if (previous.power_kw == 0) != (new.power_kw == 0):
        return True  # stopping or starting charging is never within a deadband
    return abs(previous.power_kw - new.power_kw) > deadband_kw


def failsafe_shares(chargers: list[OcppCharger], import_limit_kw: float | None,
                    export_limit_kw: float | None) -> dict[str, tuple[float, float | None]]:
    """Each charger's failsafe (import kW, export kW or None), by asset id: its ``failsafe_kw``, else
    its share of the site's import limit in proportion to the chargers' ratings; the export limit is
    shared the same way among the chargers that may discharge, by their discharge ratings.  A
    charger with neither a ``failsafe_kw`` nor an import limit to share gets none."""
    total_kw = sum(c.rated_kw for c in chargers)
    bidirectional = {c.id: c.max_discharge_kw for c in chargers if c.may_discharge()}
    total_discharge_kw = sum(bidirectional.values())
    shares: dict[str, tuple[float, float | None]] = {}
    for charger in chargers:
        import_kw = charger.failsafe_kw
        if import_kw is None and import_limit_kw is not None and total_kw > 0:
            import_kw = import_limit_kw * charger.rated_kw / total_kw
        if import_kw is None:
            continue
        export_kw = None
        if export_limit_kw is not None and charger.id in bidirectional and total_discharge_kw > 0:
            export_kw = export_limit_kw * bidirectional[charger.id] / total_discharge_kw
        shares[charger.id] = (import_kw, export_kw)
    return shares
