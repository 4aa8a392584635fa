"""SunSpec register layouts and point codec, built from pysunspec2's JSON model definitions.

``layout(model_id)`` flattens a model definition into a :class:`ModelLayout`:
every point with its register offset (0 = the model's ``ID`` register), size,
type, scale-factor point and access.  Points of nested groups are named
``"Group.Point"``; a group laid out more than once gets a 0-based index per
instance, ``"Group[i].Point"`` (i = 0 .. count-1, as pysunspec2 indexes
``model.Group[i]``), nested ones one index per level.  A group that repeats a
fixed number of times (count > 1 in the definition) is indexed.  A group whose
count is another point's value (a "count point", e.g. 705 ``Crv``/``NCrv``) is
laid out ``counts[count point]`` times and always indexed, even for 1 (defaults
per model in :data:`GROUP_COUNTS`); without a count it is laid out once,
unindexed.  :attr:`ModelLayout.counts` gives the value every count point must
hold (1 for the groups laid out once); the register image writes them.

Model 705 (DERVoltVar) with the default 3 curves of 4 points: ``"Crv[0].ActPt"``
... ``"Crv[2].ReadOnly"``, ``"Crv[0].Pt[0].V"``, ``"Crv[0].Pt[0].Var"`` ...
``"Crv[2].Pt[3].Var"``.  SunSpec numbers curves from 1 (``AdptCrvReq``), so
curve n is ``"Crv[n-1]"``.

``encode(point, raw)`` / ``decode(point, regs)`` convert between raw point
values and big-endian 16-bit registers.  ``None`` encodes to the SunSpec
"not implemented" marker of the type (int16 0x8000, uint16 0xFFFF, int32
0x80000000, uint32 0xFFFFFFFF, accumulators 0, float NaN, strings all zero)
and those markers decode to ``None``.  Values outside a type's range are
clamped to the nearest value that is not the marker, as a saturating device
would.

Scaling (applied by callers): value = raw * 10**SF.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from sunspec2.device import get_model_def

SUNS_MARKER = (0x5375, 0x6E53)  # "SunS"
END_MARKER = (0xFFFF, 0)

VOLT_VAR_CURVES = 3  # 705 NCrv: curve 1 (in force, read-only) and two writable ones
VOLT_VAR_POINTS = 4  # 705 NPt
# Instances of the groups counted by a point, per model: {count point: instances}.
GROUP_COUNTS: dict[int, dict[str, int]] = {705: {"NCrv": VOLT_VAR_CURVES, "NPt": VOLT_VAR_POINTS}}

# type -> (registers, struct code or None, not-implemented raw value)
_INT_TYPES: dict[str, tuple[int, str, int | None]] = {
    "int16": (1, "h", -0x8000),
    "sunssf": (1, "h", -0x8000),
    "pad": (1, "H", 0x8000),
    "uint16": (1, "H", 0xFFFF),
    "enum16": (1, "H", 0xFFFF),
    "bitfield16": (1, "H", 0xFFFF),
    "count": (1, "H", 0xFFFF),
    "acc16": (1, "H", 0),
    "int32": (2, "i", -0x80000000),
    "uint32": (2, "I", 0xFFFFFFFF),
    "enum32": (2, "I", 0xFFFFFFFF),
    "bitfield32": (2, "I", 0xFFFFFFFF),
    "ipaddr": (2, "I", 0),  # 0.0.0.0
    "acc32": (2, "I", 0),
    "int64": (4, "q", -0x8000000000000000),
    "uint64": (4, "Q", 0xFFFFFFFFFFFFFFFF),
    "acc64": (4, "Q", 0),
}
_FLOAT_TYPES = {"float32": (2, "f"), "float64": (4, "d")}
_RANGES = {
    "h": (-0x8000, 0x7FFF),
    "H": (0, 0xFFFF),
    "i": (-0x80000000, 0x7FFFFFFF),
    "I": (0, 0xFFFFFFFF),
    "q": (-0x8000000000000000, 0x7FFFFFFFFFFFFFFF),
    "Q": (0, 0xFFFFFFFFFFFFFFFF),
}


@dataclass(frozen=True, slots=True)
class PointDef:
    """One point of a model: where it sits and how it is encoded."""

    name: str
    type: str
    offset: int  # registers from the model's ID register
    size: int  # registers
    sf: str | int | None = None  # name of the sunssf point in the same model, a fixed SF, or None
    writable: bool = False
    symbols: frozenset[int] = field(default_factory=frozenset)  # allowed enum values, empty = any


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """A model's points; ``length`` is the L register (block size minus 2)."""

    model_id: int
    length: int
    points: dict[str, PointDef]
    counts: Mapping[str, int] = field(default_factory=dict)  # count point -> instances laid out

    @property
    def block_size(self) -> int:
        return self.length + 2


def layout(model_id: int, counts: Mapping[str, int] | None = None) -> ModelLayout:
    """Layout of ``model_id`` from pysunspec2's definition; ValueError if it has none.

    ``counts`` maps count points to instances (None = :data:`GROUP_COUNTS`); a
    name that counts no group, or a count below 1, is a ValueError.
    """
    chosen = GROUP_COUNTS.get(model_id, {}) if counts is None else counts
    return _layout(model_id, tuple(sorted(chosen.items())))


@lru_cache(maxsize=None)
def _layout(model_id: int, counts: tuple[tuple[str, int], ...]) -> ModelLayout:
    try:
        mdef = get_model_def(model_id, mapping=False)
    except Exception as exc:  # pysunspec2 raises its own ModelDefinitionError or OSError
        raise ValueError(f"no SunSpec model definition for model {model_id}: {exc}") from exc
    if mdef is None:
        raise ValueError(f"no SunSpec model definition for model {model_id}")
    wanted = dict(counts)
    for name, count in wanted.items():
        if not (isinstance(count, int) and count >= 1):
            raise ValueError(f"model {model_id}: count {name}={count!r} must be an integer >= 1")
    points: dict[str, PointDef] = {}
    laid_out: dict[str, int] = {}
    offset = _add_group(mdef["group"], "", 0, points, wanted, laid_out)
    unknown = set(wanted) - set(laid_out)
    if unknown:
        raise ValueError(f"model {model_id}: {sorted(unknown)} count no group (counted: {sorted(laid_out)})")
    return ModelLayout(model_id=model_id, length=offset - 2, points=points, counts=laid_out)


def _add_group(
    group: dict, prefix: str, offset: int, points: dict[str, PointDef], counts: dict[str, int], laid_out: dict[str, int]
) -> int:
    for pdef in group.get("points", []):
        ptype = pdef["type"]
        size = pdef.get("size") or _type_size(ptype)
        symbols = frozenset(s["value"] for s in pdef.get("symbols", []) if ptype.startswith("enum"))
        points[prefix + pdef["name"]] = PointDef(
            name=prefix + pdef["name"],
            type=ptype,
            offset=offset,
            size=size,
            sf=pdef.get("sf"),
            writable=pdef.get("access") == "RW",
            symbols=symbols,
        )
        offset += size
    for sub in group.get("groups", []):
        count = sub.get("count")
        if isinstance(count, str):  # counted by a point of the model
            repeats = counts.get(count, 1)
            laid_out[count] = repeats
            indexed = count in counts
        else:
            repeats = count if isinstance(count, int) and count > 1 else 1
            indexed = repeats > 1
        for index in range(repeats):
            name = f"{sub['name']}[{index}]" if indexed else sub["name"]
            offset = _add_group(sub, f"{prefix}{name}.", offset, points, counts, laid_out)
    return offset


def _type_size(ptype: str) -> int:
    if ptype in _INT_TYPES:
        return _INT_TYPES[ptype][0]
    if ptype in _FLOAT_TYPES:
        return _FLOAT_TYPES[ptype][0]
    raise ValueError(f"point type {ptype!r} needs an explicit size")


def encode(point: PointDef, raw: int | float | str | None) -> list[int]:
    """Registers for ``raw`` (None = not implemented)."""
    ptype = point.type
    if ptype in _INT_TYPES:
        _, code, marker = _INT_TYPES[ptype]
        if raw is None:
            value = marker if marker is not None else 0
        else:
            low, high = _RANGES[code]
            value = int(round(raw))
            if not ptype.startswith("acc"):  # an accumulator may legitimately read 0
                if marker == high:
                    high -= 1
                elif marker == low:
                    low += 1
            value = min(max(value, low), high)
        data = struct.pack(">" + code, value)
    elif ptype in _FLOAT_TYPES:
        data = struct.pack(">" + _FLOAT_TYPES[ptype][1], math.nan if raw is None else float(raw))
    elif ptype == "string":
        data = (raw or "").encode("utf-8")[: point.size * 2].ljust(point.size * 2, b"\0")
    else:  # eui48, ipv6addr and other opaque types: zero = not implemented
        data = bytes(point.size * 2) if raw is None else bytes(raw).ljust(point.size * 2, b"\0")
    if len(data) < point.size * 2:  # e.g. a uint16-typed point declared with a larger size
        data = bytes(point.size * 2 - len(data)) + data
    return list(struct.unpack(f">{point.size}H", data[: point.size * 2]))


def decode(point: PointDef, regs: list[int]) -> int | float | str | None:
    """Raw value of ``regs`` (exactly ``point.size`` registers), None for the not-implemented marker."""
    data = struct.pack(f">{len(regs)}H", *regs)
    ptype = point.type
    if ptype in _INT_TYPES:
        size, code, marker = _INT_TYPES[ptype]
        value = struct.unpack(">" + code, data[-size * 2 :])[0]
        return None if value == marker else value
    if ptype in _FLOAT_TYPES:
        value = struct.unpack(">" + _FLOAT_TYPES[ptype][1], data)[0]
        return None if math.isnan(value) else value
    if ptype == "string":
        text = data.rstrip(b"\0").decode("utf-8", errors="replace")
        return text or None
    return data if any(data) else None
