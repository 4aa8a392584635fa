"""The one interface between the control loop and every protocol driver.

A driver owns its device connection completely: it polls, reconnects with
backoff, and writes commands from its own asyncio task(s).  The control loop
never awaits a driver; it reads ``reading()`` (a snapshot) and calls
``set_target_kw()`` (non-blocking, newest wins).  A driver that hangs or fails
therefore cannot stall the loop or another driver.

Sign convention: positive active power is export to the grid, negative is
import (a charging battery, a running boiler).  All powers are in kW.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

# An event for the uplink: (type, asset id or None, detail).  Types are listed
# in docs/mqtt-api.md; drivers use "asset_offline", "asset_online",
# "asset_degraded", "command_failed", "models_discovered", "models_changed".
EventSink = Callable[[str, str | None, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class AssetReading:
    """What a driver last read from its device.  None means unknown or not implemented."""

    online: bool = False
    p_kw: float | None = None  # measured active power, + export
    q_kvar: float | None = None  # measured reactive power, + export (over-excited)
    soc_pct: float | None = None  # state of charge, storage only
    # Range the asset can be commanded to right now, in kW (+ export).  For PV
    # p_max_kw is the available power (what it would produce unlimited) when the
    # device tells it, else its rating; p_min_kw is 0.  For storage p_min_kw is
    # minus the charge power it accepts now, p_max_kw the discharge power.
    p_min_kw: float | None = None
    p_max_kw: float | None = None
    # Open interval (low, high) inside [p_min_kw, p_max_kw] the asset cannot run
    # at: an EV charger or a P2H unit is off (0) or between its minimum and
    # maximum load, so (-min_load_kw, 0).  None: the range is continuous.
    p_gap_kw: tuple[float, float] | None = None
    p_available_kw: float | None = None  # PV: power available from the sun now, if the device says
    # Largest reactive power the asset can be commanded to, either sign (kvar);
    # None: the driver offers no reactive-power control for it.
    q_max_kvar: float | None = None
    voltage_v: float | None = None  # line-to-neutral average at the device
    frequency_hz: float | None = None
    degraded: bool = False  # online, but the last command failed or a value was implausible
    # The last active-power target was refused by the device (negative confirmation,
    # exception answer, rejected charging profile) or not confirmed within its timeout,
    # and no active-power command has succeeded since.  The controller then counts the
    # asset as delivering only what it measures, shares the rest among the others and
    # reports what none can take as an incapacity (cause command_refused, docs/dispatch.md).
    command_refused: bool = False
    detail: str = ""  # short human-readable note for logs and events
    read_at: float = field(default_factory=time.time)  # wall time of the measurement, s since epoch
    # An EV charger's session as the charger and the EV tell it (ISO 15118 through OCPP);
    # None: not a charger, or no EV.  See EvStatus.
    ev: "EvStatus | None" = None
    # A device whose protocol traffic the gateway forwards to another system (an OCPP charger
    # proxied to its CPO backend): the state of that link.  None: not forwarded.
    upstream: "UpstreamStatus | None" = None


@dataclass(frozen=True, slots=True)
class EvStatus:
    """An EV session as the charger and the car report it.  None: not told.

    Energies are in kWh and kept current by the driver from its meter between the car's
    messages (net: charging adds, discharging takes away).  Powers are magnitudes in kW.
    ``p_min_kw`` / ``p_max_kw`` of the reading already hold the charger's and the EV's
    power limits; what the battery's energy allows (minimum state of charge, the energy
    needed by departure) is applied by the controller (edge/control/v2x.py), which alone
    knows the driver's preferences.
    """

    bidirectional: bool = False  # charger, EV and session can discharge (V2X agreed)
    soc_pct: float | None = None
    capacity_kwh: float | None = None
    departure_s: float | None = None  # the car's departure time, epoch s
    energy_to_target_kwh: float | None = None  # still needed to reach the car's target (>= 0)
    energy_above_min_kwh: float | None = None  # above the car's own minimum for V2X (<= 0: none to give)
    energy_below_max_kwh: float | None = None  # room below the car's maximum state of charge
    max_charge_kw: float | None = None  # the EV's (and charger's) limits from its charging needs
    max_discharge_kw: float | None = None
    min_charge_kw: float | None = None
    min_discharge_kw: float | None = None
    needs_at_s: float | None = None  # when the car last sent its charging needs, epoch s
    operation_mode: str | None = None  # the OCPP 2.1 operation mode last accepted, e.g. CentralSetpoint
    energy_charged_kwh: float = 0.0  # this session
    energy_discharged_kwh: float = 0.0


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    """The link to the system a device's traffic is forwarded to (an OCPP charger's CPO backend)."""

    connected: bool
    queued: int  # messages waiting for the link to come back
    host: str  # where it goes (no credentials)


@dataclass(frozen=True, slots=True)
class PowerPlan:
    """A charger's plan for the coming quarter hours: what it is to run at when nobody
    commands it (the gateway gone, or no activation).  ``slots`` are (start_s, end_s,
    power_kw) in epoch s and kW with the flexedge sign (charging negative), in order,
    not overlapping; after the last slot the plan says nothing."""

    slots: tuple[tuple[float, float, float], ...]
    made_at_s: float


@dataclass(frozen=True, slots=True)
class DispatchContext:
    """How the controller sees an asset this cycle, for a device that follows an activation
    signal itself (OCPP 2.1 AFRRSignal).  Powers in kW, flexedge sign."""

    baseline_kw: float
    band_up_kw: float  # >= 0: how far above the baseline it may be sent
    band_down_kw: float  # >= 0
    activation_level: float  # the site's activation as a fraction of its band that way, -1..1 (+ upward)


@dataclass(slots=True)
class CommandLog:
    """What the device answered to the driver's power commands: counts, and the last one.

    Kept by every driver (``AssetDriver.command_log``) for the local endpoint's metrics and
    status page (docs/local.md); noting a command costs no I/O.
    """

    succeeded: int = 0
    failed: int = 0
    last_asked: str | None = None  # what was asked, e.g. "target_kw=12.5" or "limit=16A"
    last_ok: bool | None = None
    last_answer: str = ""  # the device's answer, or why the command failed
    last_at: float | None = None  # wall time, s since epoch

    def note(self, key: str, value: float | None, ok: bool, answer: str, unit: str = "") -> None:
        """A command for ``key`` (e.g. target_kw) of ``value`` (None: release) was answered."""
        if ok:
            self.succeeded += 1
        else:
            self.failed += 1
        shown = "release" if value is None else f"{round(value, 2):g}{unit}"
        self.last_asked, self.last_ok, self.last_answer, self.last_at = f"{key}={shown}", ok, answer[:300], time.time()


class AssetDriver(abc.ABC):
    """Base of every protocol driver.  One instance per asset in the profile."""

    def __init__(self, asset_id: str, cycle_s: float, emit_event: EventSink):
        self.asset_id = asset_id
        self.cycle_s = cycle_s
        self.emit_event = emit_event
        self.command_log = CommandLog()

    @abc.abstractmethod
    async def run(self) -> None:
        """Connect, poll once a cycle (a polled driver: when the site's cycle clock asks, just
        before each control tick, edge/runtime/cycle_clock.py), write targets, reconnect on failure.

        Runs until cancelled.  It must not raise for device or network problems:
        it marks the reading offline (within two cycles of a device going
        silent), emits an event, and retries with capped exponential backoff and
        jitter.  Every I/O has a timeout.
        """

    @abc.abstractmethod
    def reading(self) -> AssetReading:
        """The latest snapshot; never blocks."""

    @abc.abstractmethod
    def set_target_kw(self, target_kw: float | None) -> None:
        """Ask the device to run at ``target_kw`` (+ export), or release control with None.

        Never blocks: the driver writes it as soon as it can (without waiting for
        its next poll), a newer target replacing one not yet written.  The target
        has already been clamped by the controller to [p_min_kw, p_max_kw].
        """

    def set_target_kvar(self, target_kvar: float | None) -> None:
        """Ask the device for ``target_kvar`` of reactive power (+ over-excited), or release it (None).

        Same rules as ``set_target_kw``; the controller calls it only for an
        asset whose reading has ``q_max_kvar``, clamped to +/- that.  A driver
        without reactive-power control keeps this default, which ignores it.
        """


    #: Whether the device can run a volt-var curve itself (SunSpec model 705); known once connected.
    volt_var_available: bool = False
    #: Whether the curve asked for with ``set_volt_var`` runs in the device, as last read back.
    volt_var_in_force: bool = False

    def set_volt_var(self, curve: "VoltVarCurve | None") -> None:
        """Have the device run ``curve`` on its own voltage, or switch that off (None).

        Non-blocking and idempotent; only called where ``volt_var_available``.  A
        driver without such a function keeps this default, which ignores it.
        """

    #: Whether the driver wants ``set_dispatch_context`` every cycle (a device that runs its own aFRR loop).
    wants_dispatch_context: bool = False

    def set_plan(self, plan: "PowerPlan | None") -> None:
        """The asset's plan for the coming quarter hours (EV smart charging), or None: no plan.

        Non-blocking; called when the plan is made or changes.  A driver that can leave a
        schedule in the device (an OCPP multi-period charging profile) sends it, so that a
        device that loses the gateway keeps a sensible plan.  The default ignores it.
        """

    def set_dispatch_context(self, context: "DispatchContext | None") -> None:
        """This cycle's baseline, band and site activation (None: no activation in force).
        Called every cycle only where ``wants_dispatch_context``; non-blocking."""

    def device_ratings(self) -> "dict[str, DeviceRating]":
        """The ratings the device states about itself, keyed by the profile key each one
        corresponds to (``rated_kw``, ``max_charge_kw``, ``max_discharge_kw``, ``max_power_kw`` ...).

        Never blocks: what the driver last read (empty until the device has told).  The
        daemon compares them with the profile every cycle and reports a disagreement once
        (``rating_mismatch``, edge/control/ratings.py); the lower figure is the one the driver uses
        (docs/dispatch.md, "Ratings").  A driver that reads none keeps this default.
        """
        return {}


@dataclass(frozen=True, slots=True)
class DeviceRating:
    """A power rating the device states about itself: a magnitude in kW, and where it was read."""

    power_kw: float
    source: str  # e.g. "SunSpec 120 WRtg", "IEC 104 p_charge_available (IOA 2003)"
    # The figure is what the device can do now (an available power), so it can do at least
    # that: only a figure above the profile's disagrees with it, a lower one is a derating.
    at_least: bool = False

    def __post_init__(self) -> None:
        value = self.power_kw
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"a device rating must be a finite number of kW >= 0, got {self.power_kw!r} ({self.source})")


@dataclass(frozen=True, slots=True)
class VoltVarCurve:
    """A Q(U) curve for a device to run itself: voltage in % of its nominal voltage, reactive
    power in % of its maximum reactive power, + over-excited (injecting)."""

    points: tuple[tuple[float, float], ...]  # (v_pct, q_pct), voltages increasing
    response_s: float = 10.0  # open-loop response time asked of the device

    def __post_init__(self) -> None:
        if len(self.points) < 2:
            raise ValueError(f"a volt-var curve needs at least 2 points, got {len(self.points)}")
        for index, (v_pct, q_pct) in enumerate(self.points, start=1):
            if not (math.isfinite(v_pct) and 50.0 <= v_pct <= 150.0):
                raise ValueError(f"point {index}: voltage {v_pct!r} % is outside 50..150 %")
            if not (math.isfinite(q_pct) and -100.0 <= q_pct <= 100.0):
                raise ValueError(f"point {index}: reactive power {q_pct!r} % is outside -100..100 %")
            if index > 1 and v_pct <= self.points[index - 2][0]:
                raise ValueError(f"point {index}: voltages must increase ({v_pct:g} % after {self.points[index - 2][0]:g} %)")
        if not (math.isfinite(self.response_s) and 0.0 <= self.response_s <= 3600.0):
            raise ValueError(f"response time {self.response_s!r} s is outside 0..3600 s")


class DriverFactory(Protocol):
    def __call__(self, asset: Any, cycle_s: float, emit_event: EventSink) -> AssetDriver: ...
