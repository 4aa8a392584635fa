"""SunSpec point layouts and value coding, built on pysunspec2's model definitions.

pysunspec2 is used here only for what it is good at without blocking: its JSON
model definitions (``sunspec2.device.get_model_def``) give each point's name,
type, size and scale-factor point, and ``sunspec2.mb.point_type_info`` packs and
unpacks the SunSpec types.  Offsets are counted from the model's ``ID`` register
(so ``ID`` is at 0, ``L`` at 1, the first data point at 2), as in the
definitions.

Public API:

``layout_for(model_id, length, counts=None) -> ModelLayout | None``
    The layout of a model whose header says ``L == length``; None when
    pysunspec2 has no definition for ``model_id``.  Without ``counts`` only the
    model's top-level points are laid out (704's PF groups are never needed).
    With ``counts`` (count point name -> value read from the device, e.g.
    ``{"NCrv": 3, "NPt": 4}`` for 705) the groups are laid out too, each
    instance numbered from 1 as SunSpec numbers curves (``AdptCrvReq``):
    ``Crv[2].ActPt``, ``Crv[2].Pt[1].V``.  A group whose count is unknown ends
    the layout there.  A point that does not fit inside ``length`` is absent:
    a device may implement a shorter, older revision of a model.

``ModelBlock(layout, registers, address=0)``
    One model as read from the device, ``registers`` starting at its ``ID``
    register, which is at ``address``; ``address_of(name)`` is a point's
    register address.
    ``raw(name)`` is the unscaled value, ``value(name)`` applies the scale
    factor (value = raw x 10**SF).  Both return None for a point that is absent
    or holds the "not implemented" marker (int16 0x8000, uint16/enum16/
    bitfield16 0xFFFF, int32 0x80000000, uint32 0xFFFFFFFF, acc 0, float NaN,
    sunssf 0x8000).  ``value`` raises ``ValueProblem`` when the data cannot be a
    measurement: a scale factor outside -10..10 or a non-finite float.

``encode(spec, value, sf) -> list[int]``
    Registers for writing ``value`` (in the point's unit) to a point whose
    scale factor is ``sf`` (None: unscaled): raw = round(value / 10**sf).
    Raises ``EncodeError`` naming the point when the value is not finite or the
    raw value does not fit the type (the "not implemented" marker is never
    produced).
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

from sunspec2 import mb as sunspec_mb
from sunspec2.device import get_model_def

SF_LIMIT = 10  # |SF| beyond this is a device bug, not a unit choice

# Raw ranges a write may use: the type's range minus its "not implemented" marker.
_WRITE_RANGES = {
    "int16": (-32767, 32767),
    "uint16": (0, 65534),
    "enum16": (0, 65534),
    "bitfield16": (0, 65534),
    "sunssf": (-32767, 32767),
    "int32": (-(2**31) + 1, 2**31 - 1),
    "uint32": (0, 2**32 - 2),
    "enum32": (0, 2**32 - 2),
    "bitfield32": (0, 2**32 - 2),
}


class ValueProblem(ValueError):
    """Register content that cannot be a valid measurement."""


class EncodeError(ValueError):
    """A value that cannot be written to a point."""


@dataclass(frozen=True, slots=True)
class PointSpec:
    """Where a point lives in its model and how it is coded."""

    name: str
    offset: int  # registers from the model's ID register
    size: int  # registers
    type: str  # SunSpec type name: int16, uint32, float32, sunssf, ...
    sf: str | int | None  # scale-factor point name, fixed exponent, or None
    writable: bool


@dataclass(frozen=True, slots=True)
class ModelLayout:
    model_id: int
    length: int  # L from the device's header (registers after ID and L)
    name: str
    points: dict[str, PointSpec]

    def has(self, name: str) -> bool:
        return name in self.points


def _group_points(group: dict, prefix: str, offset: int, counts: dict[str, int] | None,
                  specs: list[PointSpec]) -> int | None:
    """Append the group's points (then, with ``counts``, its groups'); the offset after it, None if unknown."""
    for pdef in group.get("points", []):
        ptype = pdef["type"]
        size = int(pdef.get("size") or sunspec_mb.point_type_info[ptype].len)
        sf = pdef.get("sf")
        if isinstance(sf, str) and sf.lstrip("-").isdigit():
            sf = int(sf)
        specs.append(PointSpec(prefix + pdef["name"], offset, size, ptype, sf, pdef.get("access") == "RW"))
        offset += size
    if counts is None:
        return offset
    for sub in group.get("groups", []):
        count = sub.get("count", 1)
        count = counts.get(count) if isinstance(count, str) else int(count or 1)
        if count is None:
            return None
        for index in range(1, count + 1):
            offset = _group_points(sub, f"{prefix}{sub['name']}[{index}].", offset, counts, specs)
            if offset is None:
                return None
    return offset


@functools.lru_cache(maxsize=None)
def _definition_points(model_id: int, counts: tuple[tuple[str, int], ...] | None = None,
                       ) -> tuple[str, tuple[PointSpec, ...]] | None:
    try:
        definition = get_model_def(model_id)
    except Exception:
        return None
    group = definition["group"]
    specs: list[PointSpec] = []
    _group_points(group, "", 0, dict(counts) if counts is not None else None, specs)
    return group.get("name", str(model_id)), tuple(specs)


def layout_for(model_id: int, length: int, counts: dict[str, int] | None = None) -> ModelLayout | None:
    found = _definition_points(model_id, tuple(sorted(counts.items())) if counts is not None else None)
    if found is None:
        return None
    name, specs = found
    points = {p.name: p for p in specs if p.offset + p.size <= length + 2}
    return ModelLayout(model_id, length, name, points)


def _registers_to_bytes(registers: list[int]) -> bytes:
    return struct.pack(f">{len(registers)}H", *registers)


def _bytes_to_registers(data: bytes) -> list[int]:
    return list(struct.unpack(f">{len(data) // 2}H", data))


class ModelBlock:
    """The registers of one model, decoded on demand."""

    def __init__(self, layout: ModelLayout, registers: list[int], address: int = 0):
        if len(registers) < layout.length + 2:
            raise ValueError(
                f"model {layout.model_id} needs {layout.length + 2} registers, got {len(registers)}"
            )
        self.layout = layout
        self.registers = registers
        self.address = address  # of the ID register on the device

    def address_of(self, name: str) -> int:
        return self.address + self.layout.points[name].offset

    @property
    def model_id(self) -> int:
        return self.layout.model_id

    def has(self, name: str) -> bool:
        return self.layout.has(name)

    def raw(self, name: str) -> int | float | str | None:
        spec = self.layout.points.get(name)
        if spec is None:
            return None
        info = sunspec_mb.point_type_info[spec.type]
        data = _registers_to_bytes(self.registers[spec.offset : spec.offset + spec.size])
        value = info.data_to(data)
        if value is None or not info.is_impl(value):
            return None
        if isinstance(value, float) and math.isnan(value):
            return None
        return value

    def sf(self, name: str) -> int | None:
        """The scale-factor exponent of point ``name`` (0 for unscaled points); None if unknown."""
        spec = self.layout.points.get(name)
        if spec is None:
            return None
        if spec.sf is None:
            return 0
        if isinstance(spec.sf, int):
            return spec.sf
        exponent = self.raw(spec.sf)
        if exponent is None:
            return None
        if not -SF_LIMIT <= exponent <= SF_LIMIT:
            raise ValueProblem(f"model {self.model_id} {spec.sf}={exponent} is outside -{SF_LIMIT}..{SF_LIMIT}")
        return int(exponent)

    def value(self, name: str) -> float | None:
        raw = self.raw(name)
        if raw is None or isinstance(raw, str):
            return None
        exponent = self.sf(name)
        if exponent is None:
            return None
        if isinstance(raw, float) and not math.isfinite(raw):
            raise ValueProblem(f"model {self.model_id} {name} is {raw}")
        return scale(raw, exponent)

    def text(self, name: str) -> str | None:
        """A string point, trimmed; None if absent or empty.  Bytes that are not UTF-8 (Latin-1
        text, 0xFFFF filler) are replaced, not refused: a device's name is worth less than its data."""
        spec = self.layout.points.get(name)
        if spec is None or spec.type != "string":
            raw = self.raw(name)
            return raw.strip("\0 ").strip() if isinstance(raw, str) else None
        data = _registers_to_bytes(self.registers[spec.offset : spec.offset + spec.size])
        text = data.decode("utf-8", errors="replace").strip("\0 ").strip()
        return text if text.strip("\ufffd") else None  # 0xFFFF filler: no name at all


def scale(raw: int | float, exponent: int) -> float:
    # Dividing by a power of ten keeps 1234 x 10**-2 at 12.34 (multiplying gives 12.340000000000002).
    if exponent >= 0:
        return float(raw * 10**exponent)
    return raw / 10 ** (-exponent)


def encode(spec: PointSpec, value: float, sf: int | None) -> list[int]:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EncodeError(f"{spec.name}: cannot write {value!r} (not a finite number)")
    info = sunspec_mb.point_type_info[spec.type]
    if spec.type in ("float32", "float64"):
        return _bytes_to_registers(info.to_data(float(value), spec.size * 2))
    exponent = sf or 0
    raw = round(value * 10 ** (-exponent)) if exponent <= 0 else round(value / 10**exponent)
    bounds = _WRITE_RANGES.get(spec.type)
    if bounds is None:
        raise EncodeError(f"{spec.name}: writing type {spec.type} is not supported")
    lo, hi = bounds
    if not lo <= raw <= hi:
        raise EncodeError(
            f"{spec.name}: {value:g} with SF {exponent} gives raw {raw}, outside {lo}..{hi} for {spec.type}"
        )
    return _bytes_to_registers(info.to_data(raw, spec.size * 2))
