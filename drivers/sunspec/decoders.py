"""Point decoders compiled once per model layout, for the per-poll reading (``drivers.sunspec.measure``).

``ModelBlock.value(name)`` (``drivers.sunspec.codec``) looks the point up by name, packs its
registers into bytes and unpacks them through pysunspec2's type table, then does the same
for its scale factor: right for a command written now and then, too slow for every point of
every poll.  A decoder here resolves the point once -- its register, its type, the register
of its scale-factor point (or its fixed exponent) -- and then reads straight from the list
of registers the poll returned.  It gives exactly what ``ModelBlock.value`` gives, None for
the "not implemented" markers (int16/sunssf 0x8000, uint16/count/enum16/bitfield16 0xFFFF,
acc 0, int32 0x80000000, uint32/enum32/bitfield32 0xFFFFFFFF, float32 NaN and pysunspec2's
0x7FC00000 quirk) and the same scaling; where ``ModelBlock.value`` raises ``ValueProblem``
(a scale factor outside -10..10, a float that is not finite) the decoder appends the
error's text to the list it is given and gives None, as it does for a scaled value that is
not finite.  The common types are decoded inline; any other falls back on ``ModelBlock``
itself.  tests/test_sunspec_decoding.py checks all of it against the by-name decoding.

Public API:

``value_decoder(layout, name, start) -> ValueDecoder | None``
    For point ``name`` of a model whose ``ID`` register is ``regs[start]``:
    ``decoder(regs, problems) -> float | None`` is ``ModelBlock.value(name)`` on those
    registers, with the problems described above.  None when the value can never be
    known (the point, or its scale-factor point, is not in ``layout``): the value is then
    always None and never a problem.

``raw_decoder(layout, name, start) -> RawDecoder | None``
    ``decoder(regs) -> int | float | str | None`` equals ``ModelBlock.raw(name)``; None
    when the point is not in ``layout``.
"""

from __future__ import annotations

import math
import struct
from typing import Callable

from sunspec2 import mb as sunspec_mb

from drivers.sunspec.codec import SF_LIMIT, ModelBlock, ModelLayout, PointSpec, _registers_to_bytes

ValueDecoder = Callable[[list[int], list[str]], "float | None"]
RawDecoder = Callable[[list[int]], "int | float | str | None"]

# Type -> (signed, raw register pattern of "not implemented" or None), as pysunspec2 decodes them.
_ONE_REGISTER = {
    "int16": (True, 0x8000), "sunssf": (True, 0x8000),
    "uint16": (False, 0xFFFF), "count": (False, 0xFFFF), "enum16": (False, 0xFFFF), "bitfield16": (False, 0xFFFF),
    "acc16": (False, 0), "pad": (False, None),
}
_TWO_REGISTERS = {
    "int32": (True, 0x80000000),
    "uint32": (False, 0xFFFFFFFF), "enum32": (False, 0xFFFFFFFF), "bitfield32": (False, 0xFFFFFFFF),
    "acc32": (False, 0), "ipaddr": (False, 0),
}
_FLOAT32_NOT_IMPLEMENTED = float(sunspec_mb.SUNS_UNIMPL_FLOAT32)  # pysunspec2 compares the value to it
_POW10 = tuple(10**k for k in range(SF_LIMIT + 1))
_PAIR = struct.Struct(">HH")
_FLOAT32 = struct.Struct(">f")


def _generic_raw(spec: PointSpec, index: int) -> RawDecoder:
    """``ModelBlock.raw`` itself, for the types not decoded inline."""
    info = sunspec_mb.point_type_info[spec.type]
    end = index + spec.size

    def raw(regs):
        value = info.data_to(_registers_to_bytes(regs[index:end]))
        if value is None or not info.is_impl(value):
            return None
        if isinstance(value, float) and math.isnan(value):
            return None
        return value

    return raw


def _raw(spec: PointSpec, index: int) -> RawDecoder:
    if spec.type in _ONE_REGISTER and spec.size == 1:
        signed, missing = _ONE_REGISTER[spec.type]
        if signed:
            def raw(regs):
                v = regs[index]
                if v == missing:
                    return None
                return v - 0x10000 if v & 0x8000 else v
        else:
            def raw(regs):
                v = regs[index]
                return None if v == missing else v
        return raw
    if spec.type in _TWO_REGISTERS and spec.size == 2:
        signed, missing = _TWO_REGISTERS[spec.type]
        low = index + 1

        def raw(regs):
            v = regs[index] << 16 | regs[low]
            if v == missing:
                return None
            return v - 0x100000000 if signed and v & 0x80000000 else v
        return raw
    if spec.type == "float32" and spec.size == 2:
        low = index + 1

        def raw(regs):
            f = _FLOAT32.unpack(_PAIR.pack(regs[index], regs[low]))[0]
            if f != f or f == _FLOAT32_NOT_IMPLEMENTED:
                return None
            return f
        return raw
    return _generic_raw(spec, index)


def raw_decoder(layout: ModelLayout, name: str, start: int) -> RawDecoder | None:
    spec = layout.points.get(name)
    return None if spec is None else _raw(spec, start + spec.offset)


def _fallback(layout: ModelLayout, name: str, start: int) -> ValueDecoder:
    """Through ``ModelBlock`` itself: for point or scale-factor types not decoded inline."""
    end = start + layout.length + 2
    model_id = layout.model_id

    def value(regs, problems):
        try:
            v = ModelBlock(layout, regs[start:end]).value(name)
        except ValueError as error:
            problems.append(str(error))
            return None
        if v is not None and not math.isfinite(v):
            problems.append(f"model {model_id} {name} is {v}")
            return None
        return v

    return value


def value_decoder(layout: ModelLayout, name: str, start: int) -> ValueDecoder | None:
    spec = layout.points.get(name)
    if spec is None:
        return None
    model_id = layout.model_id
    index = start + spec.offset
    fixed: int | None = None
    sf_index: int | None = None
    if spec.sf is None:
        fixed = 0
    elif isinstance(spec.sf, int):
        fixed = spec.sf
    else:
        sf_spec = layout.points.get(spec.sf)
        if sf_spec is None:
            return None  # the scale factor is never known, so neither is the value
        if sf_spec.type not in ("sunssf", "int16") or sf_spec.size != 1:
            return _fallback(layout, name, start)
        sf_index = start + sf_spec.offset
    outside = f"model {model_id} {spec.sf}=%d is outside -{SF_LIMIT}..{SF_LIMIT}"
    integer = ((spec.type in _ONE_REGISTER and spec.size == 1) or (spec.type in _TWO_REGISTERS and spec.size == 2))
    if integer:
        raw = _raw(spec, index)
        if fixed is not None:
            if fixed >= 0:
                factor = 10**fixed

                def value(regs, problems):
                    v = raw(regs)
                    return None if v is None else float(v * factor)
            else:
                divisor = 10**-fixed

                def value(regs, problems):
                    v = raw(regs)
                    return None if v is None else v / divisor
            return value
        if spec.size == 1:
            signed, missing = _ONE_REGISTER[spec.type]

            def value(regs, problems):
                v = regs[index]
                if v == missing:
                    return None
                if signed and v & 0x8000:
                    v -= 0x10000
                e = _exponent(regs[sf_index], problems, outside)
                if e is None:
                    return None
                return float(v * _POW10[e]) if e >= 0 else v / _POW10[-e]
            return value

        def value(regs, problems):
            v = raw(regs)
            if v is None:
                return None
            e = _exponent(regs[sf_index], problems, outside)
            if e is None:
                return None
            return float(v * _POW10[e]) if e >= 0 else v / _POW10[-e]
        return value
    if spec.type == "float32" and spec.size == 2:
        raw = _raw(spec, index)
        not_finite = f"model {model_id} {name} is %s"

        def value(regs, problems):
            f = raw(regs)
            if f is None:
                return None
            if sf_index is None:
                e = fixed
            else:
                e = _exponent(regs[sf_index], problems, outside)
                if e is None:
                    return None
            if not math.isfinite(f):
                problems.append(not_finite % f)
                return None
            v = float(f * 10**e) if e >= 0 else f / 10 ** (-e)
            if not math.isfinite(v):
                problems.append(not_finite % v)
                return None
            return v
        return value
    return _fallback(layout, name, start)


def _exponent(register: int, problems: list[str], outside: str) -> int | None:
    """A scale-factor register as a power of ten; None when it is not implemented, or (with
    a problem noted) outside -SF_LIMIT..SF_LIMIT."""
    if register == 0x8000:
        return None
    e = register - 0x10000 if register & 0x8000 else register
    if not -SF_LIMIT <= e <= SF_LIMIT:
        problems.append(outside % e)
        return None
    return e
