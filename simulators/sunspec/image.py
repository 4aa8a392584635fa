"""A device's SunSpec register map: "SunS", then each model's ID, L and points, then 0xFFFF, 0.

:class:`RegisterImage` owns the register list (index 0 = the base address) and
reads/writes points by ``(model_id, point_name)``, raw or scaled
(value = raw * 10**SF).  If a model appears more than once, the first one is
addressed.  Every point starts as "not implemented", except count points (e.g.
705 ``NCrv``, ``NPt``), which hold the instances laid out, and scale-factor
points, which get :func:`default_scale_factors` (overridable per name or per
``"model.name"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .models import END_MARKER, SUNS_MARKER, ModelLayout, PointDef, decode, encode, layout


def _decimal_sf(max_value: float, register_max: int, floor: int) -> int:
    """Smallest SF >= floor for which ``max_value`` (with 20 % headroom) fits ``register_max``."""
    if max_value <= 0:
        return floor
    return max(floor, math.ceil(math.log10(max_value * 1.2 / register_max)))


def default_scale_factors(rated_kw: float, capacity_kwh: float) -> dict[str, int]:
    """The simulator's default SF for each sunssf point name (any name not listed gets 0).

    Deliberately non-trivial so that a client that forgets to scale is caught:
    powers SF 1 (10 W steps; raised for ratings above ~270 kW so int16 does not
    overflow), percentages SF -2, WSet/VarSet SF -1, voltage -1, frequency -2,
    current -2 (raised for big ratings), power factor -3, SoC -1, energy ratings
    SF 1, curve dependent values (705 ``Var`` in %) -1.
    """
    power_sf = _decimal_sf(rated_kw * 1000, 32767, 1)
    amp_sf = _decimal_sf(rated_kw * 1000 / (3 * 230), 32767, -2)
    energy_sf = _decimal_sf(capacity_kwh * 1000, 65535, 1)
    sfs = dict.fromkeys(
        (
            "W_SF", "WRtg_SF", "VARtg_SF", "VArRtg_SF", "VA_SF", "VAr_SF", "VAR_SF", "Var_SF",
            "WMax_SF", "VAMax_SF", "VArMax_SF", "WChaMax_SF", "VAChaMax_SF", "MaxChaRte_SF",
            "MaxDisChaRte_SF", "WChaDisChaMax_SF", "DCW_SF",
        ),
        power_sf,
    )
    sfs.update(dict.fromkeys(("A_SF", "ARtg_SF", "AMax_SF", "DCA_SF"), amp_sf))
    sfs.update(dict.fromkeys(("WHRtg_SF",), energy_sf))
    sfs.update(
        dict.fromkeys(
            ("WMaxLimPct_SF", "InOutWRte_SF", "WSetPct_SF", "VarSetPct_SF", "VArPct_SF", "WGra_SF"), -2
        )
    )
    sfs.update(dict.fromkeys(("WSet_SF", "VarSet_SF"), -1))
    sfs.update(dict.fromkeys(("PF_SF", "OutPFSet_SF", "PFRtg_SF", "PFMin_SF", "CellV_SF"), -3))
    sfs["DeptRef_SF"] = -1
    sfs.update(dict.fromkeys(("V_SF", "VRef_SF", "VRefOfs_SF", "VMinMax_SF", "DCV_SF", "InBatV_SF"), -1))
    sfs.update(dict.fromkeys(("Hz_SF", "ECPNomHz_SF"), -2))
    # PF is a percentage in the inverter and meter models, a ratio in 701/704
    sfs.update({f"{model}.PF_SF": -1 for model in (101, 102, 103, 201, 202, 203, 204)})
    sfs.update(dict.fromkeys(("SoC_SF", "ChaState_SF", "DoD_SF", "SoH_SF", "MinRsvPct_SF", "Tmp_SF"), -1))
    return sfs


class RegisterImage:
    """Registers of one device, ``regs[0]`` at ``base``."""

    def __init__(self, base: int, model_ids: Sequence[int], scale_factors: Mapping[str, int]):
        self.base = base
        self.model_ids = list(model_ids)
        self.regs: list[int] = list(SUNS_MARKER)
        # (model_id, point) -> (index into regs, PointDef, index of the SF point or None)
        self._points: dict[tuple[int, str], tuple[int, PointDef, int | None]] = {}
        # per register: (model_id, PointDef, index of the point's first register), None for markers/ID/L
        self.owner: list[tuple[int, PointDef, int] | None] = [None, None]
        self.model_starts: list[tuple[int, int]] = []  # (model_id, index of its ID register)
        for model_id in self.model_ids:
            self._append_model(layout(model_id), scale_factors)
        self.regs.extend(END_MARKER)
        self.owner.extend((None, None))

    def _append_model(self, model: ModelLayout, scale_factors: Mapping[str, int]) -> None:
        start = len(self.regs)
        self.model_starts.append((model.model_id, start))
        first = (model.model_id, "ID") not in self._points
        self.regs.extend((model.model_id, model.length))
        self.owner.extend((None, None))
        for point in model.points.values():
            if point.name in ("ID", "L"):
                continue
            index = start + point.offset
            assert index == len(self.regs), f"model {model.model_id} point {point.name} out of order"
            self.regs.extend(encode(point, None))
            self.owner.extend([(model.model_id, point, index)] * point.size)
        for point in model.points.values():
            sf_index = None
            if isinstance(point.sf, str) and point.sf in model.points:
                sf_index = start + model.points[point.sf].offset
            if first:
                self._points[(model.model_id, point.name)] = (start + point.offset, point, sf_index)
            if point.type == "sunssf":
                sf = scale_factors.get(f"{model.model_id}.{point.name}", scale_factors.get(point.name, 0))
                self.regs[start + point.offset] = sf & 0xFFFF
        for name, count in model.counts.items():  # a client sizes the repeating groups from these
            point = model.points[name]
            self.regs[start + point.offset : start + point.offset + point.size] = encode(point, count)

    def __len__(self) -> int:
        return len(self.regs)

    def has(self, model_id: int, name: str = "ID") -> bool:
        return (model_id, name) in self._points

    def names(self, model_id: int) -> list[str]:
        """Point names of a model, in register order."""
        return [name for mid, name in self._points if mid == model_id]

    def point(self, model_id: int, name: str) -> PointDef:
        return self._points[(model_id, name)][1]

    def address_of(self, model_id: int, name: str = "ID") -> int:
        """Modbus address of a point (or of a model's ID register)."""
        if name == "ID":
            return self.base + next(start for mid, start in self.model_starts if mid == model_id)
        return self.base + self._points[(model_id, name)][0]

    def get_raw(self, model_id: int, name: str) -> int | float | str | None:
        index, point, _ = self._points[(model_id, name)]
        return decode(point, self.regs[index : index + point.size])

    def set_raw(self, model_id: int, name: str, raw: int | float | str | None) -> bool:
        """Set a point's raw value; False (and nothing changed) if the device lacks it."""
        entry = self._points.get((model_id, name))
        if entry is None:
            return False
        index, point, _ = entry
        self.regs[index : index + point.size] = encode(point, raw)
        return True

    def scale_factor(self, model_id: int, name: str) -> int:
        _, point, sf_index = self._points[(model_id, name)]
        if isinstance(point.sf, int):
            return point.sf
        if sf_index is None:
            return 0
        raw = self.regs[sf_index]
        return 0 if raw == 0x8000 else (raw - 0x10000 if raw & 0x8000 else raw)

    def get(self, model_id: int, name: str) -> float | None:
        """Scaled value of a numeric point, None if absent or not implemented."""
        if (model_id, name) not in self._points:
            return None
        raw = self.get_raw(model_id, name)
        if raw is None or isinstance(raw, (str, bytes)):
            return None
        return raw * 10.0 ** self.scale_factor(model_id, name)

    def set(self, model_id: int, name: str, value: float | str | None) -> bool:
        """Set a point from its scaled value (raw = round(value / 10**SF)); False if absent."""
        if (model_id, name) not in self._points:
            return False
        if value is None or isinstance(value, str) or self.point(model_id, name).type.startswith("float"):
            return self.set_raw(model_id, name, value)
        return self.set_raw(model_id, name, round(value / 10.0 ** self.scale_factor(model_id, name)))
