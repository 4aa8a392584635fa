"""What a simulated charge point and its EV are, and the records the station keeps of what it received."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

VERSIONS = ("1.6", "2.0.1", "2.1")


def _check(name: str, value: float, lo: float, hi: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi):
        raise ValueError(f"{name} must be {lo:g}..{hi:g}, got {value!r}")


@dataclass
class EvSpec:
    """An electric vehicle: battery, the powers it accepts, the ID tag its driver presents, and (ISO 15118)
    what it tells the charger it needs.  Mutable: a test changes ``departure_s`` or ``target_soc_pct``
    mid-session and calls ``Station.send_charging_needs()``."""

    id_tag: str = "SIMTAG01"
    capacity_kwh: float = 40.0
    soc_pct: float = 30.0
    max_power_kw: float = 11.0
    target_soc_pct: float = 100.0
    # V2X (used on a bidirectional 2.1 station).  min_soc_pct is the car's own floor for discharging,
    # announced in its charging needs; the station does not enforce it (the gateway must).
    bidirectional: bool = False
    min_soc_pct: float = 20.0
    max_soc_pct: float = 100.0
    max_discharge_kw: float | None = None  # None: max_power_kw
    min_charge_kw: float = 0.0  # below these the car does not run: its range is {0} and [min, max]
    min_discharge_kw: float = 0.0
    departure_s: float | None = None  # epoch s, announced in the charging needs
    # NotifyEVChargingNeeds after the transaction starts.  None: on a 2.1 station yes, on 2.0.1 no
    # (so that older tests see no new message); 1.6 has no such message.
    send_charging_needs: bool | None = None

    def __post_init__(self):
        _check("capacity_kwh", self.capacity_kwh, 0.001, 1000.0)
        _check("soc_pct", self.soc_pct, 0.0, 100.0)
        _check("max_power_kw", self.max_power_kw, 0.0, 1000.0)
        _check("target_soc_pct", self.target_soc_pct, 0.0, 100.0)
        _check("min_soc_pct", self.min_soc_pct, 0.0, 100.0)
        _check("max_soc_pct", self.max_soc_pct, 0.0, 100.0)
        if self.min_soc_pct > self.max_soc_pct:
            raise ValueError(f"min_soc_pct ({self.min_soc_pct:g}) must not exceed max_soc_pct ({self.max_soc_pct:g})")
        if self.max_discharge_kw is None:
            self.max_discharge_kw = self.max_power_kw
        _check("max_discharge_kw", self.max_discharge_kw, 0.0, 1000.0)
        _check("min_charge_kw", self.min_charge_kw, 0.0, self.max_power_kw)
        _check("min_discharge_kw", self.min_discharge_kw, 0.0, self.max_discharge_kw)
        if self.departure_s is not None and not (isinstance(self.departure_s, (int, float))
                                                 and math.isfinite(self.departure_s) and self.departure_s > 0):
            raise ValueError(f"departure_s must be an epoch time in s or None, got {self.departure_s!r}")
        if self.send_charging_needs not in (None, True, False):
            raise ValueError(f"send_charging_needs must be True, False or None, got {self.send_charging_needs!r}")


@dataclass
class StationSpec:
    """A charge point.  ``port``-independent: the simulator gives it its URL."""

    charge_point_id: str
    ocpp_version: str = "1.6"  # "1.6", "2.0.1" or "2.1"
    password: str | None = None  # HTTP Basic (user = charge_point_id); None sends no credentials
    max_current_a: float = 32.0
    phases: int = 3
    voltage_v: float = 230.0
    meter_interval_s: float = 1.0
    tick_s: float = 0.1
    accept_profiles: bool = True
    connector_id: int = 1  # 1.6 connector / 2.x connector on EVSE ``evse_id``
    evse_id: int = 1
    reconnect_cap_s: float = 2.0
    # False: the station is booted already (as one that reconnects after a gateway restart)
    # and sends no BootNotification.
    send_boot: bool = True
    # A CALL from the central system before the station's boot is accepted is always recorded
    # (Station.early_requests); then "answer" handles it anyway, "call_error" answers CALLERROR
    # SecurityError (as OCPP 2.0.1 asks of a station not yet accepted), "close" closes the link.
    before_boot: str = "answer"
    # Profiles refused although accept_profiles is True: by purpose, and by charging rate unit.
    reject_purposes: tuple[str, ...] = ()
    reject_units: tuple[str, ...] = ()
    # The EVSE's maximum power stated in the 2.x device model (EVSE Power maxLimit, sent in a
    # NotifyReport on GetReport); the station never charges above it.  None: max_current_a x
    # voltage_v x phases.  Lets a test give a station a rating other than the profile's.
    nameplate_kw: float | None = None
    # OCPP 2.1 V2X: the charger can discharge (up to max_discharge_kw, None: its charging rating),
    # and follows AFRRSignal under a CentralFrequency profile.
    bidirectional: bool = False
    max_discharge_kw: float | None = None
    afrr_signal: bool = False
    # The station's clock runs this far ahead of the host's (s): what its charging schedules see.
    # A test moves it to jump along a multi-period profile without waiting.
    clock_offset_s: float = 0.0

    def __post_init__(self):
        if self.ocpp_version not in VERSIONS:
            raise ValueError(f"ocpp_version must be one of {', '.join(VERSIONS)}, got {self.ocpp_version!r}")
        if self.before_boot not in ("answer", "call_error", "close"):
            raise ValueError(f"before_boot must be 'answer', 'call_error' or 'close', got {self.before_boot!r}")
        self.reject_purposes = tuple(self.reject_purposes)
        self.reject_units = tuple(self.reject_units)
        if self.phases not in (1, 3):
            raise ValueError(f"phases must be 1 or 3, got {self.phases!r}")
        _check("max_current_a", self.max_current_a, 0.0, 1000.0)
        if self.nameplate_kw is not None:
            _check("nameplate_kw", self.nameplate_kw, 0.1, 1000.0)
        _check("voltage_v", self.voltage_v, 100.0, 480.0)
        _check("meter_interval_s", self.meter_interval_s, 0.05, 3600.0)
        _check("tick_s", self.tick_s, 0.01, 10.0)
        _check("reconnect_cap_s", self.reconnect_cap_s, 0.05, 600.0)
        _check("clock_offset_s", self.clock_offset_s, -1e9, 1e9)
        for name in ("bidirectional", "afrr_signal"):
            if getattr(self, name) and self.ocpp_version != "2.1":
                raise ValueError(f"{name} needs ocpp_version '2.1' (V2X is an OCPP 2.1 feature), "
                                 f"got {self.ocpp_version!r}")
        if self.max_discharge_kw is None:
            self.max_discharge_kw = self.charge_rating_w / 1000.0
        _check("max_discharge_kw", self.max_discharge_kw, 0.0, 1000.0)

    @property
    def charge_rating_w(self) -> float:
        by_current_w = self.max_current_a * self.voltage_v * self.phases
        return by_current_w if self.nameplate_kw is None else min(by_current_w, self.nameplate_kw * 1000.0)


@dataclass(frozen=True)
class ProfileRecord:
    """A SetChargingProfile as received.  ``limit``, ``setpoint`` and ``discharge_limit`` are in the
    schedule's ``unit`` (W for every V2X profile) and belong to the period in force when it arrived
    (period 0 if none was); ``limit`` is None for a 2.1 period without one."""

    received_at: float  # wall clock, s since epoch
    received_mono: float  # time.monotonic()
    purpose: str
    limit: float | None
    unit: str  # "W" or "A"
    number_phases: int | None
    stack_level: int
    target_id: int  # 1.6 connector id, 2.x evse id
    transaction_id: str | None
    accepted: bool
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    charging_profile_id: int | None = None
    operation_mode: str | None = None  # 2.1 ("ChargingOnly" when the period names none); None before 2.1
    setpoint: float | None = None
    discharge_limit: float | None = None  # negative
    periods: tuple[dict[str, Any], ...] = field(repr=False, default=())  # the schedule's periods as received
    reason: str | None = None  # why it was refused: the statusInfo reasonCode (2.x), or "Rejected"


@dataclass(frozen=True)
class RequestRecord:
    """A CALL from the central system as received."""

    action: str
    received_mono: float  # time.monotonic()
    before_boot: bool  # the station's BootNotification was not accepted yet


@dataclass(frozen=True)
class AfrrSignalRecord:
    """An AFRRSignal as received (2.1): the signal applies from its receipt."""

    signal: int
    timestamp: str  # as sent: when the signal becomes active
    received_at: float  # wall clock, s since epoch
    received_mono: float


@dataclass(frozen=True)
class ActivePeriod:
    """What governs the station now.  ``purpose``/``profile_id``/``period_index`` None: no profile
    chooses the operation (it charges at its maximum within the caps)."""

    purpose: str | None
    profile_id: int | None
    period_index: int | None
    operation_mode: str
    power_w: float  # what it draws now given the EV: + charging, - discharging
