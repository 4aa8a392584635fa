"""Decode OCPP MeterValues (1.6, 2.0.1 and 2.1) into power, energy, current and SoC.

1.6 sends values as strings with a ``unit``; 2.0.1 as numbers with
``unit_of_measure`` (unit and a power-of-ten multiplier).  1.6 numbers may
arrive as Decimal.  Missing measurand means Energy.Active.Import.Register
(all versions).  Values that are not finite numbers are skipped.  A bidirectional
charger reports what it discharges as Power.Active.Export and
Energy.Active.Export.Register; the net power is Import - Export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

_SCALE_TO_BASE = {"W": 1.0, "kW": 1000.0, "Wh": 1.0, "kWh": 1000.0, "A": 1.0, "Percent": 1.0}


@dataclass(slots=True)
class MeterSample:
    power_w: float | None = None  # Power.Active.Import (charging is positive here, as OCPP has it)
    energy_wh: float | None = None  # Energy.Active.Import.Register
    export_power_w: float | None = None  # Power.Active.Export (discharging, positive)
    export_energy_wh: float | None = None  # Energy.Active.Export.Register
    current_a: float | None = None  # Current.Import, highest phase
    soc_pct: float | None = None


def _number(sampled: dict[str, Any]) -> float | None:
    try:
        value = float(sampled.get("value"))
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value):
        return None
    uom = sampled.get("unit_of_measure") or {}
    unit = uom.get("unit") or sampled.get("unit")
    value *= _SCALE_TO_BASE.get(unit, 1.0)
    multiplier = uom.get("multiplier")
    if multiplier:
        value *= 10 ** int(multiplier)
    return value


def decode_meter_values(meter_value: list[dict[str, Any]]) -> MeterSample:
    """The newest figures in a MeterValues / TransactionEvent ``meter_value`` list."""
    sample = MeterSample()
    for entry in meter_value or []:
        totals: dict[str, float] = {}
        phased: dict[str, list[float]] = {}
        for sampled in entry.get("sampled_value") or []:
            value = _number(sampled)
            if value is None:
                continue
            measurand = sampled.get("measurand") or "Energy.Active.Import.Register"
            if sampled.get("phase"):
                phased.setdefault(measurand, []).append(value)
            else:
                totals[measurand] = value
        power = _total(totals, phased, "Power.Active.Import")
        export = _total(totals, phased, "Power.Active.Export")
        current = totals.get("Current.Import", max(phased["Current.Import"]) if "Current.Import" in phased else None)
        if power is not None:
            sample.power_w = power
        if export is not None:
            sample.export_power_w = export
        if current is not None:
            sample.current_a = current
        if "Energy.Active.Import.Register" in totals:
            sample.energy_wh = totals["Energy.Active.Import.Register"]
        if "Energy.Active.Export.Register" in totals:
            sample.export_energy_wh = totals["Energy.Active.Export.Register"]
        if "SoC" in totals:
            sample.soc_pct = min(max(totals["SoC"], 0.0), 100.0)
    return sample


def _total(totals: dict[str, float], phased: dict[str, list[float]], measurand: str) -> float | None:
    """The total of a power measurand: as given, else the sum of its phases."""
    if measurand in totals:
        return totals[measurand]
    return sum(phased[measurand]) if measurand in phased else None
