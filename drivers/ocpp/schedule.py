"""What the gateway wants a charger to run, and the OCPP payloads that say it.

A ``Command`` is the whole wish: what to run now (a charging ``limit``, a V2X
``setpoint``, or ``frequency``: follow AFRRSignal around a baseline), the plan to run
afterwards, or a release (``plan`` alone, or ``clear``: remove the gateway's profile).
``differs`` says whether a new one is worth sending; ``set_profile_payload`` builds the
SetChargingProfile as it goes on the wire (camelCase), for OCPP 1.6, 2.0.1 and 2.1.

Without a plan the payloads are single-period as they always were: Relative for the Tx
purposes, Absolute with ``startSchedule`` a minute in the past for the others.  With a
plan, every purpose is Absolute, starting a minute in the past: period 0 holds the current
target for ``hold_s``, then one period per plan slot (a gap in the plan, or the time
before it, charges at the full rating), at most ``MAX_PERIODS``, and the schedule's
``duration`` ends with the plan, after which the charger's default applies.  Period 0
expires, so the command loop refreshes the profile before half the hold has run out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from edge.asset import PowerPlan

from drivers.ocpp.config import OcppCharger
from drivers.ocpp.limits import ChargeLimit, limit_for_target, needs_sending, round_down
from drivers.ocpp.v2x import frequency_period, setpoint_period, watts

LIMIT, SETPOINT, FREQUENCY, PLAN, CLEAR = "limit", "setpoint", "frequency", "plan", "clear"
MAX_PERIODS = 1024  # chargingSchedulePeriod maxItems (2.0.1, 2.1)
START_IN_PAST_S = 60  # a charger whose clock runs a little behind applies the profile at once
_MAX_PURPOSE = {"1.6": "ChargePointMaxProfile", "2.0.1": "ChargingStationMaxProfile",
                "2.1": "ChargingStationMaxProfile"}
_OPERATION_MODE = {LIMIT: "ChargingOnly", SETPOINT: "CentralSetpoint", FREQUENCY: "CentralFrequency"}


@dataclass(frozen=True, slots=True)
class Command:
    """``mode`` LIMIT: ``limit``; SETPOINT: ``setpoint_kw`` (flexedge sign) within ``charge_max_kw`` and
    ``discharge_max_kw`` (magnitudes); FREQUENCY: ``baseline_kw`` and the band, within the maxima;
    PLAN: the plan alone; CLEAR: no profile of the gateway's.  ``v2x``: the session can discharge
    (the plan's slots are then setpoints in W)."""

    mode: str
    limit: ChargeLimit | None = None
    setpoint_kw: float = 0.0
    charge_max_kw: float = 0.0
    discharge_max_kw: float = 0.0
    baseline_kw: float = 0.0
    band_up_kw: float = 0.0
    band_down_kw: float = 0.0
    plan: PowerPlan | None = None
    v2x: bool = False

    @property
    def holds(self) -> bool:
        """Period 0 holds a target for a while before the plan: the profile needs refreshing."""
        return self.plan is not None and self.mode in (LIMIT, SETPOINT, FREQUENCY)

    def operation_mode(self, version: str) -> str | None:
        """The OCPP 2.1 operation mode of period 0 (None before 2.1, or when nothing is in force)."""
        if version != "2.1" or self.mode == CLEAR:
            return None
        if self.mode == PLAN:
            return "CentralSetpoint" if self.v2x else "ChargingOnly"
        return _OPERATION_MODE[self.mode]

    def shown(self) -> tuple[float | None, str | None]:
        """(value, unit) of period 0, for events and the command log."""
        if self.mode == LIMIT and self.limit is not None:
            return self.limit.value, self.limit.unit
        if self.mode == SETPOINT:
            return watts(-self.setpoint_kw, False) + 0.0, "W"
        if self.mode == FREQUENCY:
            return watts(-self.baseline_kw, False) + 0.0, "W"
        return None, None


def differs(previous: Command | None, new: Command, deadband_kw: float) -> bool:
    """Whether ``new`` is worth a message, ``previous`` being in force."""
    if previous is None or previous.mode != new.mode or previous.v2x != new.v2x or previous.plan != new.plan:
        return True
    if new.mode == LIMIT:
        return previous.limit is None or new.limit is None or needs_sending(previous.limit, new.limit, deadband_kw)
    if new.mode == SETPOINT:
        if (previous.setpoint_kw == 0) != (new.setpoint_kw == 0):
            return True  # starting or stopping is never within a deadband
        return _moved(previous, new, deadband_kw, ("setpoint_kw", "charge_max_kw", "discharge_max_kw"))
    if new.mode == FREQUENCY:
        return _moved(previous, new, deadband_kw,
                      ("baseline_kw", "band_up_kw", "band_down_kw", "charge_max_kw", "discharge_max_kw"))
    return False


def _moved(previous: Command, new: Command, deadband_kw: float, names: tuple[str, ...]) -> bool:
    return any(abs(getattr(previous, name) - getattr(new, name)) > deadband_kw for name in names)


def purpose_for(charger: OcppCharger, version: str) -> str:
    """The profile purpose for this charger and negotiated version (max-profile names translated)."""
    purpose = charger.effective_purpose()
    if purpose in _MAX_PURPOSE.values():
        return _MAX_PURPOSE[version]
    if purpose == "ChargingStationExternalConstraints" and version == "1.6":
        raise ValueError("ChargingStationExternalConstraints does not exist in OCPP 1.6")
    return purpose


def max_purpose(version: str) -> str:
    return _MAX_PURPOSE[version]


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ------------------------------------------------------------------ periods


def _limit_period(start_s: int, limit: ChargeLimit, version: str) -> dict[str, Any]:
    period: dict[str, Any] = {"startPeriod": start_s, "limit": limit.value}
    if limit.unit == "A":
        period["numberPhases"] = limit.phases
    if version == "2.1":
        period["operationMode"] = "ChargingOnly"
    return period


def _now_period(charger: OcppCharger, version: str, command: Command) -> dict[str, Any]:
    """Period 0 of a command that runs something now."""
    integer = charger.integer_limits
    if command.mode == LIMIT:
        assert command.limit is not None
        return _limit_period(0, command.limit, version)
    if command.mode == SETPOINT:
        return setpoint_period(0, command.setpoint_kw, command.charge_max_kw, command.discharge_max_kw, integer)
    return frequency_period(0, command.baseline_kw, command.band_up_kw, command.band_down_kw,
                            command.charge_max_kw, command.discharge_max_kw, integer)


def _plan_renderer(charger: OcppCharger, version: str, command: Command) -> Callable[[int, float | None], dict]:
    """A period at ``start_s`` for a plan's power (None: a gap, charging at the full rating)."""
    if command.v2x:
        def v2x_period(start_s: int, power_kw: float | None) -> dict[str, Any]:
            if power_kw is None:
                return {"startPeriod": start_s, "operationMode": "ChargingOnly",
                        "limit": watts(command.charge_max_kw, charger.integer_limits)}
            charge_kw = min(max(-power_kw, 0.0), command.charge_max_kw)  # the plan only charges
            period = setpoint_period(start_s, -charge_kw, command.charge_max_kw, 0.0, charger.integer_limits)
            return period
        return v2x_period

    def limit_period(start_s: int, power_kw: float | None) -> dict[str, Any]:
        return _limit_period(start_s, limit_for_target(charger, power_kw), version)
    return limit_period


def schedule_periods(charger: OcppCharger, version: str, command: Command, start_s: int, now_s: float,
                     hold_s: float) -> tuple[list[dict[str, Any]], int | None]:
    """The periods and the schedule's duration (s; None: open-ended) for ``command``, the schedule
    starting at ``start_s`` (epoch s)."""
    if command.plan is None:
        return [_now_period(charger, version, command)], None
    render = _plan_renderer(charger, version, command)
    periods: list[dict[str, Any]] = []
    if command.mode == PLAN:
        plan_from_s = now_s
    else:
        periods.append(_now_period(charger, version, command))
        plan_from_s = now_s + hold_s
    cursor = plan_from_s
    ends_s = plan_from_s
    segments: list[tuple[float, float | None]] = []  # (begin, power) in time order
    for begin_s, end_s, power_kw in command.plan.slots:
        if end_s <= cursor:
            continue
        begin_s = max(begin_s, cursor)
        if begin_s > cursor:
            segments.append((cursor, None))
        segments.append((begin_s, power_kw))
        cursor = ends_s = end_s
    for begin_s, power_kw in segments:
        offset = 0 if not periods else math.ceil(begin_s - start_s)
        if periods and offset <= periods[-1]["startPeriod"]:
            periods.pop()  # rounded onto the previous period's start: the later one wins
            offset = 0 if not periods else offset
        if len(periods) == MAX_PERIODS:
            ends_s = begin_s
            break
        periods.append(render(offset, power_kw))
    if not periods:  # the plan has ended: nothing but the charger's default
        periods.append(render(0, None))
        return periods, None
    return periods, max(1, math.ceil(ends_s - start_s))


# ------------------------------------------------------------------ payloads


def set_profile_payload(charger: OcppCharger, version: str, command: Command, transaction_id: str | None, *,
                        now_s: float, hold_s: float) -> dict[str, Any]:
    """The SetChargingProfile payload as it goes on the wire (camelCase JSON object).

    Built directly rather than as the library's dataclass: its generic
    dataclass -> dict -> camelCase conversion was over half of the gateway's
    cost of a profile, which counts when a setpoint moves 500 chargers at once.
    """
    purpose = purpose_for(charger, version)
    is_tx = purpose in ("TxProfile", "TxDefaultProfile")
    absolute = not is_tx or command.plan is not None
    start_s = int(now_s) - START_IN_PAST_S
    periods, duration_s = schedule_periods(charger, version, command, start_s, now_s, hold_s)
    if command.mode in (SETPOINT, FREQUENCY) or command.v2x:
        unit = "W"
    elif command.limit is not None:
        unit = command.limit.unit
    else:
        unit = charger.limit_unit
    schedule: dict[str, Any] = {"chargingRateUnit": unit, "chargingSchedulePeriod": periods}
    if absolute:
        schedule["startSchedule"] = iso(start_s)
    if duration_s is not None:
        schedule["duration"] = duration_s
    profile: dict[str, Any] = {"stackLevel": charger.stack_level, "chargingProfilePurpose": purpose,
                               "chargingProfileKind": "Absolute" if absolute else "Relative"}
    if purpose == "TxProfile":
        profile["transactionId"] = int(transaction_id) if version == "1.6" else transaction_id
    return _wrap(charger, version, purpose, charger.profile_id, profile, schedule)


def _wrap(charger: OcppCharger, version: str, purpose: str, profile_id: int, profile: dict[str, Any],
          schedule: dict[str, Any]) -> dict[str, Any]:
    if version == "1.6":
        profile.update(chargingProfileId=profile_id, chargingSchedule=schedule)
        connector = 0 if purpose == "ChargePointMaxProfile" else charger.connector_id
        return {"connectorId": connector, "csChargingProfiles": profile}
    profile.update(id=profile_id, chargingSchedule=[{"id": 1, **schedule}])
    evse = 0 if purpose == "ChargingStationMaxProfile" else charger.evse_id
    return {"evseId": evse, "chargingProfile": profile}


def failsafe_payload(charger: OcppCharger, version: str, import_kw: float, export_kw: float | None,
                     *, now_s: float) -> dict[str, Any]:
    """The max profile at the charger's share of the site's limits: stack level 0, its own id,
    evse / connector 0, in the charger's unit (rounded down); a discharge limit too when
    ``export_kw`` is given (2.1)."""
    purpose = _MAX_PURPOSE[version]
    unit = charger.limit_unit
    per_kw = 1000.0 if unit == "W" else 1000.0 / (charger.voltage_v * charger.phases)

    def value(kw: float) -> float:
        return round_down(kw * per_kw, charger.integer_limits)

    period: dict[str, Any] = {"startPeriod": 0, "limit": value(import_kw)}
    if unit == "A":
        period["numberPhases"] = charger.phases
    if export_kw is not None and version == "2.1":
        period["dischargeLimit"] = -value(export_kw) + 0.0
    schedule = {"chargingRateUnit": unit, "chargingSchedulePeriod": [period],
                "startSchedule": iso(int(now_s) - START_IN_PAST_S)}
    profile = {"stackLevel": 0, "chargingProfilePurpose": purpose, "chargingProfileKind": "Absolute"}
    return _wrap(charger, version, purpose, charger.failsafe_profile_id, profile, schedule)


def clear_payload(charger: OcppCharger, version: str, purpose: str | None = None) -> dict[str, Any]:
    """ClearChargingProfile of the gateway's profile (by its id), or of everything under ``purpose``
    at the asset's stack level (after a fallback left a profile under the old purpose)."""
    if purpose is None:
        return {"id": charger.profile_id} if version == "1.6" else {"chargingProfileId": charger.profile_id}
    if version == "1.6":
        connector = 0 if purpose == "ChargePointMaxProfile" else charger.connector_id
        return {"connectorId": connector, "chargingProfilePurpose": purpose, "stackLevel": charger.stack_level}
    evse = 0 if purpose == "ChargingStationMaxProfile" else charger.evse_id
    return {"chargingProfileCriteria": {"evseId": evse, "chargingProfilePurpose": purpose,
                                        "stackLevel": charger.stack_level}}
