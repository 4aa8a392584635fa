"""One simulated SunSpec device: configuration, physics, register image and write handling.

See the package docstring (``simulators.sunspec``) for the public API and the
control semantics; this module holds :class:`DeviceSpec`,
:class:`SimulatedDevice`, :class:`WriteRecord` and :class:`RevertRecord`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pymodbus.constants import ExcCodes

from . import voltvar
from .image import RegisterImage, default_scale_factors
from .models import decode, layout

log = logging.getLogger("simulators.sunspec")

Kind = Literal["pv", "hybrid", "storage", "meter"]
Fault = Literal["silent", "garbage", "busy"]

DEFAULT_MODELS: dict[str, tuple[int, ...]] = {
    "pv": (1, 103, 120, 121, 123, 704),
    "hybrid": (1, 103, 120, 121, 123, 124, 704, 802),
    "storage": (1, 103, 120, 121, 124, 704, 802),
    "meter": (1, 203),
}
INVERTER_MODELS = (101, 102, 103, 111, 112, 113)
METER_MODELS = (201, 202, 203, 204, 211, 212, 213, 214)
# Register window served per device, from its base address: room for any model set.
WINDOW_REGISTERS = 2000
NOMINAL_V = 230.0  # 121 VRef, 702 VNom/VNomRtg; 705 curve voltages are % of it
VAR_MAX_RATIO = 0.44  # reactive rating / active rating (120 VArRtgQ1, 702 VarMaxInjRtg)


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """One point touched by a Modbus write the device received.

    ``t_s`` is ``time.monotonic()`` when the request was handled; ``raw`` the
    point's raw value after the write (for a rejected write: the value the
    client sent); ``value`` = raw * 10**SF (None if not numeric or not
    implemented); ``accepted`` False when the device answered with an
    exception, ``reason`` says why.
    """

    t_s: float
    unit_id: int
    model_id: int
    point: str
    raw: int | float | str | None
    value: float | None
    accepted: bool = True
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RevertRecord:
    """A revert timer ran out: ``timer`` (e.g. ``"WSetRvrtTms"``) of ``model_id`` at monotonic ``t_s``."""

    t_s: float
    model_id: int
    timer: str


@dataclass
class DeviceSpec:
    """Configuration of one simulated device; see the package docstring for every field."""

    kind: Kind = "pv"
    rated_kw: float = 10.0
    unit_id: int = 1
    base_address: int = 40000
    models: Sequence[int] | None = None
    sun_kw: float | None = None
    pv_peak_kw: float | None = None
    capacity_kwh: float = 10.0
    soc_pct: float = 50.0
    max_charge_kw: float | None = None
    max_discharge_kw: float | None = None
    soc_min_pct: float = 0.0
    soc_max_pct: float = 100.0
    ramp_pct_per_s: float = 100.0
    scale_factors: Mapping[str, int] = field(default_factory=dict)
    port: int = 0
    serial_port: str | None = None
    baudrate: int = 19200
    voltage_v: float = 230.0
    frequency_hz: float = 50.0
    load_kw: float = 0.0
    meter_import_positive: bool = True
    daylight_hours: tuple[float, float] = (6.0, 18.0)
    serial_number: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"DeviceSpec.{name}={getattr(self, name)!r}: {why}")

        if self.kind not in DEFAULT_MODELS:
            raise bad("kind", f"must be one of {', '.join(DEFAULT_MODELS)}")
        for name in ("rated_kw", "capacity_kwh", "voltage_v", "frequency_hz"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise bad(name, "must be a finite number > 0")
        for name in ("sun_kw", "pv_peak_kw", "max_charge_kw", "max_discharge_kw"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise bad(name, "must be None or a finite number >= 0")
        for name in ("soc_pct", "soc_min_pct", "soc_max_pct"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 100):
                raise bad(name, "must be a percentage in [0, 100]")
        if self.soc_min_pct >= self.soc_max_pct:
            raise bad("soc_min_pct", f"must be below soc_max_pct ({self.soc_max_pct})")
        if not (math.isfinite(self.ramp_pct_per_s) and self.ramp_pct_per_s >= 0):
            raise bad("ramp_pct_per_s", "must be >= 0 (0 = no ramp, output jumps)")
        if not math.isfinite(self.load_kw):
            raise bad("load_kw", "must be finite")
        if not (isinstance(self.unit_id, int) and 1 <= self.unit_id <= 247):
            raise bad("unit_id", "must be an integer in [1, 247]")
        if not (isinstance(self.base_address, int) and 0 <= self.base_address <= 65535 - WINDOW_REGISTERS):
            raise bad("base_address", f"must be in [0, {65535 - WINDOW_REGISTERS}] (usually 40000, 0 or 50000)")
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise bad("port", "must be in [0, 65535] (0 = any free port)")
        sunrise, sunset = self.daylight_hours
        if not 0 <= sunrise < sunset <= 24:
            raise bad("daylight_hours", "must be (sunrise, sunset) local hours with 0 <= sunrise < sunset <= 24")
        self.models = check_models(self.kind, self.models)


def check_models(kind: str, models: Sequence[int] | None) -> tuple[int, ...]:
    """The model list to serve: the kind's default, or ``models`` with the common model 1 first."""
    if models is None:
        return DEFAULT_MODELS[kind]
    chosen = [int(m) for m in models]
    if 1 in chosen:
        chosen.remove(1)
    for model_id in chosen:
        layout(model_id)  # raises ValueError for an unknown model
    if kind == "meter" and not any(m in METER_MODELS for m in chosen):
        raise ValueError(f"models={list(models)!r}: a meter needs one of the meter models {METER_MODELS}")
    if kind != "meter" and not any(m in INVERTER_MODELS or m == 701 for m in chosen):
        raise ValueError(f"models={list(models)!r}: a {kind} device needs an inverter model {INVERTER_MODELS} or 701")
    if kind == "meter" and voltvar.MODEL in chosen:
        raise ValueError(f"models={list(models)!r}: model {voltvar.MODEL} (volt-var) needs an inverter, not a meter")
    return (1, *chosen)


# Revert timers: (model, timer point, points whose write restarts it, remaining-time point,
# enable point, its reversion point or constant, [(value point, its reversion point)]).
_REVERT_GROUPS: tuple[tuple[int, str, frozenset[str], str | None, str, str | int, tuple[tuple[str, str], ...]], ...] = (
    (704, "WMaxLimPctRvrtTms", frozenset({"WMaxLimPctEna", "WMaxLimPct", "WMaxLimPctRvrtTms"}),
     "WMaxLimPctRvrtRem", "WMaxLimPctEna", "WMaxLimPctEnaRvrt", (("WMaxLimPct", "WMaxLimPctRvrt"),)),
    (704, "WSetRvrtTms", frozenset({"WSetEna", "WSetMod", "WSet", "WSetPct", "WSetRvrtTms"}),
     "WSetRvrtRem", "WSetEna", "WSetEnaRvrt", (("WSet", "WSetRvrt"), ("WSetPct", "WSetPctRvrt"))),
    (704, "VarSetRvrtTms", frozenset({"VarSetEna", "VarSetMod", "VarSet", "VarSetPct", "VarSetRvrtTms"}),
     "VarSetRvrtRem", "VarSetEna", "VarSetEnaRvrt", (("VarSet", "VarSetRvrt"), ("VarSetPct", "VarSetPctRvrt"))),
    (704, "PFWInjRvrtTms", frozenset({"PFWInjEna", "PFWInj.PF", "PFWInj.Ext", "PFWInjRvrtTms"}),
     "PFWInjRvrtRem", "PFWInjEna", "PFWInjEnaRvrt", ()),
    (704, "PFWAbsRvrtTms", frozenset({"PFWAbsEna", "PFWAbs.PF", "PFWAbs.Ext", "PFWAbsRvrtTms"}),
     "PFWAbsRvrtRem", "PFWAbsEna", "PFWAbsEnaRvrt", ()),
    (123, "WMaxLimPct_RvrtTms", frozenset({"WMaxLimPct", "WMaxLim_Ena", "WMaxLimPct_RvrtTms", "WMaxLimPct_WinTms",
                                           "WMaxLimPct_RmpTms"}), None, "WMaxLim_Ena", 0, ()),
    (123, "OutPFSet_RvrtTms", frozenset({"OutPFSet", "OutPFSet_Ena", "OutPFSet_RvrtTms", "OutPFSet_WinTms",
                                         "OutPFSet_RmpTms"}), None, "OutPFSet_Ena", 0, ()),
    (123, "VArPct_RvrtTms", frozenset({"VArWMaxPct", "VArMaxPct", "VArAvalPct", "VArPct_Mod", "VArPct_Ena",
                                       "VArPct_RvrtTms", "VArPct_WinTms", "VArPct_RmpTms"}), None, "VArPct_Ena", 0, ()),
    (124, "InOutWRte_RvrtTms", frozenset({"StorCtl_Mod", "OutWRte", "InWRte", "InOutWRte_RvrtTms",
                                          "InOutWRte_WinTms", "InOutWRte_RmpTms"}), None, "StorCtl_Mod", 0, ()),
)


class SimulatedDevice:
    """A simulated SunSpec device (see the package docstring).  Created by :class:`SunSpecSimulator`."""

    def __init__(self, spec: DeviceSpec, now: Callable[[], float] = time.monotonic):
        self.spec = spec
        self.kind: str = spec.kind
        self.unit_id = spec.unit_id
        self.rated_kw = float(spec.rated_kw)
        self.port: int = spec.port  # actual TCP port once the simulator has started
        self.serial_port = spec.serial_port
        self._now = now
        self.writes: list[WriteRecord] = []
        self.reverts: list[RevertRecord] = []
        self.fault: str | None = None
        self.refuse_control = False  # set_refuse_control(): every write answered with exception 4
        self.requests = 0  # Modbus requests answered (reads and writes), for benchmarks
        # physics state
        self.max_charge_kw = float(spec.max_charge_kw if spec.max_charge_kw is not None else spec.rated_kw)
        self.max_discharge_kw = float(spec.max_discharge_kw if spec.max_discharge_kw is not None else spec.rated_kw)
        self.pv_peak_kw = float(spec.pv_peak_kw if spec.pv_peak_kw is not None else spec.rated_kw)
        self.capacity_kwh = float(spec.capacity_kwh)
        self.soc_pct = float(spec.soc_pct) if self.has_battery else None
        self.sun_kw = spec.sun_kw
        self.available_kw = 0.0  # PV power available from the sun now
        self.pv_kw = 0.0  # PV power delivered (after curtailment)
        self.battery_kw = 0.0  # + discharge
        self.q_kvar = 0.0
        self.voltage_v = float(spec.voltage_v)
        self.frequency_hz = float(spec.frequency_hz)
        self.load_kw = float(spec.load_kw)  # meter: site consumption
        self.meter_export_kw = 0.0  # meter: + export at the connection point
        self.export_kwh = 0.0
        self.import_kwh = 0.0
        self._last_tick: float | None = None
        self._deadlines: dict[str, float] = {}  # timer point -> monotonic deadline
        self._new_write = asyncio.Event()
        self._dirty = True
        self._replace_hook: Callable[[SimulatedDevice, int], object] | None = None  # set by the simulator
        self._volt_var_error = ""  # why the last 705 adoption failed
        self.image = self._build_image(spec.models, spec.base_address)
        self._controls = self._read_controls()

    # ------------------------------------------------------------------ public state
    @property
    def has_battery(self) -> bool:
        return self.kind in ("hybrid", "storage")

    @property
    def has_pv(self) -> bool:
        return self.kind in ("pv", "hybrid")

    @property
    def base_address(self) -> int:
        return self.image.base

    @property
    def models(self) -> list[int]:
        return list(self.image.model_ids)

    @property
    def power_kw(self) -> float:
        """Active power at the AC terminals, + export; a meter's is its site export."""
        if self.kind == "meter":
            return self.meter_export_kw
        return self.pv_kw + self.battery_kw

    @property
    def limit_pct(self) -> float | None:
        """Active export limit in percent of the rating (the tighter of 704 and 123), None when released."""
        limit_kw = self._controls["limit_kw"]
        return None if limit_kw is None else 100.0 * limit_kw / self.rated_kw

    @property
    def limit_kw(self) -> float | None:
        return self._controls["limit_kw"]

    @property
    def setpoint_kw(self) -> float | None:
        """Active power setpoint in force (704 WSet, or 124 rates for storage), None when released."""
        return self._controls["setpoint_kw"]

    @property
    def control_source(self) -> str | None:
        """Which model's control is in force: "704", "123", "124", "704+123" or None."""
        return self._controls["source"]

    def set_grid(self, voltage_v: float | None = None, frequency_hz: float | None = None) -> None:
        """Grid conditions reported by the inverter/meter models from now on."""
        if voltage_v is not None:
            _require_finite("voltage_v", voltage_v, 0, 1000)
            self.voltage_v = float(voltage_v)
        if frequency_hz is not None:
            _require_finite("frequency_hz", frequency_hz, 40, 70)
            self.frequency_hz = float(frequency_hz)
        self._dirty = True

    def set_sun(self, sun_kw: float | None) -> None:
        """Fix the available PV power (kW), or None to follow the daylight curve."""
        if sun_kw is not None:
            _require_finite("sun_kw", sun_kw, 0, 1e6)
        self.sun_kw = sun_kw

    def set_load(self, load_kw: float) -> None:
        """Meter: site consumption in kW (the meter reports devices' export minus this)."""
        _require_finite("load_kw", load_kw, -1e6, 1e6)
        self.load_kw = float(load_kw)

    def set_soc(self, soc_pct: float) -> None:
        if not self.has_battery:
            raise ValueError(f"set_soc: a {self.kind} device has no battery")
        _require_finite("soc_pct", soc_pct, 0, 100)
        self.soc_pct = float(soc_pct)
        self._dirty = True

    def set_silent(self, silent: bool = True) -> None:
        """Stop answering (requests time out) or answer again."""
        self.set_fault("silent" if silent else None)

    @property
    def silent(self) -> bool:
        return self.fault == "silent"

    def set_refuse_control(self, refuse: bool) -> None:
        """Refuse every write with exception 4 (device failure), as a unit in local mode does;
        reads go on.  Refused writes are recorded (``accepted=False``)."""
        self.refuse_control = bool(refuse)

    def set_fault(self, fault: Fault | None) -> None:
        """``"silent"``: no reply; ``"garbage"``: replies are random bytes; ``"busy"``: every
        request gets exception 6 (device busy); None: healthy.  Requests are not processed
        while a fault is set."""
        if fault not in (None, "silent", "garbage", "busy"):
            raise ValueError(f"set_fault({fault!r}): use None, 'silent', 'garbage' or 'busy'")
        self.fault = fault

    async def replace_models(self, models: Sequence[int], base_address: int | None = None) -> None:
        """Simulate a firmware update: serve a new model list (and optionally a new base).

        Control state is reset to the new image's defaults.  The TCP/serial
        server stays up when only the models change (a connected client just
        sees a different map); a new base address restarts the server on the
        same port, dropping connections like a reboot.
        """
        new_models = check_models(self.kind, models)
        base = self.image.base if base_address is None else base_address
        if not 0 <= base <= 65535 - WINDOW_REGISTERS:
            raise ValueError(f"replace_models: base_address={base} out of range")
        old_base = self.image.base
        self.image = self._build_image(new_models, base)
        self._deadlines.clear()
        self._volt_var_error = ""
        self._controls = self._read_controls()
        self._dirty = True
        log.info("unit %d: models replaced by %s at base %d", self.unit_id, list(new_models), base)
        if base != old_base and self._replace_hook is not None:
            result = self._replace_hook(self, old_base)
            if asyncio.iscoroutine(result):
                await result

    async def next_write(
        self,
        point: str | None = None,
        model_id: int | None = None,
        timeout_s: float = 5.0,
        after_s: float | None = None,
        where: Callable[[WriteRecord], bool] | None = None,
    ) -> WriteRecord:
        """The earliest write record at or after monotonic ``after_s`` (default: now) whose point and
        model match (None = any) and for which ``where(record)`` holds; waits for it up to
        ``timeout_s`` (then TimeoutError).  Rejected writes are records too (``accepted=False``)."""
        start = time.monotonic() if after_s is None else after_s

        def matches(record: WriteRecord) -> bool:
            return (
                (point is None or record.point == point)
                and (model_id is None or record.model_id == model_id)
                and (where is None or where(record))
            )

        def earliest() -> WriteRecord | None:
            found = None
            for record in reversed(self.writes):
                if record.t_s < start:
                    break
                if matches(record):
                    found = record
            return found

        async def wait() -> WriteRecord:
            while (found := earliest()) is None:
                self._new_write.clear()
                await self._new_write.wait()
            return found

        return await asyncio.wait_for(wait(), timeout_s)

    def read_point(self, model_id: int, name: str) -> float | str | None:
        """Current scaled value of a point as a client would read it (numeric) or its raw string."""
        self._publish()
        raw = self.image.get_raw(model_id, name)
        return raw if isinstance(raw, str) else self.image.get(model_id, name)

    def volt_var(self) -> voltvar.VoltVarState:
        """Model 705 state: enabled, curve 1's points, DeptRef, last adoption result (ValueError without 705)."""
        if not self.image.has(voltvar.MODEL):
            raise ValueError(f"volt_var: unit {self.unit_id} does not serve model {voltvar.MODEL}")
        return voltvar.state(self.image, self._volt_var_error)

    @property
    def var_max_kvar(self) -> float:
        """Reactive power rating (704 VarSetPct and 705 VAR_MAX_PCT are percent of it)."""
        return self.rated_kw * VAR_MAX_RATIO

    def __repr__(self) -> str:
        where = self.serial_port or f"port {self.port}"
        return (
            f"<SimulatedDevice {self.kind} unit {self.unit_id} {where} base {self.image.base}"
            f" P={self.power_kw:.2f} kW>"
        )

    # ------------------------------------------------------------------ image
    def _build_image(self, models: Sequence[int], base: int) -> RegisterImage:
        sfs = default_scale_factors(self.rated_kw, self.capacity_kwh)
        for name in self.spec.scale_factors:  # a plain override wins over per-model defaults
            for key in [k for k in sfs if k.endswith("." + name)]:
                del sfs[key]
        sfs.update(self.spec.scale_factors)
        image = RegisterImage(base, models, sfs)
        if len(image) > WINDOW_REGISTERS:
            raise ValueError(f"models {list(models)} need {len(image)} registers, more than {WINDOW_REGISTERS}")
        serial = self.spec.serial_number or f"SIM{self.port:05d}-{self.unit_id:03d}"
        image.set_raw(1, "Mn", "flexedge")
        image.set_raw(1, "Md", f"sim-{self.kind}")
        image.set_raw(1, "Vr", "1.0.0")
        image.set_raw(1, "SN", serial)
        image.set_raw(1, "DA", self.unit_id)
        rated_w = self.rated_kw * 1000
        for inverter in INVERTER_MODELS:
            image.set(inverter, "St", 2)
        # 120 nameplate
        image.set_raw(120, "DERTyp", 82 if self.has_battery else 4)
        for name, value in (
            ("WRtg", rated_w), ("VARtg", rated_w), ("VArRtgQ1", rated_w * VAR_MAX_RATIO), ("VArRtgQ2", rated_w * VAR_MAX_RATIO),
            ("VArRtgQ3", -rated_w * VAR_MAX_RATIO), ("VArRtgQ4", -rated_w * VAR_MAX_RATIO), ("ARtg", rated_w / (3 * 230)),
            ("PFRtgQ1", 0.9), ("PFRtgQ2", 0.9), ("PFRtgQ3", -0.9), ("PFRtgQ4", -0.9),
        ):
            image.set(120, name, value)
        if self.has_battery:
            image.set(120, "WHRtg", self.capacity_kwh * 1000)
            image.set(120, "MaxChaRte", self.max_charge_kw * 1000)
            image.set(120, "MaxDisChaRte", self.max_discharge_kw * 1000)
        # 121 settings
        for name, value in (
            ("WMax", rated_w), ("VRef", NOMINAL_V), ("VRefOfs", 0.0), ("VMax", 253.0), ("VMin", 207.0),
            ("VAMax", rated_w), ("ECPNomHz", 50.0), ("WGra", 100.0),
        ):
            image.set(121, name, value)
        image.set_raw(121, "ConnPh", 7)
        # 123 immediate controls: released
        for name, raw in (("Conn", 1), ("WMaxLim_Ena", 0), ("OutPFSet_Ena", 0), ("VArPct_Ena", 0),
                          ("VArPct_Mod", 1), ("WMaxLimPct_RvrtTms", 0), ("WMaxLimPct_WinTms", 0),
                          ("WMaxLimPct_RmpTms", 0), ("Conn_WinTms", 0), ("Conn_RvrtTms", 0),
                          ("OutPFSet_WinTms", 0), ("OutPFSet_RvrtTms", 0), ("OutPFSet_RmpTms", 0),
                          ("VArPct_WinTms", 0), ("VArPct_RvrtTms", 0), ("VArPct_RmpTms", 0)):
            image.set_raw(123, name, raw)
        image.set(123, "WMaxLimPct", 100.0)
        image.set(123, "OutPFSet", 1.0)
        for name in ("VArWMaxPct", "VArMaxPct", "VArAvalPct"):
            image.set(123, name, 0.0)
        # 124 storage: no rate control
        if self.has_battery:
            image.set(124, "WChaMax", self.max_charge_kw * 1000)
            image.set(124, "WChaGra", 100.0)
            image.set(124, "WDisChaGra", 100.0)
            image.set(124, "VAChaMax", self.max_charge_kw * 1000)
            image.set(124, "MinRsvPct", self.spec.soc_min_pct)
            for name, raw in (("StorCtl_Mod", 0), ("InOutWRte_WinTms", 0), ("InOutWRte_RvrtTms", 0),
                              ("InOutWRte_RmpTms", 0), ("ChaGriSet", 1)):
                image.set_raw(124, name, raw)
            image.set(124, "OutWRte", 0.0)
            image.set(124, "InWRte", 0.0)
            # 802 battery
            image.set(802, "WHRtg", self.capacity_kwh * 1000)
            image.set(802, "WChaRteMax", self.max_charge_kw * 1000)
            image.set(802, "WDisChaRteMax", self.max_discharge_kw * 1000)
            image.set(802, "SoCMax", self.spec.soc_max_pct)
            image.set(802, "SoCMin", self.spec.soc_min_pct)
            image.set(802, "SoH", 100.0)
            image.set_raw(802, "LocRemCtl", 0)
            image.set_raw(802, "Typ", 4)  # lithium-ion
            image.set_raw(802, "State", 3)
        # 702 capacity, 703 enter service
        for name, value in (
            ("WMaxRtg", rated_w), ("VAMaxRtg", rated_w), ("VarMaxInjRtg", rated_w * VAR_MAX_RATIO),
            ("VarMaxAbsRtg", rated_w * VAR_MAX_RATIO), ("VNomRtg", NOMINAL_V), ("VMaxRtg", 253.0), ("VMinRtg", 207.0),
            ("AMaxRtg", rated_w / (3 * 230)), ("WMax", rated_w), ("VAMax", rated_w), ("VNom", NOMINAL_V),
        ):
            image.set(702, name, value)
        if self.has_battery:
            for name, value in (("WChaRteMaxRtg", self.max_charge_kw * 1000),
                                ("WDisChaRteMaxRtg", self.max_discharge_kw * 1000),
                                ("WChaRteMax", self.max_charge_kw * 1000),
                                ("WDisChaRteMax", self.max_discharge_kw * 1000)):
                image.set(702, name, value)
        image.set_raw(703, "ES", 1)
        # 704 controls: all released, revert timers off
        for name, raw in (
            ("PFWInjEna", 0), ("PFWInjEnaRvrt", 0), ("PFWInjRvrtTms", 0), ("PFWInjRvrtRem", 0),
            ("PFWAbsEna", 0), ("PFWAbsEnaRvrt", 0), ("PFWAbsRvrtTms", 0), ("PFWAbsRvrtRem", 0),
            ("WMaxLimPctEna", 0), ("WMaxLimPctEnaRvrt", 0), ("WMaxLimPctRvrtTms", 0), ("WMaxLimPctRvrtRem", 0),
            ("WSetEna", 0), ("WSetMod", 1), ("WSetEnaRvrt", 0), ("WSetRvrtTms", 0), ("WSetRvrtRem", 0),
            ("VarSetEna", 0), ("VarSetMod", 4), ("VarSetPri", 0), ("VarSetEnaRvrt", 0), ("VarSetRvrtTms", 0),
            ("VarSetRvrtRem", 0), ("WRmp", 0), ("WRmpRef", 1), ("VarRmp", 0), ("AntiIslEna", 0),
        ):
            image.set_raw(704, name, raw)
        for name, value in (("WMaxLimPct", 100.0), ("WMaxLimPctRvrt", 100.0), ("WSet", 0.0), ("WSetRvrt", 0.0),
                            ("WSetPct", 0.0), ("WSetPctRvrt", 0.0), ("VarSet", 0.0), ("VarSetRvrt", 0.0),
                            ("VarSetPct", 0.0), ("VarSetPctRvrt", 0.0)):
            image.set(704, name, value)
        if image.has(voltvar.MODEL):
            voltvar.init(image)
        return image

    def _publish(self) -> None:
        """Encode the measurements into the image (only after something changed)."""
        if not self._dirty:
            return
        self._dirty = False
        image = self.image
        v = self.voltage_v
        hz = self.frequency_hz
        if self.kind == "meter":
            self._publish_meter()
            return
        p_w = self.power_kw * 1000
        q_var = self.q_kvar * 1000
        s_va = math.hypot(p_w, q_var)
        pf = p_w / s_va if s_va > 1e-3 else 1.0
        amps = s_va / (3 * v)
        if p_w > 1:
            state = 5 if (self.limit_kw is not None or self.setpoint_kw is not None) else 4
        elif p_w < -1:
            state = 4
        else:
            state = 8 if self.has_battery else 2
        for model in INVERTER_MODELS:
            if not image.has(model):
                continue
            for name, value in (
                ("A", amps), ("AphA", amps), ("AphB", amps), ("AphC", amps),
                ("PhVphA", v), ("PhVphB", v), ("PhVphC", v),
                ("PPVphAB", v * math.sqrt(3)), ("PPVphBC", v * math.sqrt(3)), ("PPVphCA", v * math.sqrt(3)),
                ("W", p_w), ("Hz", hz), ("VA", s_va), ("VAr", q_var), ("PF", pf * 100),
                ("WH", self.export_kwh * 1000), ("DCW", self.pv_kw * 1000 if self.has_pv else p_w),
                ("DCV", 600.0 if self.has_pv else 400.0), ("TmpCab", 35.0),
            ):
                image.set(model, name, value)
            image.set_raw(model, "St", state)
        if image.has(701):
            for name, value in (
                ("W", p_w), ("VA", s_va), ("Var", q_var), ("PF", pf), ("A", amps), ("LLV", v * math.sqrt(3)),
                ("LNV", v), ("Hz", hz), ("TotWhInj", self.export_kwh * 1000), ("TotWhAbs", self.import_kwh * 1000),
                ("WL1", p_w / 3), ("WL2", p_w / 3), ("WL3", p_w / 3), ("VL1", v), ("VL2", v), ("VL3", v),
                ("AL1", amps), ("AL2", amps), ("AL3", amps),
            ):
                image.set(701, name, value)
            image.set_raw(701, "ACType", 3)
            image.set_raw(701, "St", 1)
            image.set_raw(701, "InvSt", 1 if abs(p_w) > 1 else 0)
            image.set_raw(701, "ConnSt", 1)
        if self.has_battery:
            soc = self.soc_pct
            if self.battery_kw > 1e-3:
                cha_st = 3
            elif self.battery_kw < -1e-3:
                cha_st = 4
            elif soc <= self.spec.soc_min_pct:
                cha_st = 2
            elif soc >= self.spec.soc_max_pct:
                cha_st = 5
            else:
                cha_st = 6
            image.set(124, "ChaState", soc)
            image.set_raw(124, "ChaSt", cha_st)
            image.set(124, "InBatV", 400.0)
            image.set(802, "SoC", soc)
            image.set(802, "DoD", 100.0 - soc)
            image.set_raw(802, "ChaSt", cha_st)
            image.set(802, "V", 400.0)
            image.set(802, "W", self.battery_kw * 1000)
            image.set(802, "A", self.battery_kw * 1000 / 400.0)
        now = self._now()
        for model_id, timer, _, remaining, *_ in _REVERT_GROUPS:
            if remaining is not None and image.has(model_id, remaining):
                deadline = self._deadlines.get(timer)
                image.set_raw(model_id, remaining, 0 if deadline is None else max(0, math.ceil(deadline - now)))

    def _publish_meter(self) -> None:
        image = self.image
        sign = -1.0 if self.spec.meter_import_positive else 1.0
        p_w = sign * self.meter_export_kw * 1000
        v, hz = self.voltage_v, self.frequency_hz
        amps = abs(p_w) / (3 * v)
        for model in METER_MODELS:
            if not image.has(model):
                continue
            for name, value in (
                ("A", amps), ("AphA", amps), ("AphB", amps), ("AphC", amps), ("PhV", v), ("PhVphA", v),
                ("PhVphB", v), ("PhVphC", v), ("PPV", v * math.sqrt(3)), ("PhVphAB", v * math.sqrt(3)),
                ("PhVphBC", v * math.sqrt(3)), ("PhVphCA", v * math.sqrt(3)), ("Hz", hz), ("W", p_w),
                ("WphA", p_w / 3), ("WphB", p_w / 3), ("WphC", p_w / 3), ("VA", abs(p_w)), ("VAphA", abs(p_w) / 3),
                ("VAphB", abs(p_w) / 3), ("VAphC", abs(p_w) / 3), ("VAR", 0.0), ("PF", 100.0 if p_w >= 0 else -100.0),
                ("TotWhExp", self.export_kwh * 1000), ("TotWhImp", self.import_kwh * 1000),
            ):
                image.set(model, name, value)

    # ------------------------------------------------------------------ controls
    def _read_controls(self) -> dict:
        """Decode the control registers into the targets the physics follows."""
        image = self.image
        limits: list[float] = []
        sources: list[str] = []
        setpoint_kw: float | None = None
        if image.has(704) and image.get_raw(704, "WMaxLimPctEna") == 1:
            ref_w = image.get(702, "WMaxRtg") or image.get(120, "WRtg") or self.rated_kw * 1000
            pct = image.get(704, "WMaxLimPct")
            if pct is not None:
                limits.append(pct / 100 * ref_w / 1000)
                sources.append("704")
        if image.has(123) and image.get_raw(123, "WMaxLim_Ena") == 1:
            ref_w = image.get(121, "WMax") or image.get(120, "WRtg") or self.rated_kw * 1000
            pct = image.get(123, "WMaxLimPct")
            if pct is not None:
                limits.append(pct / 100 * ref_w / 1000)
                sources.append("123")
        for model_id in (121, 702):  # the WMax setting caps output whatever else is commanded
            wmax_w = image.get(model_id, "WMax")
            if wmax_w is not None and wmax_w < self.rated_kw * 1000 * 0.9999:
                limits.append(wmax_w / 1000)
                sources.append(str(model_id))
        if image.has(704) and image.get_raw(704, "WSetEna") == 1:
            if image.get_raw(704, "WSetMod") == 0:
                ref_w = image.get(702, "WMaxRtg") or image.get(120, "WRtg") or self.rated_kw * 1000
                setpoint_kw = (image.get(704, "WSetPct") or 0.0) / 100 * ref_w / 1000
            else:
                setpoint_kw = (image.get(704, "WSet") or 0.0) / 1000
            sources.append("704")
        storage_kw: float | None = None
        if self.has_battery and image.has(124):
            mode = image.get_raw(124, "StorCtl_Mod") or 0
            w_cha_max = image.get(124, "WChaMax") or self.max_charge_kw * 1000
            if mode & 2:
                storage_kw = (image.get(124, "OutWRte") or 0.0) / 100 * w_cha_max / 1000
            elif mode & 1:
                storage_kw = -(image.get(124, "InWRte") or 0.0) / 100 * w_cha_max / 1000
            if storage_kw is not None:
                sources.append("124")
        q_kvar: float | None = None
        if image.has(704) and image.get_raw(704, "VarSetEna") == 1:
            mode = image.get_raw(704, "VarSetMod")
            if mode == 4:
                q_kvar = (image.get(704, "VarSet") or 0.0) / 1000
            else:
                q_kvar = (image.get(704, "VarSetPct") or 0.0) / 100 * self.var_max_kvar
        volt_var = voltvar.active_curve(image)
        if volt_var is not None:  # one reactive power mode at a time: an enabled curve wins over a 704 VarSet
            points, of_wmax = volt_var
            wmax_w = image.get(702, "WMax") or image.get(121, "WMax") or self.rated_kw * 1000
            volt_var = (points, wmax_w / 1000 if of_wmax else self.var_max_kvar)
        source = "+".join(s for s in dict.fromkeys(sources) if s) or None
        return {
            "limit_kw": min(limits) if limits else None,
            "setpoint_kw": setpoint_kw if setpoint_kw is not None else (storage_kw if self.kind == "storage" else None),
            "wset_kw": setpoint_kw,
            "storage_kw": storage_kw,
            "q_kvar": q_kvar,
            "volt_var": volt_var,  # (curve points, kvar per 100 %) or None
            "source": source,
        }

    # ------------------------------------------------------------------ physics
    def tick(self, now: float, sun_fraction: float) -> None:
        """Advance the physics to monotonic time ``now``; ``sun_fraction`` in [0, 1] is the daylight curve."""
        first = self._last_tick is None
        dt = 0.0 if first else min(max(now - self._last_tick, 0.0), 5.0)
        self._last_tick = now
        self._expire_timers(now)
        if self.kind == "meter":
            self._dirty = True
            return
        controls = self._controls
        rated = self.rated_kw
        limit = rated if controls["limit_kw"] is None else min(rated, controls["limit_kw"])
        avail = 0.0
        if self.has_pv:
            avail = self.sun_kw if self.sun_kw is not None else self.pv_peak_kw * sun_fraction
        self.available_kw = avail
        battery_target = 0.0
        if self.kind == "pv":
            target = controls["wset_kw"]
            pv_target = min(avail, limit, rated if target is None else max(0.0, target))
        elif self.kind == "storage":
            command = controls["wset_kw"] if controls["wset_kw"] is not None else controls["storage_kw"]
            battery_target = self._battery_limits(min(command or 0.0, limit))
            pv_target = 0.0
        else:  # hybrid: the AC setpoint (704 WSet) is met by battery + PV; else 124 drives the battery
            setpoint = controls["wset_kw"]
            if setpoint is not None:
                setpoint = min(setpoint, limit)
                battery_target = self._battery_limits(setpoint - avail)
                pv_target = max(0.0, min(avail, setpoint - battery_target, rated - battery_target))
            else:
                battery_target = self._battery_limits(min(controls["storage_kw"] or 0.0, limit))
                pv_target = max(0.0, min(avail, limit - battery_target, rated - battery_target))
        step = math.inf if first or self.spec.ramp_pct_per_s == 0 else self.spec.ramp_pct_per_s / 100 * rated * dt
        self.pv_kw = _approach(self.pv_kw, pv_target, step)
        self.battery_kw = _approach(self.battery_kw, battery_target, step)
        if controls["volt_var"] is not None:
            points, ref_kvar = controls["volt_var"]
            q_target = voltvar.var_pct_at(points, self.voltage_v / NOMINAL_V * 100) / 100 * ref_kvar
        else:
            q_target = controls["q_kvar"] or 0.0
        self.q_kvar = _approach(self.q_kvar, q_target, step)
        if self.has_battery and dt > 0:
            self.soc_pct -= self.battery_kw * dt / 3600 / self.capacity_kwh * 100
            self.soc_pct = min(100.0, max(0.0, self.soc_pct))
        power = self.power_kw
        if power > 0:
            self.export_kwh += power * dt / 3600
        else:
            self.import_kwh -= power * dt / 3600
        self._dirty = True

    def meter_tick(self, now: float, devices_kw: float) -> None:
        """Meter: the site exports ``devices_kw`` (sum of the other devices) minus its load."""
        dt = 0.0 if self._last_tick is None else min(max(now - self._last_tick, 0.0), 5.0)
        self._last_tick = now
        self.meter_export_kw = devices_kw - self.load_kw
        if self.meter_export_kw > 0:
            self.export_kwh += self.meter_export_kw * dt / 3600
        else:
            self.import_kwh -= self.meter_export_kw * dt / 3600
        self._dirty = True

    def _battery_limits(self, command_kw: float) -> float:
        """Clamp a battery command (+ discharge) to the rates and the state of charge."""
        kw = min(max(command_kw, -self.max_charge_kw), self.max_discharge_kw)
        if kw > 0 and self.soc_pct <= self.spec.soc_min_pct:
            return 0.0
        if kw < 0 and self.soc_pct >= self.spec.soc_max_pct:
            return 0.0
        return kw

    def _expire_timers(self, now: float) -> None:
        if not self._deadlines:
            return
        for model_id, timer, _, _, ena, ena_rvrt, values in _REVERT_GROUPS:
            deadline = self._deadlines.get(timer)
            if deadline is None or now < deadline:
                continue
            del self._deadlines[timer]
            revert_to = ena_rvrt if isinstance(ena_rvrt, int) else (self.image.get_raw(model_id, ena_rvrt) or 0)
            self.image.set_raw(model_id, ena, revert_to)
            if revert_to == 1:
                for value, value_rvrt in values:
                    if self.image.has(model_id, value_rvrt):
                        self.image.set_raw(model_id, value, self.image.get_raw(model_id, value_rvrt))
            self.reverts.append(RevertRecord(now, model_id, timer))
            log.info("unit %d: revert timer %d.%s ran out, %s=%s", self.unit_id, model_id, timer, ena, revert_to)
            self._controls = self._read_controls()
            self._dirty = True

    # ------------------------------------------------------------------ Modbus access
    async def modbus_action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus ``SimDevice`` action: serve reads from the image, validate and apply writes."""
        if self.fault is not None:
            return ExcCodes.DEVICE_BUSY if self.fault == "busy" else ExcCodes.DEVICE_FAILURE
        offset = address - self.image.base
        if offset < 0 or offset + count > len(self.image.regs):
            return ExcCodes.ILLEGAL_ADDRESS
        if set_values is not None:
            result = self.handle_write(offset, [int(v) for v in set_values])
            if result is not None:
                return result
        else:
            if function_code in (3, 4):  # not the read-back pymodbus does after a write
                self.requests += 1
            self._publish()
        window = address - start_address
        registers[window : window + count] = self.image.regs[offset : offset + count]
        return None

    def handle_write(self, offset: int, values: list[int]) -> ExcCodes | None:
        """Apply a write of ``values`` at image offset ``offset``; an exception code rejects it whole."""
        now = self._now()
        image = self.image
        end = offset + len(values)
        if self.refuse_control:
            owner = image.owner[offset] if 0 <= offset < len(image.owner) else None
            model_id, name = (owner[0], owner[1].name) if owner else (0, f"register {image.base + offset}")
            return self._reject(now, model_id, name, values, "control refused (local mode)", ExcCodes.DEVICE_FAILURE)
        touched: dict[int, tuple[int, object]] = {}  # point start index -> (model_id, PointDef)
        for index in range(offset, end):
            owner = image.owner[index]
            if owner is None:
                return self._reject(now, 0, f"register {image.base + index}", values, "not writable (marker/ID/L)")
            model_id, point, start = owner
            if not point.writable:
                return self._reject(now, model_id, point.name, values, "read-only point")
            if model_id == voltvar.MODEL and (refused := voltvar.write_refused(image, point.name)):
                return self._reject(now, model_id, point.name, values, refused)
            touched[start] = (model_id, point)
        new_regs = image.regs[:]
        new_regs[offset:end] = values
        decoded: list[tuple[int, object, object]] = []
        for start, (model_id, point) in touched.items():
            raw = decode(point, new_regs[start : start + point.size])
            problem = self._check_value(model_id, point, raw, new_regs, start)
            if problem:
                return self._reject(now, model_id, point.name, raw, problem)
            decoded.append((model_id, point, raw))
        image.regs[offset:end] = values
        self.requests += 1
        for model_id, point, raw in decoded:
            value = image.get(model_id, point.name) if isinstance(raw, (int, float)) else None
            self.writes.append(WriteRecord(now, self.unit_id, model_id, point.name, raw, value))
            log.info("unit %d: write %d.%s raw=%s value=%s", self.unit_id, model_id, point.name, raw, value)
        if any(m == voltvar.MODEL and p.name == "AdptCrvReq" for m, p, _ in decoded):
            self._adopt_curve()
        self._restart_timers(now, {(m, p.name) for m, p, _ in decoded})
        self._controls = self._read_controls()
        self._dirty = True
        self._new_write.set()
        return None

    def _check_value(self, model_id: int, point, raw, new_regs: list[int], start: int) -> str:
        if model_id == voltvar.MODEL:
            return voltvar.check_value(self.image, point, raw)
        if raw is None:
            return "value is the 'not implemented' marker"
        if point.symbols and raw not in point.symbols:
            return f"{raw} is not one of {sorted(point.symbols)}"
        name = point.name
        if name in ("WMaxLimPct", "WMaxLimPctRvrt", "WSetPct", "WSetPctRvrt"):
            pct = raw * 10.0 ** self.image.scale_factor(model_id, name)
            low = -100.0 if name.startswith("WSetPct") else 0.0
            if not low <= pct <= 100.0:
                return f"{pct:g} % is outside [{low:g}, 100] %"
        elif name in ("OutWRte", "InWRte"):
            pct = raw * 10.0 ** self.image.scale_factor(model_id, name)
            if not -100.0 <= pct <= 100.0:
                return f"{pct:g} % is outside [-100, 100] %"
        elif name == "StorCtl_Mod" and not 0 <= raw <= 3:
            return f"{raw} has bits other than 0 (charge) and 1 (discharge)"
        elif name in ("WSet", "WSetRvrt"):
            watts = raw * 10.0 ** self.image.scale_factor(model_id, name)
            rated_w = self.rated_kw * 1000
            if abs(watts) > rated_w * 1.001:
                return f"{watts:g} W exceeds the rating ±{rated_w:g} W"
        elif name in ("WMax", "WChaMax"):
            watts = raw * 10.0 ** self.image.scale_factor(model_id, name)
            if not 0 <= watts <= self.rated_kw * 1000 * 1.001:
                return f"{watts:g} W is outside [0, {self.rated_kw * 1000:g}] W"
        return ""

    def _adopt_curve(self) -> None:
        number, error = voltvar.adopt(self.image)
        if not number:  # AdptCrvReq = 0 asks for nothing
            return
        self._volt_var_error = error
        if error:
            log.info("unit %d: 705 curve %d not adopted: %s", self.unit_id, number, error)
        else:
            log.info("unit %d: 705 curve %d adopted", self.unit_id, number)

    def _reject(self, now: float, model_id: int, point: str, raw, reason: str, code: ExcCodes | None = None) -> ExcCodes:
        if code is None:
            code = ExcCodes.ILLEGAL_ADDRESS if "writable" in reason or "read-only" in reason else ExcCodes.ILLEGAL_VALUE
        self.writes.append(WriteRecord(now, self.unit_id, model_id, point, raw, None, accepted=False, reason=reason))
        log.info("unit %d: rejected write %d.%s raw=%s: %s", self.unit_id, model_id, point, raw, reason)
        self._new_write.set()
        return code

    def _restart_timers(self, now: float, written: set[tuple[int, str]]) -> None:
        for model_id, timer, members, _, ena, _, _ in _REVERT_GROUPS:
            if not any((model_id, name) in written for name in members) or not self.image.has(model_id, timer):
                continue
            seconds = self.image.get_raw(model_id, timer) or 0
            enabled = self.image.get_raw(model_id, ena)
            if seconds > 0 and enabled not in (None, 0):
                self._deadlines[timer] = now + seconds
            else:
                self._deadlines.pop(timer, None)


def _approach(current: float, target: float, step: float) -> float:
    if abs(target - current) <= step:
        return target
    return current + step if target > current else current - step


def _require_finite(name: str, value: float, low: float, high: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name}={value!r}: must be a finite number in [{low:g}, {high:g}]")


def daylight_fraction(local_hour: float, sunrise: float, sunset: float) -> float:
    """Share of peak PV power at ``local_hour``: a half sine between sunrise and sunset, else 0."""
    if not sunrise < local_hour < sunset:
        return 0.0
    return math.sin(math.pi * (local_hour - sunrise) / (sunset - sunrise))
