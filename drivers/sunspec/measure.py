"""From decoded SunSpec models to an ``AssetReading``, with plausibility checks.

Sources, first implemented wins:

================  ===========================================================
p_kw              inverter 101-103/111-113 ``W``, else 701 ``W`` (both: +
                  output/generation, so + export); meter 201-204/211-214
                  ``W`` negated (SunSpec meters count + as import)
q_kvar            inverter ``VAr``, else 701 ``Var``; meter ``VAR`` negated
voltage_v         inverter mean of ``PhVphA..C``, else 701 ``LNV``; meter
                  ``PhV``, else mean of ``PhVphA..C``
frequency_hz      ``Hz`` of the same model (0 Hz means "not measuring": None)
soc_pct           802 ``SoC``, else 124 ``ChaState``
q_max_kvar        with a reactive-power control path only: the smaller of the
                  injection and absorption ratings, 702 ``VarMaxInj`` /
                  ``VarMaxAbs``, else ``VarMaxInjRtg`` / ``VarMaxAbsRtg``,
                  else 120 ``VArRtgQ1`` / ``VArRtgQ4``; none known: None
                  (noted in ``detail``, no reactive control)
rating            the lower of the profile's ``rated_kw`` and the device's:
                  the lower of its nameplate (702 ``WMaxRtg``, else 120
                  ``WRtg``) and its setting (702 ``WMax``, else 121 ``WMax``)
charge max        the lower of the profile's ``max_charge_kw`` and the
                  device's (first of 702 ``WChaRteMax``, ``WChaRteMaxRtg``,
                  802 ``WChaRteMax``, 120 ``MaxChaRte``, 124 ``WChaMax``);
                  neither: the rating
discharge max     likewise with ``max_discharge_kw``, ``WDisChaRteMax``,
                  ``WDisChaRteMaxRtg``, 802 ``WDisChaRteMax``, 120
                  ``MaxDisChaRte``, 124 ``WChaMax``
================  ===========================================================

Where the profile and the device disagree, the lower figure wins (docs/dispatch.md,
"Ratings"); ``device_ratings`` gives the device's figures for the daemon to compare.

Commandable range: pv 0..rating; bess -charge max..+discharge max (through
124 also at most ``WChaMax``; through a limit-only path no charging), 0 on
the discharge side at or below ``soc_min_pct`` and on the charge side at or
above ``soc_max_pct``; meter and uncontrollable devices: None.

Plausibility: a value that is not finite, |P| or |Q| above ten times the
higher of the profile's and the device's rating (pv/bess), a voltage outside
0..100 kV, a frequency outside 40..70 Hz or a SoC outside 0..100 % is dropped
(None) and makes the reading degraded, with the reason in ``detail``.  An inverter reporting ``St`` = FAULT is
degraded too.

Public API: ``build_reading(asset, blocks, path, now, var_path=None) -> AssetReading``
(``asset`` the ``SunSpecAsset``, ``blocks`` the ``ModelBlock`` per model id,
``path`` and ``var_path`` the active and reactive control paths from
``drivers.sunspec.control``, ``now`` the wall-clock time of the read);
``device_ratings(kind, blocks) -> dict[str, DeviceRating]`` (the device's own
``rated_kw``, and for ``bess`` ``max_charge_kw`` / ``max_discharge_kw``).
"""

from __future__ import annotations

import math

from edge.asset import AssetReading, DeviceRating

from drivers.sunspec.codec import ModelBlock
from drivers.sunspec.control import PATH_CAN_CHARGE

INVERTER_MODELS = (103, 102, 101, 113, 112, 111)
METER_MODELS = (203, 204, 202, 201, 213, 214, 212, 211)
INVERTER_FAULT = 7  # 101-103 St enum: FAULT
PLAUSIBLE_FACTOR = 10.0

# Where the device states its ratings, first implemented (and positive) wins.  A setting
# (WMax) can be below the nameplate, never above: the device's figure is the lower of the two.
NAMEPLATE_POINTS = ((702, "WMaxRtg"), (120, "WRtg"))
SETTING_POINTS = ((702, "WMax"), (121, "WMax"))
CHARGE_POINTS = ((702, "WChaRteMax"), (702, "WChaRteMaxRtg"), (802, "WChaRteMax"), (120, "MaxChaRte"), (124, "WChaMax"))
DISCHARGE_POINTS = ((702, "WDisChaRteMax"), (702, "WDisChaRteMaxRtg"), (802, "WDisChaRteMax"), (120, "MaxDisChaRte"),
                    (124, "WChaMax"))


class _Collector:
    def __init__(self, blocks: dict[int, ModelBlock]):
        self.blocks = blocks
        self.problems: list[str] = []

    def value(self, model_id: int, point: str) -> float | None:
        block = self.blocks.get(model_id)
        if block is None:
            return None
        try:
            value = block.value(point)
        except ValueError as error:
            self.problems.append(str(error))
            return None
        if value is not None and not math.isfinite(value):
            self.problems.append(f"model {model_id} {point} is {value}")
            return None
        return value

    def first(self, candidates) -> float | None:
        for model_id, point in candidates:
            value = self.value(model_id, point)
            if value is not None:
                return value
        return None

    def first_rating(self, candidates) -> DeviceRating | None:
        """The first positive rating among ``candidates`` (W points), in kW, with its source."""
        for model_id, point in candidates:
            watts = self.value(model_id, point)
            if watts is not None and watts > 0:
                return DeviceRating(watts / 1000.0, f"SunSpec {model_id} {point}")
        return None

    def mean(self, model_id: int, points) -> float | None:
        values = [v for v in (self.value(model_id, p) for p in points) if v is not None]
        return sum(values) / len(values) if values else None

    def checked(self, name: str, value: float | None, lo: float, hi: float, unit: str) -> float | None:
        if value is None:
            return None
        if not lo <= value <= hi:
            self.problems.append(f"implausible {name} {value:g} {unit} (expected {lo:g}..{hi:g})")
            return None
        return value


def _kw(watts: float | None) -> float | None:
    return None if watts is None else watts / 1000.0


def _inverter_model(blocks) -> int | None:
    return next((m for m in INVERTER_MODELS if m in blocks), None)


def _meter_model(blocks) -> int | None:
    return next((m for m in METER_MODELS if m in blocks), None)


def _electrical(c: _Collector, kind: str):
    """(p_w, q_var, voltage_v, frequency_hz) in the flexedge sign convention."""
    if kind == "meter":
        meter = _meter_model(c.blocks)
        if meter is None:
            return None, None, None, None
        w, var = c.value(meter, "W"), c.value(meter, "VAR")
        voltage = c.value(meter, "PhV")
        if voltage is None:
            voltage = c.mean(meter, ("PhVphA", "PhVphB", "PhVphC"))
        return (None if w is None else -w), (None if var is None else -var), voltage, c.value(meter, "Hz")
    inverter = _inverter_model(c.blocks)
    w = var = voltage = hz = None
    if inverter is not None:
        w, var, hz = c.value(inverter, "W"), c.value(inverter, "VAr"), c.value(inverter, "Hz")
        voltage = c.mean(inverter, ("PhVphA", "PhVphB", "PhVphC"))
        if c.blocks[inverter].raw("St") == INVERTER_FAULT:
            c.problems.append(f"inverter {inverter} St is FAULT")
    if 701 in c.blocks:
        w = w if w is not None else c.value(701, "W")
        var = var if var is not None else c.value(701, "Var")
        voltage = voltage if voltage is not None else c.value(701, "LNV")
        hz = hz if hz is not None else c.value(701, "Hz")
    return w, var, voltage, hz


def _device_ratings(kind: str, c: _Collector) -> dict[str, DeviceRating]:
    if kind == "meter":
        return {}
    ratings = {}
    nameplate, setting = c.first_rating(NAMEPLATE_POINTS), c.first_rating(SETTING_POINTS)
    rated = min((r for r in (nameplate, setting) if r is not None), key=lambda r: r.power_kw, default=None)
    if rated is not None:
        ratings["rated_kw"] = rated
    if kind == "bess":
        for key, points in (("max_charge_kw", CHARGE_POINTS), ("max_discharge_kw", DISCHARGE_POINTS)):
            rating = c.first_rating(points)
            if rating is not None:
                ratings[key] = rating
    return ratings


def device_ratings(kind: str, blocks: dict[int, ModelBlock]) -> dict[str, DeviceRating]:
    """The ratings the device states (``AssetDriver.device_ratings``): empty for a meter."""
    return _device_ratings(kind, _Collector(blocks))


def _lower(profile_kw: float | None, device: DeviceRating | None) -> float | None:
    """The rule where the profile and the device both give a rating: the lower one."""
    if device is None:
        return profile_kw
    return device.power_kw if profile_kw is None else min(profile_kw, device.power_kw)


def _storage_limit_kw(profile_kw, device: DeviceRating | None, rating_kw) -> float | None:
    limit = _lower(profile_kw, device)
    return rating_kw if limit is None else limit


def _range(asset, c: _Collector, path: str | None, rating_kw, soc,
           device: dict[str, DeviceRating]) -> tuple[float | None, float | None]:
    if asset.kind == "meter" or path is None:
        return None, None
    if asset.kind == "pv":
        return (0.0, rating_kw) if rating_kw is not None else (0.0, None)
    charge = _storage_limit_kw(asset.max_charge_kw, device.get("max_charge_kw"), rating_kw)
    discharge = _storage_limit_kw(asset.max_discharge_kw, device.get("max_discharge_kw"), rating_kw)
    if path == "124-rate":
        wchamax = _kw(c.value(124, "WChaMax"))
        if wchamax is not None:
            charge = min(charge, wchamax) if charge is not None else wchamax
            discharge = min(discharge, wchamax) if discharge is not None else wchamax
    if not PATH_CAN_CHARGE.get(path, False):
        charge = 0.0
    p_min = -charge if charge is not None else None
    p_max = discharge
    if soc is not None:
        if soc <= asset.soc_min_pct:
            p_max = 0.0
        if soc >= asset.soc_max_pct:
            p_min = 0.0
    return (0.0 if p_min == 0 else p_min), p_max


def _reactive_rating_kvar(c: _Collector) -> float | None:
    """The reactive power the device can hold both ways, from its ratings (var)."""
    for inject, absorb in (((702, "VarMaxInj"), (702, "VarMaxAbs")), ((702, "VarMaxInjRtg"), (702, "VarMaxAbsRtg")),
                           ((120, "VArRtgQ1"), (120, "VArRtgQ4"))):
        values = [abs(v) for v in (c.value(*inject), c.value(*absorb)) if v is not None]
        if values and min(values) > 0:
            return min(values) / 1000.0
    return None


def build_reading(asset, blocks: dict[int, ModelBlock], path: str | None, now: float,
                  var_path: str | None = None) -> AssetReading:
    c = _Collector(blocks)
    w, var, voltage, hz = _electrical(c, asset.kind)
    device = _device_ratings(asset.kind, c)
    device_rated = device.get("rated_kw")
    rating_kw = _lower(asset.rated_kw, device_rated)
    # What the device can physically measure is bounded by the larger figure, whatever the
    # profile derates it to (a device released from control runs up to its own rating).
    physical_kw = max(asset.rated_kw or 0.0, device_rated.power_kw if device_rated is not None else 0.0)
    p_kw, q_kvar = _kw(w), _kw(var)
    if physical_kw:
        bound = PLAUSIBLE_FACTOR * physical_kw
        p_kw = c.checked("active power", p_kw, -bound, bound, "kW")
        q_kvar = c.checked("reactive power", q_kvar, -bound, bound, "kvar")
    voltage = c.checked("voltage", voltage, 0.0, 100_000.0, "V")
    if hz == 0:
        hz = None
    hz = c.checked("frequency", hz, 40.0, 70.0, "Hz")
    soc = None
    if asset.kind == "bess":
        soc = c.checked("state of charge", c.first([(802, "SoC"), (124, "ChaState")]), 0.0, 100.0, "%")
    p_min, p_max = _range(asset, c, path, rating_kw, soc, device)
    if asset.kind != "meter" and path is None and asset.controllable:
        c.problems.append("no control model (704, 123 or 124) found")
    q_max = _reactive_rating_kvar(c) if var_path is not None and asset.controllable else None
    notes = []
    if var_path is not None and asset.controllable and q_max is None:
        notes.append("no reactive-power rating (702 VarMaxInj/VarMaxAbs, 120 VArRtgQ1/Q4): no reactive control")
    return AssetReading(
        online=True,
        p_kw=p_kw,
        q_kvar=q_kvar,
        soc_pct=soc,
        p_min_kw=p_min,
        p_max_kw=p_max,
        q_max_kvar=q_max,
        voltage_v=voltage,
        frequency_hz=hz,
        degraded=bool(c.problems),
        detail="; ".join(c.problems + notes),
        read_at=now,
    )
