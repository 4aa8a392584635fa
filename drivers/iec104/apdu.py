"""Just enough of the IEC 104 APDU layout to see command confirmations on the raw byte stream.

c104's ``Point.transmit`` answers True/False only; the raw frames tell a negative
ACT_CON from a timeout and carry the ACT_TERM that direct-mode commands can be
followed by.  ``parse(apdu)`` returns the first object of an I-frame, or None for
S/U frames and anything malformed.
"""

from __future__ import annotations

from typing import NamedTuple

COT_ACT_CON = 7
COT_ACT_TERM = 10


class AsduHead(NamedTuple):
    type_id: int
    cot: int
    negative: bool
    common_address: int
    ioa: int


def parse(apdu: bytes) -> AsduHead | None:
    # 0x68, length, 4 control octets (I-frame: bit 0 of the first is 0), then the
    # ASDU: type, VSQ, COT (+P/N bit 0x40), originator, CA (2 octets), IOA (3 octets).
    if len(apdu) < 15 or apdu[0] != 0x68 or apdu[2] & 0x01:
        return None
    return AsduHead(
        type_id=apdu[6],
        cot=apdu[8] & 0x3F,
        negative=bool(apdu[8] & 0x40),
        common_address=apdu[10] | apdu[11] << 8,
        ioa=apdu[12] | apdu[13] << 8 | apdu[14] << 16,
    )
