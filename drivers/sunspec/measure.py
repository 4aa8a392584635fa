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

Values are decoded as ``ModelBlock.value`` decodes them (scale factors applied,
"not implemented" markers None); a scale factor outside -10..10 or a value that is not
finite is dropped and noted in ``detail`` (the reading is degraded).

Public API:

``ReadingDecoder(asset, models)``
    Compiled once per model map: ``models`` maps each polled model id to
    ``(layout, start)``, its ``ModelLayout`` and the index of its ``ID`` register in
    the list of registers a poll returns.  Each point the reading needs is resolved
    once (``drivers.sunspec.decoders``): its register, type and scale factor's
    register; so is which model each quantity comes from.
    ``decode(regs, path, now, var_path=None) -> (AssetReading, dict[str, DeviceRating])``
    is the reading and the device's ratings from one poll's registers (``path`` and
    ``var_path`` the active and reactive control paths from ``drivers.sunspec.control``,
    ``now`` the wall-clock time of the read).  ``ratings(regs)`` is the ratings alone.

``build_reading(asset, blocks, path, now, var_path=None) -> AssetReading``
    The same reading from ``ModelBlock`` per model id (``asset`` the
    ``SunSpecAsset``), compiled for the call.
``device_ratings(kind, blocks) -> dict[str, DeviceRating]``
    The device's own ``rated_kw``, and for ``bess`` ``max_charge_kw`` /
    ``max_discharge_kw``, from ``ModelBlock`` per model id.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Mapping

from edge.asset import AssetReading, DeviceRating

from drivers.sunspec.codec import ModelBlock, ModelLayout
from drivers.sunspec.control import PATH_CAN_CHARGE
from drivers.sunspec.decoders import ValueDecoder, raw_decoder, value_decoder

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


def _kw(watts: float | None) -> float | None:
    return None if watts is None else watts / 1000.0


def _inverter_model(models) -> int | None:
    return next((m for m in INVERTER_MODELS if m in models), None)


def _meter_model(models) -> int | None:
    return next((m for m in METER_MODELS if m in models), None)


def _lower(profile_kw: float | None, device: DeviceRating | None) -> float | None:
    """The rule where the profile and the device both give a rating: the lower one."""
    if device is None:
        return profile_kw
    return device.power_kw if profile_kw is None else min(profile_kw, device.power_kw)


def _storage_limit_kw(profile_kw, device: DeviceRating | None, rating_kw) -> float | None:
    limit = _lower(profile_kw, device)
    return rating_kw if limit is None else limit


def _absent(regs, problems) -> None:
    """The decoder of a point the device does not have: never a value, never a problem."""
    return None


def _mean(decoders, regs, problems) -> float | None:
    values = [v for v in (decode(regs, problems) for decode in decoders) if v is not None]
    return sum(values) / len(values) if values else None


def _first(decoders, regs, problems) -> float | None:
    for decode in decoders:
        value = decode(regs, problems)
        if value is not None:
            return value
    return None


def _first_rating(candidates, regs, problems) -> DeviceRating | None:
    """The first positive rating among ``candidates`` (W points), in kW, with its source."""
    for decode, source in candidates:
        watts = decode(regs, problems)
        if watts is not None and watts > 0:
            return DeviceRating(watts / 1000.0, source)
    return None


def _checked(problems, name: str, value: float | None, lo: float, hi: float, unit: str) -> float | None:
    if value is None:
        return None
    if not lo <= value <= hi:
        problems.append(f"implausible {name} {value:g} {unit} (expected {lo:g}..{hi:g})")
        return None
    return value


class ReadingDecoder:
    """The reading and the device's ratings, compiled for one set of model layouts (see the module doc)."""

    def __init__(self, asset, models: Mapping[int, tuple[ModelLayout, int]]):
        self.asset = asset
        self.kind = kind = asset.kind

        def decoder(model_id: int, point: str) -> ValueDecoder | None:
            found = models.get(model_id)
            return None if found is None else value_decoder(found[0], point, found[1])

        def present(points) -> tuple[ValueDecoder, ...]:
            # A point the device lacks reads None and is never a problem: leaving it out changes nothing.
            return tuple(d for d in (decoder(m, p) for m, p in points) if d is not None)

        def ratings(points) -> tuple[tuple[ValueDecoder, str], ...]:
            return tuple((d, f"SunSpec {m} {p}") for m, p in points if (d := decoder(m, p)) is not None)

        # Where each quantity comes from (see the table above): fixed by the models the device has.
        self._meter = self._inverter = self._der = None
        if kind == "meter":
            meter = _meter_model(models)
            if meter is not None:
                self._meter = (
                    decoder(meter, "W") or _absent, decoder(meter, "VAR") or _absent,
                    decoder(meter, "PhV") or _absent,
                    present((meter, p) for p in ("PhVphA", "PhVphB", "PhVphC")), decoder(meter, "Hz") or _absent,
                )
        else:
            inverter = _inverter_model(models)
            if inverter is not None:
                layout, start = models[inverter]
                self._inverter = (
                    decoder(inverter, "W") or _absent, decoder(inverter, "VAr") or _absent,
                    decoder(inverter, "Hz") or _absent, present((inverter, p) for p in ("PhVphA", "PhVphB", "PhVphC")),
                    raw_decoder(layout, "St", start), f"inverter {inverter} St is FAULT",
                )
            if 701 in models:
                self._der = tuple(decoder(701, p) or _absent for p in ("W", "Var", "LNV", "Hz"))
        self._nameplate = ratings(NAMEPLATE_POINTS)
        self._setting = ratings(SETTING_POINTS)
        self._charge = ratings(CHARGE_POINTS)
        self._discharge = ratings(DISCHARGE_POINTS)
        self._soc = present(((802, "SoC"), (124, "ChaState")))
        self._wchamax = decoder(124, "WChaMax") or _absent
        self._reactive = tuple(
            pair for pair in (
                tuple(decoder(*point) for point in points)
                for points in (((702, "VarMaxInj"), (702, "VarMaxAbs")), ((702, "VarMaxInjRtg"), (702, "VarMaxAbsRtg")),
                               ((120, "VArRtgQ1"), (120, "VArRtgQ4")))
            ) if pair != (None, None)
        )

    def _electrical(self, regs, problems):
        """(p_w, q_var, voltage_v, frequency_hz) in the flexedge sign convention."""
        if self.kind == "meter":
            if self._meter is None:
                return None, None, None, None
            w_of, var_of, phv_of, phases, hz_of = self._meter
            w, var = w_of(regs, problems), var_of(regs, problems)
            voltage = phv_of(regs, problems)
            if voltage is None:
                voltage = _mean(phases, regs, problems)
            return (None if w is None else -w), (None if var is None else -var), voltage, hz_of(regs, problems)
        w = var = voltage = hz = None
        if self._inverter is not None:
            w_of, var_of, hz_of, phases, state_of, fault = self._inverter
            w, var, hz = w_of(regs, problems), var_of(regs, problems), hz_of(regs, problems)
            voltage = _mean(phases, regs, problems)
            if state_of is not None and state_of(regs) == INVERTER_FAULT:
                problems.append(fault)
        if self._der is not None:
            w_of, var_of, lnv_of, hz_of = self._der
            w = w if w is not None else w_of(regs, problems)
            var = var if var is not None else var_of(regs, problems)
            voltage = voltage if voltage is not None else lnv_of(regs, problems)
            hz = hz if hz is not None else hz_of(regs, problems)
        return w, var, voltage, hz

    def _device_ratings(self, regs, problems) -> dict[str, DeviceRating]:
        if self.kind == "meter":
            return {}
        ratings = {}
        nameplate = _first_rating(self._nameplate, regs, problems)
        setting = _first_rating(self._setting, regs, problems)
        rated = min((r for r in (nameplate, setting) if r is not None), key=lambda r: r.power_kw, default=None)
        if rated is not None:
            ratings["rated_kw"] = rated
        if self.kind == "bess":
            for key, candidates in (("max_charge_kw", self._charge), ("max_discharge_kw", self._discharge)):
                rating = _first_rating(candidates, regs, problems)
                if rating is not None:
                    ratings[key] = rating
        return ratings

    def ratings(self, regs: list[int]) -> dict[str, DeviceRating]:
        """The ratings the device states (``AssetDriver.device_ratings``): empty for a meter."""
        return self._device_ratings(regs, [])

    def _range(self, regs, problems, path: str | None, rating_kw, soc,
               device: dict[str, DeviceRating]) -> tuple[float | None, float | None]:
        asset = self.asset
        if self.kind == "meter" or path is None:
            return None, None
        if self.kind == "pv":
            return (0.0, rating_kw) if rating_kw is not None else (0.0, None)
        charge = _storage_limit_kw(asset.max_charge_kw, device.get("max_charge_kw"), rating_kw)
        discharge = _storage_limit_kw(asset.max_discharge_kw, device.get("max_discharge_kw"), rating_kw)
        if path == "124-rate":
            wchamax = _kw(self._wchamax(regs, problems))
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

    def _reactive_rating_kvar(self, regs, problems) -> float | None:
        """The reactive power the device can hold both ways, from its ratings (var)."""
        for pair in self._reactive:
            values = [abs(v) for v in (d(regs, problems) if d is not None else None for d in pair) if v is not None]
            if values and min(values) > 0:
                return min(values) / 1000.0
        return None

    def decode(self, regs: list[int], path: str | None, now: float, var_path: str | None = None,
               ) -> tuple[AssetReading, dict[str, DeviceRating]]:
        asset = self.asset
        problems: list[str] = []
        w, var, voltage, hz = self._electrical(regs, problems)
        device = self._device_ratings(regs, problems)
        device_rated = device.get("rated_kw")
        rating_kw = _lower(asset.rated_kw, device_rated)
        # What the device can physically measure is bounded by the larger figure, whatever the
        # profile derates it to (a device released from control runs up to its own rating).
        physical_kw = max(asset.rated_kw or 0.0, device_rated.power_kw if device_rated is not None else 0.0)
        p_kw, q_kvar = _kw(w), _kw(var)
        if physical_kw:
            bound = PLAUSIBLE_FACTOR * physical_kw
            p_kw = _checked(problems, "active power", p_kw, -bound, bound, "kW")
            q_kvar = _checked(problems, "reactive power", q_kvar, -bound, bound, "kvar")
        voltage = _checked(problems, "voltage", voltage, 0.0, 100_000.0, "V")
        if hz == 0:
            hz = None
        hz = _checked(problems, "frequency", hz, 40.0, 70.0, "Hz")
        soc = None
        if self.kind == "bess":
            soc = _checked(problems, "state of charge", _first(self._soc, regs, problems), 0.0, 100.0, "%")
        p_min, p_max = self._range(regs, problems, path, rating_kw, soc, device)
        if self.kind != "meter" and path is None and asset.controllable:
            problems.append("no control model (704, 123 or 124) found")
        q_max = self._reactive_rating_kvar(regs, problems) if var_path is not None and asset.controllable else None
        notes = []  # in detail, but no reason to call the reading degraded
        if var_path is not None and asset.controllable and q_max is None:
            notes.append("no reactive-power rating (702 VarMaxInj/VarMaxAbs, 120 VArRtgQ1/Q4): no reactive control")
        reading = AssetReading(
            online=True,
            p_kw=p_kw,
            q_kvar=q_kvar,
            soc_pct=soc,
            p_min_kw=p_min,
            p_max_kw=p_max,
            q_max_kvar=q_max,
            voltage_v=voltage,
            frequency_hz=hz,
            degraded=bool(problems),
            detail="; ".join(problems + notes),
            read_at=now,
        )
        return reading, device


def _compile(asset, blocks: Mapping[int, ModelBlock]) -> tuple[ReadingDecoder, list[int]]:
    regs: list[int] = []
    models: dict[int, tuple[ModelLayout, int]] = {}
    for model_id, block in blocks.items():
        models[model_id] = (block.layout, len(regs))
        regs += block.registers
    return ReadingDecoder(asset, models), regs


def build_reading(asset, blocks: Mapping[int, ModelBlock], path: str | None, now: float,
                  var_path: str | None = None) -> AssetReading:
    decoder, regs = _compile(asset, blocks)
    return decoder.decode(regs, path, now, var_path)[0]


def device_ratings(kind: str, blocks: Mapping[int, ModelBlock]) -> dict[str, DeviceRating]:
    """The ratings the device states (``AssetDriver.device_ratings``): empty for a meter."""
    decoder, regs = _compile(SimpleNamespace(kind=kind), blocks)  # the ratings need only the kind
    return decoder.ratings(regs)
