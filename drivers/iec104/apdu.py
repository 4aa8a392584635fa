"""Just enough of the IEC 104 APDU layout to read a unit's frames as c104 hands them over raw.

c104's ``Point.transmit`` answers True/False only; the raw frames tell a negative
ACT_CON from a timeout and carry the ACT_TERM that direct-mode commands can be
followed by.  ``parse(apdu)`` returns the head and first object of an I-frame,
or None for S/U frames and anything malformed.

``monitored_values(apdu)`` decodes the information objects of a monitoring
frame (the measured-value and status types a point map may use) so that the
driver needs one callback per frame (c104's raw-frame callback) instead of one
more per point: every callback on c104's threads takes the GIL, and with 50
units sending ten frames a second each, those acquisitions are what delays the
event loop and the commands.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

COT_ACT_CON = 7
COT_ACT_TERM = 10

_START = 0x68
_HEADER = 12  # start, length, 4 control octets, type, VSQ, COT, originator, CA (2)
_IOA = 3
_CP56 = 7


class AsduHead(NamedTuple):
    type_id: int
    cot: int
    negative: bool
    common_address: int
    ioa: int


class MonitoredValue(NamedTuple):
    ioa: int
    value: float | bool | None  # None: a double point in its indeterminate or intermediate state
    good: bool  # no quality flag (invalid, not topical, substituted, blocked, overflow) set


def parse(apdu: bytes) -> AsduHead | None:
    # 0x68, length, 4 control octets (I-frame: bit 0 of the first is 0), then the
    # ASDU: type, VSQ, COT (+P/N bit 0x40), originator, CA (2 octets), IOA (3 octets).
    if len(apdu) < 15 or apdu[0] != _START or apdu[2] & 0x01:
        return None
    return AsduHead(
        type_id=apdu[6],
        cot=apdu[8] & 0x3F,
        negative=bool(apdu[8] & 0x40),
        common_address=apdu[10] | apdu[11] << 8,
        ioa=apdu[12] | apdu[13] << 8 | apdu[14] << 16,
    )


def _single(data: bytes, at: int) -> tuple[bool, bool]:
    siq = data[at]
    return bool(siq & 0x01), not siq & 0xF0


def _double(data: bytes, at: int) -> tuple[bool | None, bool]:
    diq = data[at]
    return {1: False, 2: True}.get(diq & 0x03), not diq & 0xF0


def _normalized(data: bytes, at: int) -> tuple[float, bool]:
    return struct.unpack_from("<h", data, at)[0] / 32768, not data[at + 2] & 0xF1


def _scaled(data: bytes, at: int) -> tuple[float, bool]:
    return float(struct.unpack_from("<h", data, at)[0]), not data[at + 2] & 0xF1


def _short_float(data: bytes, at: int) -> tuple[float, bool]:
    return struct.unpack_from("<f", data, at)[0], not data[at + 4] & 0xF1


# type id -> (decoder, element size in octets, including a CP56Time2a tag where the type has one)
_ELEMENTS = {
    1: (_single, 1), 30: (_single, 1 + _CP56),  # M_SP_NA_1, M_SP_TB_1
    3: (_double, 1), 31: (_double, 1 + _CP56),  # M_DP_NA_1, M_DP_TB_1
    9: (_normalized, 3), 34: (_normalized, 3 + _CP56),  # M_ME_NA_1, M_ME_TD_1
    11: (_scaled, 3), 35: (_scaled, 3 + _CP56),  # M_ME_NB_1, M_ME_TE_1
    13: (_short_float, 5), 36: (_short_float, 5 + _CP56),  # M_ME_NC_1, M_ME_TF_1
}
# Causes that carry a current value: periodic, background, spontaneous, read request, interrogated (station, groups)
VALUE_CAUSES = frozenset({1, 2, 3, 5, *range(20, 37)})


def monitored_values(apdu: bytes, common_address: int) -> list[MonitoredValue]:
    """The values of a monitoring I-frame for ``common_address``; [] for any other frame.

    Frames of other types or stations, negative or test frames, and frames whose
    length does not match their object count are ignored whole: a malformed frame
    must not set any value.
    """
    if len(apdu) < _HEADER + _IOA or apdu[0] != _START or apdu[2] & 0x01 or apdu[1] + 2 != len(apdu):
        return []
    element = _ELEMENTS.get(apdu[6])
    cot = apdu[8]
    if element is None or cot & 0xC0 or (cot & 0x3F) not in VALUE_CAUSES \
            or apdu[10] | apdu[11] << 8 != common_address:
        return []
    decode, size = element
    count, sequence = apdu[7] & 0x7F, bool(apdu[7] & 0x80)
    expected = _HEADER + (_IOA + count * size if sequence else count * (_IOA + size))
    if count == 0 or expected != len(apdu):
        return []
    values = []
    at = _HEADER
    ioa = 0
    for index in range(count):
        if index == 0 or not sequence:
            ioa = apdu[at] | apdu[at + 1] << 8 | apdu[at + 2] << 16
            at += _IOA
        else:
            ioa += 1
        value, good = decode(apdu, at)
        values.append(MonitoredValue(ioa, value, good))
        at += size
    return values
