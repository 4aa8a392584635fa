"""Turn the latest point values of a unit into an ``AssetReading`` and feasible commands.

Pure functions, no I/O: ``build_reading`` and ``feasible_target_kw`` are what
the driver applies; their rules are listed in docs/drivers/iec104.md.
``available_peaks`` keeps the highest available power a battery has reported,
the figure compared with the profile's ratings (edge/control/ratings.py).
"""

from __future__ import annotations

import math
import time
from typing import Any

from edge.asset import AssetReading, DeviceRating

# Profile key -> the signal where the unit tells how much it can do now.
AVAILABLE_SIGNALS = {"max_charge_kw": "p_charge_available", "max_discharge_kw": "p_discharge_available"}


def blocking_reason(asset, values: dict[str, Any]) -> str | None:
    """Why the unit cannot take commands now (fault, local mode), or None."""
    if values.get("fault") is True:
        return "unit reports a fault"
    if values.get("remote") is False:
        return "unit is in local mode"
    return None


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def build_reading(asset, values: dict[str, Any], problems: list[str], read_at: float | None = None,
                  command_refused: bool = False) -> AssetReading:
    """The reading of an online unit; ``problems`` (bad quality, failed command ...) make it degraded.

    ``command_refused``: the driver's own record of the last setpoint (refused, unconfirmed or not
    sendable), kept across readings until a setpoint is confirmed.
    """
    problems = list(problems)
    notes: list[str] = []
    p_kw = _finite(values.get("p_measured"))
    soc = _finite(values.get("soc"))
    gap_kw = None
    if asset.kind == "bess":
        charge_kw = float(asset.max_charge_kw)
        discharge_kw = float(asset.max_discharge_kw)
        available = _finite(values.get("p_charge_available"))
        if available is not None:
            charge_kw = min(charge_kw, max(0.0, abs(available)))
        available = _finite(values.get("p_discharge_available"))
        if available is not None:
            discharge_kw = min(discharge_kw, max(0.0, abs(available)))
        if soc is None:
            problems.append("state of charge unknown")
            charge_kw = discharge_kw = 0.0
        else:
            if soc <= asset.soc_min_pct:
                discharge_kw = 0.0
                notes.append(f"SoC {soc:.1f} % at or below soc_min_pct {asset.soc_min_pct:g}: no discharge")
            if soc >= asset.soc_max_pct:
                charge_kw = 0.0
                notes.append(f"SoC {soc:.1f} % at or above soc_max_pct {asset.soc_max_pct:g}: no charge")
        p_min_kw, p_max_kw = -charge_kw, discharge_kw
    else:
        max_load = float(asset.max_load_kw)
        min_load = _finite(values.get("min_load"))
        min_load = asset.min_load_kw if min_load is None else min(abs(min_load), max_load)
        p_min_kw, p_max_kw = -max_load, 0.0
        gap_kw = (-min_load, 0.0) if min_load > 0 else None
        temp = _finite(values.get("storage_temp"))
        if temp is not None and asset.storage_temp_max_c is not None and temp >= asset.storage_temp_max_c:
            p_min_kw = 0.0
            notes.append(f"storage {temp:.1f} degC at or above storage_temp_max_c {asset.storage_temp_max_c:g}: no heating")
            gap_kw = None
        elif gap_kw is not None:
            notes.append(f"discrete band: 0 or {-max_load:g}..{-min_load:g} kW")
        if asset.ramp_kw_per_s:
            notes.append(f"ramp {asset.ramp_kw_per_s:g} kW/s")
    if p_kw is None:
        problems.append("active power unknown")
    blocked = blocking_reason(asset, values)
    if blocked:
        problems.insert(0, blocked)
        # Not controllable now: the only reachable point is where it is.
        p_min_kw = p_max_kw = p_kw
        gap_kw = None
    return AssetReading(
        online=True,
        p_kw=p_kw,
        q_kvar=_finite(values.get("q_measured")),
        soc_pct=soc,
        p_min_kw=p_min_kw,
        p_max_kw=p_max_kw,
        p_gap_kw=gap_kw,
        degraded=bool(problems),
        command_refused=command_refused,
        detail="; ".join(problems + notes),
        read_at=read_at if read_at is not None else time.time(),
    )


def feasible_target_kw(asset, target_kw: float, values: dict[str, Any]) -> float:
    """Clamp a target (+ export) to the ratings; for P2H snap into {0} or [-max, -min]."""
    if asset.kind == "bess":
        return min(float(asset.max_discharge_kw), max(-float(asset.max_charge_kw), target_kw))
    max_load = float(asset.max_load_kw)
    min_load = _finite(values.get("min_load"))
    min_load = asset.min_load_kw if min_load is None else min(abs(min_load), max_load)
    consume = min(max_load, max(0.0, -target_kw))
    if 0.0 < consume < min_load:
        consume = min_load if consume >= min_load / 2 else 0.0
    return -consume


def available_peaks(asset, points: dict[str, Any], values: dict[str, Any], bad_quality,
                    peaks: dict[str, DeviceRating]) -> dict[str, DeviceRating]:
    """``peaks`` raised to the battery's available charge/discharge power now, where higher.

    An available power is what the unit can do now, below its rating whenever its state of
    charge or temperature derates it, so only the highest figure seen says what it can do at
    all; a figure above the profile's rating is the disagreement worth a warning.  Values of
    bad quality are left out.  Returns ``peaks`` itself when nothing rose, a new mapping otherwise.
    """
    if asset.kind != "bess":
        return peaks
    raised = None
    for key, signal in AVAILABLE_SIGNALS.items():
        kw = _finite(values.get(signal))
        if kw is None or signal in bad_quality or signal not in points:
            continue
        kw = abs(kw)  # units differ in the sign of a charge figure; docs say "a positive number"
        if key not in peaks or kw > peaks[key].power_kw:
            raised = dict(peaks) if raised is None else raised
            raised[key] = DeviceRating(kw, f"IEC 104 {signal} (IOA {points[signal].ioa})", at_least=True)
    return peaks if raised is None else raised
