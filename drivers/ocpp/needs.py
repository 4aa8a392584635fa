"""Decoding an EV's charging needs (ISO 15118 through OCPP NotifyEVChargingNeeds, 2.0.1 and 2.1).

``decode_charging_needs(needs, voltage_v, phases, now_s) -> (EvNeeds | None, problems)``
    ``needs`` is the message's ``chargingNeeds`` as the ocpp library hands it over
    (snake_case keys).  Every number is checked (a finite number within its range; a
    huge integer, NaN, a string or a negative power is not); a bad one is left out and
    named in ``problems`` ("v2xChargingParameters.maxDischargePower: ..."), so the
    handler logs one line per field and keeps the rest.  None: nothing can be made of
    the message (not an object, or no known requestedEnergyTransfer).

What wins where the car says a thing twice: the 2.1 ``v2xChargingParameters`` over the
DC parameters over the AC ones.  AC currents become powers at the charger's
``voltage_v`` and the phases of the requested transfer mode.  Powers are summed over
the phases when the car gives them per phase (``_L2``, ``_L3``).  The EV can discharge
when it asks for a bidirectional transfer (``*_BPT*``) and states a maximum discharge
power above 0.  Units: W and Wh on the wire, kW and kWh here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

TRANSFER_MODES = ("AC_single_phase", "AC_two_phase", "AC_three_phase", "DC", "AC_BPT", "AC_BPT_DER", "AC_DER",
                  "DC_BPT", "DC_ACDP", "DC_ACDP_BPT", "WPT")
_AC_PHASES = {"AC_single_phase": 1, "AC_two_phase": 2, "AC_three_phase": 3}
MAX_POWER_W = 5e6  # a megawatt charger with margin: anything above is garbage
MAX_ENERGY_WH = 5e6
MAX_CURRENT_A = 5000.0
DEPARTURE_PAST_S = 86400.0  # a departure this far behind is garbage, not a late car
DEPARTURE_AHEAD_S = 400 * 86400.0


@dataclass(frozen=True, slots=True)
class EvNeeds:
    """What the car said it needs.  None: not said (or said wrongly)."""

    transfer_mode: str
    bidirectional_ev: bool  # a *_BPT* transfer and a maximum discharge power > 0
    departure_s: float | None = None  # epoch s
    energy_request_kwh: float | None = None  # to the car's target (evTargetEnergyRequest, else energyAmount)
    min_v2x_energy_kwh: float | None = None  # to the car's V2X minimum (< 0: that much above it)
    max_v2x_energy_kwh: float | None = None  # to the car's maximum state of charge for V2X
    max_charge_kw: float | None = None
    min_charge_kw: float | None = None
    max_discharge_kw: float | None = None
    min_discharge_kw: float | None = None
    soc_pct: float | None = None
    capacity_kwh: float | None = None
    target_soc_pct: float | None = None


class _Reader:
    """Reads numbers from one section of the message, noting each bad one."""

    def __init__(self, problems: list[str]):
        self.problems = problems

    def section(self, needs: dict[str, Any], key: str, camel: str) -> dict[str, Any]:
        value = needs.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problems.append(f"{camel}: not an object ({type(value).__name__})")
            return {}
        return value

    def number(self, section: dict[str, Any], key: str, where: str, low: float, high: float) -> float | None:
        value = section.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problems.append(f"{where}: {_shown(value)} is not a number")
            return None
        try:
            number = float(value)  # an integer of 400 digits overflows here
        except OverflowError:
            self.problems.append(f"{where}: {_shown(value)} is out of range {low:g}..{high:g}")
            return None
        if not math.isfinite(number) or not low <= number <= high:
            self.problems.append(f"{where}: {_shown(value)} is out of range {low:g}..{high:g}")
            return None
        return number

    def power_kw(self, section: dict[str, Any], key: str, where: str) -> float | None:
        """A power in W, per phase if the car also gives _L2 / _L3 (then summed), in kW."""
        total = self.number(section, key, where, 0.0, MAX_POWER_W)
        if total is None:
            return None
        for phase in ("_l2", "_l3"):
            extra = self.number(section, key + phase, where + phase.upper(), 0.0, MAX_POWER_W)
            total += extra or 0.0
        return total / 1000.0


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _departure(value: Any, where: str, now_s: float, problems: list[str]) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        problems.append(f"{where}: {_shown(value)} is not a date-time")
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        problems.append(f"{where}: {_shown(value)} is not a date-time")
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # RFC 3339 requires an offset; UTC is the usual intent
    seconds = moment.timestamp()
    if not now_s - DEPARTURE_PAST_S <= seconds <= now_s + DEPARTURE_AHEAD_S:
        problems.append(f"{where}: {value} is not within a day before and 400 days after now")
        return None
    return seconds


def decode_charging_needs(needs: Any, voltage_v: float, phases: int,
                          now_s: float) -> tuple[EvNeeds | None, list[str]]:
    problems: list[str] = []
    if not isinstance(needs, dict):
        return None, [f"chargingNeeds: not an object ({type(needs).__name__})"]
    mode = needs.get("requested_energy_transfer")
    if mode not in TRANSFER_MODES:
        return None, [f"requestedEnergyTransfer: {_shown(mode)} is not a known energy transfer mode"]
    read = _Reader(problems)
    ac = read.section(needs, "ac_charging_parameters", "acChargingParameters")
    dc = read.section(needs, "dc_charging_parameters", "dcChargingParameters")
    v2x = read.section(needs, "v2x_charging_parameters", "v2xChargingParameters")

    volts_phases = voltage_v * _AC_PHASES.get(mode, phases)
    values: dict[str, float | None] = {}
    # AC (ISO 15118-2): currents per phase and the energy wanted.
    max_a = read.number(ac, "ev_max_current", "acChargingParameters.evMaxCurrent", 0.0, MAX_CURRENT_A)
    min_a = read.number(ac, "ev_min_current", "acChargingParameters.evMinCurrent", 0.0, MAX_CURRENT_A)
    values["max_charge_kw"] = None if max_a is None else max_a * volts_phases / 1000.0
    values["min_charge_kw"] = None if min_a is None else min_a * volts_phases / 1000.0
    energy = read.number(ac, "energy_amount", "acChargingParameters.energyAmount", 0.0, MAX_ENERGY_WH)
    # DC (ISO 15118-2): power, energy, state of charge and capacity.
    dc_power = read.number(dc, "ev_max_power", "dcChargingParameters.evMaxPower", 0.0, MAX_POWER_W)
    if dc_power is not None:
        values["max_charge_kw"] = dc_power / 1000.0
    dc_energy = read.number(dc, "energy_amount", "dcChargingParameters.energyAmount", 0.0, MAX_ENERGY_WH)
    energy = dc_energy if dc_energy is not None else energy
    soc = read.number(dc, "state_of_charge", "dcChargingParameters.stateOfCharge", 0.0, 100.0)
    capacity = read.number(dc, "ev_energy_capacity", "dcChargingParameters.evEnergyCapacity", 0.0, MAX_ENERGY_WH)
    if capacity == 0.0:
        problems.append("dcChargingParameters.evEnergyCapacity: 0 is not a battery")
        capacity = None
    # 2.1 (ISO 15118-20): powers both ways and the energies to the car's limits.
    for key, name in (("max_charge_power", "max_charge_kw"), ("min_charge_power", "min_charge_kw"),
                      ("max_discharge_power", "max_discharge_kw"), ("min_discharge_power", "min_discharge_kw")):
        power = read.power_kw(v2x, key, f"v2xChargingParameters.{_camel(key)}")
        if power is not None:
            values[name] = power
    target = read.number(v2x, "ev_target_energy_request", "v2xChargingParameters.evTargetEnergyRequest",
                         -MAX_ENERGY_WH, MAX_ENERGY_WH)
    if target is not None:
        energy = max(0.0, target)
    min_v2x = read.number(v2x, "ev_min_v2x_energy_request", "v2xChargingParameters.evMinV2XEnergyRequest",
                          -MAX_ENERGY_WH, MAX_ENERGY_WH)
    max_v2x = read.number(v2x, "ev_max_v2x_energy_request", "v2xChargingParameters.evMaxV2XEnergyRequest",
                          -MAX_ENERGY_WH, MAX_ENERGY_WH)
    if max_v2x is None:
        max_v2x = read.number(v2x, "ev_max_energy_request", "v2xChargingParameters.evMaxEnergyRequest",
                              -MAX_ENERGY_WH, MAX_ENERGY_WH)
    target_soc = read.number(v2x, "target_soc", "v2xChargingParameters.targetSoC", 0.0, 100.0)
    departure = _departure(needs.get("departure_time"), "departureTime", now_s, problems)

    max_charge, min_charge = values.get("max_charge_kw"), values.get("min_charge_kw")
    if max_charge is not None and min_charge is not None and min_charge > max_charge:
        problems.append(f"minimum charge power {min_charge:g} kW above the maximum {max_charge:g} kW: minimum ignored")
        values["min_charge_kw"] = None
    max_discharge = values.get("max_discharge_kw")
    return EvNeeds(
        transfer_mode=mode,
        bidirectional_ev="BPT" in mode and max_discharge is not None and max_discharge > 0,
        departure_s=departure,
        energy_request_kwh=None if energy is None else energy / 1000.0,
        min_v2x_energy_kwh=None if min_v2x is None else min_v2x / 1000.0,
        max_v2x_energy_kwh=None if max_v2x is None else max_v2x / 1000.0,
        max_charge_kw=max_charge,
        min_charge_kw=values.get("min_charge_kw"),
        max_discharge_kw=max_discharge,
        min_discharge_kw=values.get("min_discharge_kw"),
        soc_pct=soc,
        capacity_kwh=None if capacity is None else capacity / 1000.0,
        target_soc_pct=target_soc,
    ), problems


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def schedule_peak_w(schedule: Any) -> float | None:
    """The highest charging power of an EV's NotifyEVChargingSchedule (W; None: not in W or unreadable)."""
    if not isinstance(schedule, dict) or schedule.get("charging_rate_unit") != "W":
        return None
    periods = schedule.get("charging_schedule_period")
    if not isinstance(periods, list):
        return None
    limits = [p.get("limit") for p in periods if isinstance(p, dict)]
    numbers = [float(v) for v in limits if isinstance(v, (int, float)) and not isinstance(v, bool)
               and abs(v) < MAX_POWER_W]
    return max(numbers) if numbers else None
