"""Charging profiles as a charger keeps them, and what they ask for at a given moment.

Pure logic, no I/O.  A profile arrives as the ocpp library hands it over (snake_case
keys, 1.6, 2.0.1 or 2.1); ``parse_profile`` turns it into an ``InstalledProfile`` or
raises ``ProfileRefused`` (a reasonCode of at most 20 characters, as the 2.x schema
allows, and a text naming the field).  ``ProfileStack`` keeps them whole as OCPP does
(same id replaces; same purpose, stack level and target replaces) and, at a moment on
the station's clock, names the one that chooses the operation (TxProfile, else
TxDefaultProfile: the highest stack level in force) and the caps
(ChargePointMaxProfile / ChargingStationMaxProfile / ChargingStationExternalConstraints).
``decide`` turns that into a power, given what the EV and the station can do now.

Sign: the charger's, positive charges the EV.  Values in A become W at the station's
voltage and phases.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

TX_PURPOSES = ("TxProfile", "TxDefaultProfile")
CAP_PURPOSES = ("ChargePointMaxProfile", "ChargingStationMaxProfile", "ChargingStationExternalConstraints")
KNOWN_PURPOSES = TX_PURPOSES + CAP_PURPOSES
# Operation modes this simulator runs; CentralFrequency only on a station that follows AFRRSignal.
MODES = ("ChargingOnly", "CentralSetpoint", "Idle", "CentralFrequency")
_RECURRENCE_S = {"Daily": 86400.0, "Weekly": 7 * 86400.0}


class ProfileRefused(ValueError):
    def __init__(self, reason_code: str, info: str):
        super().__init__(info)
        self.reason_code = reason_code[:20]  # StatusInfoType.reasonCode maxLength
        self.info = info


def epoch_s(text: str | None, where: str) -> float | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise ProfileRefused("InvalidSchedule", f"{where}: {text!r} is not a date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _number(period: dict[str, Any], key: str) -> float | None:
    value = period.get(key)
    return None if value is None else float(value)


@dataclass(frozen=True)
class Period:
    start_s: float
    limit: float | None
    number_phases: int | None
    operation_mode: str | None = None  # None: not said (ChargingOnly)
    setpoint: float | None = None
    discharge_limit: float | None = None
    v2x_baseline: float | None = None
    signal_curve: tuple[tuple[float, float], ...] = ()  # (signal, power), sorted by signal

    def curve_power(self, signal: float) -> float:
        """The v2xSignalWattCurve at ``signal``: linear between points, flat beyond them."""
        curve = self.signal_curve
        if not curve:
            return 0.0
        if signal <= curve[0][0]:
            return curve[0][1]
        if signal >= curve[-1][0]:
            return curve[-1][1]
        i = bisect.bisect_right([s for s, _ in curve], signal)
        (s0, p0), (s1, p1) = curve[i - 1], curve[i]
        return p0 + (p1 - p0) * (signal - s0) / (s1 - s0)


@dataclass(frozen=True)
class InstalledProfile:
    profile_id: int
    purpose: str
    stack_level: int
    target_id: int
    transaction_id: str | None
    kind: str  # Absolute, Relative, Recurring
    recurrency: str | None
    start_s: float | None  # startSchedule, epoch s
    duration_s: float | None
    valid_from_s: float | None
    valid_to_s: float | None
    unit: str
    periods: tuple[Period, ...]
    received_s: float  # station clock
    raw_periods: tuple[dict[str, Any], ...] = ()
    starts: tuple[float, ...] = ()  # the periods' startPeriod, for bisect each tick

    def period_at(self, now_s: float, tx_start_s: float | None) -> int | None:
        """Index of the period in force at ``now_s`` (station clock), None if the profile is not in force."""
        if self.valid_from_s is not None and now_s < self.valid_from_s:
            return None
        if self.valid_to_s is not None and now_s >= self.valid_to_s:
            return None
        if self.kind == "Relative":
            start = tx_start_s if tx_start_s is not None else now_s  # without a session it waits at period 0
        else:
            start = self.start_s if self.start_s is not None else (
                tx_start_s if tx_start_s is not None else self.received_s)
        elapsed = now_s - start
        if elapsed < 0:
            return None
        if self.kind == "Recurring":
            elapsed %= _RECURRENCE_S.get(self.recurrency or "Daily", 86400.0)
        if self.duration_s is not None and elapsed >= self.duration_s:
            return None
        return bisect.bisect_right(self.starts, elapsed) - 1


def parse_profile(profile: dict[str, Any], schedule: dict[str, Any], target_id: int, version: str,
                  received_s: float) -> InstalledProfile:
    """An InstalledProfile from one SetChargingProfile (snake_case keys); ProfileRefused if it cannot run."""
    raw_periods = schedule.get("charging_schedule_period") or []
    if not raw_periods:
        raise ProfileRefused("InvalidSchedule", "chargingSchedulePeriod is empty")
    periods = []
    for n, raw in enumerate(raw_periods):
        curve = tuple(sorted((float(p["signal"]), float(p["power"])) for p in raw.get("v2x_signal_watt_curve") or ()))
        periods.append(Period(
            start_s=float(raw["start_period"]), limit=_number(raw, "limit"), number_phases=raw.get("number_phases"),
            operation_mode=raw.get("operation_mode"), setpoint=_number(raw, "setpoint"),
            discharge_limit=_number(raw, "discharge_limit"), v2x_baseline=_number(raw, "v2x_baseline"),
            signal_curve=curve))
        if version != "2.1" and periods[-1].limit is None:
            raise ProfileRefused("InvalidSchedule", f"chargingSchedulePeriod[{n}]: no limit")
    if periods[0].start_s != 0:
        raise ProfileRefused("InvalidSchedule", f"chargingSchedulePeriod[0].startPeriod is "
                                                f"{periods[0].start_s:g}, must be 0")
    for n in range(1, len(periods)):
        if periods[n].start_s <= periods[n - 1].start_s:
            raise ProfileRefused("InvalidSchedule", f"chargingSchedulePeriod[{n}].startPeriod "
                                                    f"{periods[n].start_s:g} does not follow the one before")
    kind = profile["charging_profile_kind"]
    if kind not in ("Absolute", "Relative", "Recurring"):
        raise ProfileRefused("UnsupportedParam", f"chargingProfileKind {kind} is not supported")
    purpose = profile["charging_profile_purpose"]
    if purpose not in KNOWN_PURPOSES:
        raise ProfileRefused("UnsupportedParam", f"chargingProfilePurpose {purpose} is not supported")
    duration = schedule.get("duration")
    transaction_id = profile.get("transaction_id")
    return InstalledProfile(
        profile_id=int(profile["id"] if "id" in profile else profile["charging_profile_id"]),
        purpose=purpose, stack_level=int(profile["stack_level"]), target_id=target_id,
        transaction_id=None if transaction_id is None else str(transaction_id), kind=kind,
        recurrency=profile.get("recurrency_kind"),
        start_s=epoch_s(schedule.get("start_schedule"), "startSchedule"),
        duration_s=None if duration is None else float(duration),
        valid_from_s=epoch_s(profile.get("valid_from"), "validFrom"),
        valid_to_s=epoch_s(profile.get("valid_to"), "validTo"),
        unit=schedule["charging_rate_unit"], periods=tuple(periods), received_s=received_s,
        raw_periods=tuple(raw_periods), starts=tuple(p.start_s for p in periods))


def check_v2x(profile: InstalledProfile, *, can_discharge: bool, afrr_signal: bool) -> None:
    """Refuse what this charger cannot run: an operation mode it lacks, a setpoint outside its own
    period's [dischargeLimit, limit], a discharge asked of a charger or EV that cannot discharge."""
    for n, period in enumerate(profile.periods):
        where = f"chargingSchedulePeriod[{n}]"
        mode = period.operation_mode or "ChargingOnly"
        if mode not in MODES or (mode == "CentralFrequency" and not afrr_signal):
            raise ProfileRefused("UnsupportedParam", f"{where}.operationMode {mode} is not supported")
        if mode == "CentralSetpoint":
            if period.setpoint is None:
                raise ProfileRefused("InvalidValue", f"{where}: CentralSetpoint without a setpoint")
            low = -math.inf if period.discharge_limit is None else period.discharge_limit
            high = math.inf if period.limit is None else period.limit
            if not low <= period.setpoint <= high:
                raise ProfileRefused("InvalidValue", f"{where}.setpoint {period.setpoint:g} is outside "
                                                     f"[dischargeLimit {low:g}, limit {high:g}]")
            if period.setpoint < 0 and not can_discharge:
                raise ProfileRefused("NoDischarge", f"{where}.setpoint {period.setpoint:g}: this charger "
                                                    f"or EV cannot discharge")
        if mode == "CentralFrequency" and not can_discharge:
            lowest = (period.v2x_baseline or 0.0) + min([p for _, p in period.signal_curve] or [0.0])
            if lowest < 0:
                raise ProfileRefused("NoDischarge", f"{where}: the signal curve reaches {lowest:g}: this "
                                                    f"charger or EV cannot discharge")


class ProfileStack:
    """The profiles a station has installed, kept whole."""

    def __init__(self):
        self.profiles: list[InstalledProfile] = []

    def install(self, new: InstalledProfile) -> None:
        self.profiles = [p for p in self.profiles if p.profile_id != new.profile_id and not (
            p.purpose == new.purpose and p.stack_level == new.stack_level and p.target_id == new.target_id)]
        self.profiles.append(new)

    def clear(self, profile_id: int | None = None, purpose: str | None = None, stack_level: int | None = None,
              target_id: int | None = None) -> int:
        """Remove the profiles matching every criterion given; how many went."""
        def matches(p: InstalledProfile) -> bool:
            return ((profile_id is None or p.profile_id == profile_id) and (purpose is None or p.purpose == purpose)
                    and (stack_level is None or p.stack_level == stack_level)
                    and (target_id is None or p.target_id == target_id))
        kept = [p for p in self.profiles if not matches(p)]
        removed = len(self.profiles) - len(kept)
        self.profiles = kept
        return removed

    def end_transaction(self) -> None:
        """A TxProfile lives as long as its transaction."""
        self.profiles = [p for p in self.profiles if p.purpose != "TxProfile"]

    def in_force(self, now_s: float, transaction_id: str | None, tx_start_s: float | None
                 ) -> tuple[tuple[InstalledProfile, int] | None, list[tuple[InstalledProfile, int]]]:
        """(the profile and period choosing the operation, or None; the caps in force, one per purpose)."""
        best: dict[str, tuple[InstalledProfile, int]] = {}
        for profile in self.profiles:
            if profile.purpose == "TxProfile" and (
                    transaction_id is None or profile.transaction_id not in (None, transaction_id)):
                continue
            index = profile.period_at(now_s, tx_start_s if transaction_id is not None else None)
            if index is None:
                continue
            held = best.get(profile.purpose)
            # Highest stack level; at equal levels an EVSE's own profile over the station-wide one.
            if held is None or (profile.stack_level, profile.target_id != 0) > (held[0].stack_level,
                                                                               held[0].target_id != 0):
                best[profile.purpose] = (profile, index)
        chosen = best.get("TxProfile") if transaction_id is not None else None
        chosen = chosen or best.get("TxDefaultProfile")
        return chosen, [best[p] for p in CAP_PURPOSES if p in best]


@dataclass(frozen=True)
class Capability:
    """What the EV and station allow now, in W (magnitudes)."""

    charge_max_w: float  # 0 when the EV is full or absent
    discharge_max_w: float  # 0 when either cannot discharge or the battery is empty
    min_charge_w: float = 0.0
    min_discharge_w: float = 0.0
    voltage_v: float = 230.0
    phases: int = 3


def watts(value: float, unit: str, number_phases: int | None, cap: Capability) -> float:
    if unit == "W":
        return value
    return value * cap.voltage_v * min(number_phases or cap.phases, cap.phases)


def decide(chosen: tuple[InstalledProfile, int] | None, caps: list[tuple[InstalledProfile, int]],
           cap: Capability, signal: float) -> tuple[str, float]:
    """(operation mode, power W) for the profiles in force: the chosen one's operation within the caps."""
    high, low = cap.charge_max_w, -cap.discharge_max_w
    for profile, index in caps:
        period = profile.periods[index]
        if period.limit is not None:
            high = min(high, watts(period.limit, profile.unit, period.number_phases, cap))
        if period.discharge_limit is not None:
            low = max(low, watts(period.discharge_limit, profile.unit, period.number_phases, cap))
    mode, wanted = "ChargingOnly", high
    if chosen is not None:
        profile, index = chosen
        period = profile.periods[index]
        mode = period.operation_mode or "ChargingOnly"

        def w(value: float) -> float:
            return watts(value, profile.unit, period.number_phases, cap)
        if period.limit is not None:
            high = min(high, w(period.limit))
        if period.discharge_limit is not None:
            low = max(low, w(period.discharge_limit))
        if mode == "ChargingOnly":
            wanted = high
        elif mode == "CentralSetpoint":
            wanted = w(period.setpoint or 0.0)
        elif mode == "CentralFrequency":
            wanted = w((period.v2x_baseline or 0.0) + period.curve_power(signal))
        else:  # Idle, and anything else that got this far
            wanted = 0.0
    # A negative limit does not force a discharge, nor a positive dischargeLimit a charge.
    power = min(max(wanted, min(low, 0.0)), max(high, 0.0))
    if 0 < power < cap.min_charge_w or -cap.min_discharge_w < power < 0:
        power = 0.0  # the car runs at {0} or [min, max], not in between
    return mode, power + 0.0
