"""Q(U) in the inverter itself: writing a volt-var curve to SunSpec model 705 (DERVoltVar).

Model 705 holds ``NCrv`` curves of ``NPt`` points.  Curve 1 is the curve in
force and read-only on the devices that follow the SunSpec DER information
model; a new curve is written into a writable curve (``ReadOnly == 0``) and
adopted with ``AdptCrvReq = n``, whose outcome ``AdptCrvRslt`` reports
(0 in progress, 1 completed, 2 failed); ``Ena = 1`` then switches the
function on.  Voltages are in percent of the inverter's nominal voltage,
reactive power in percent of its maximum reactive power (``DeptRef``
VAR_MAX_PCT, 1 in the published model), + over-excited (injecting), as in flexedge.

Public API:

``VoltVarCurve`` (edge.asset): the curve, validated on construction.
``curve_counts(block) -> dict | None``: ``{"NCrv": n, "NPt": m}`` from a 705 block, None if unusable.
``writable_curve(block) -> int | None``: the first writable curve, None if there is none.
``curve_assignments(block, index, curve) -> list[(point, value)]``: the points that write ``curve``
into curve ``index`` (raises ``CommandError`` when the device's curves are too short).
``in_force(block, curve) -> bool``: whether the device runs ``curve`` (enabled, curve 1 equal to it
within the points' resolution).
``await apply(write, read, block, curve, timeout_s) -> list[RegisterWrite]``: write ``curve`` (None:
switch the function off), adopt it and enable it, through the driver's ``write(address, values)``
and ``read(address, count)``; raises ``CommandError`` when the device does not adopt it within
``timeout_s``.  Link errors and Modbus exceptions pass through.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from edge.asset import VoltVarCurve

from sunspec2.device import get_model_def

from drivers.sunspec.codec import ModelBlock
from drivers.sunspec.control import CommandError, RegisterWrite, encode_assignments

MODEL = 705


def _symbol(group: dict, point: str, name: str) -> int:
    """A point's enumerated value by its symbol name in pysunspec2's definition of 705."""
    spec = next(p for p in group["points"] if p["name"] == point)
    return next(s["value"] for s in spec["symbols"] if s["name"] == name)


# By name from the definition: the numbers changed between drafts of the model (VAR_MAX_PCT was 2).
_MODEL_GROUP = get_model_def(MODEL)["group"]
DEPTREF_VAR_MAX_PCT = _symbol(_MODEL_GROUP["groups"][0], "DeptRef", "VAR_MAX_PCT")
ADOPT_IN_PROGRESS, ADOPT_COMPLETED, ADOPT_FAILED = (
    _symbol(_MODEL_GROUP, "AdptCrvRslt", name) for name in ("IN_PROGRESS", "COMPLETED", "FAILED"))
ENABLED, DISABLED = (_symbol(_MODEL_GROUP, "Ena", name) for name in ("ENABLED", "DISABLED"))
__all__ = ["VoltVarCurve", "apply", "curve_assignments", "curve_counts", "in_force", "writable_curve"]


def curve_counts(block: ModelBlock) -> dict[str, int] | None:
    curves, points = block.raw("NCrv"), block.raw("NPt")
    if not isinstance(curves, int) or not isinstance(points, int) or not (1 <= curves <= 100 and 1 <= points <= 100):
        return None
    return {"NCrv": curves, "NPt": points}


def writable_curve(block: ModelBlock) -> int | None:
    counts = curve_counts(block)
    if counts is None:
        return None
    for index in range(1, counts["NCrv"] + 1):
        if block.raw(f"Crv[{index}].ReadOnly") == 0:
            return index
    return None


def curve_assignments(block: ModelBlock, index: int, curve: VoltVarCurve) -> list[tuple[str, float]]:
    counts = curve_counts(block)
    if counts is None or not block.has(f"Crv[{index}].Pt[1].V"):
        raise CommandError(f"model {MODEL}: curve {index} is not laid out (NCrv/NPt unknown)")
    if len(curve.points) > counts["NPt"]:
        raise CommandError(f"model {MODEL}: the curve has {len(curve.points)} points, the device takes at most {counts['NPt']}")
    prefix = f"Crv[{index}]."
    assignments: list[tuple[str, float]] = [
        (prefix + "ActPt", len(curve.points)), (prefix + "DeptRef", DEPTREF_VAR_MAX_PCT),
        (prefix + "RspTms", curve.response_s),
    ]
    for number, (v_pct, q_pct) in enumerate(curve.points, start=1):
        assignments += [(f"{prefix}Pt[{number}].V", v_pct), (f"{prefix}Pt[{number}].Var", q_pct)]
    return assignments


def in_force(block: ModelBlock, curve: VoltVarCurve) -> bool:
    if block.raw("Ena") != ENABLED or block.raw("Crv[1].ActPt") != len(curve.points) \
            or block.raw("Crv[1].DeptRef") != DEPTREF_VAR_MAX_PCT:
        return False
    try:
        for number, (v_pct, q_pct) in enumerate(curve.points, start=1):
            for point, wanted in ((f"Crv[1].Pt[{number}].V", v_pct), (f"Crv[1].Pt[{number}].Var", q_pct)):
                value = block.value(point)
                resolution = 10.0 ** (block.sf(point) or 0)
                if value is None or abs(value - wanted) > resolution / 2 + 1e-9:
                    return False
    except ValueError:
        return False
    return True


async def apply(write: Callable[[int, list[int]], Awaitable[None]], read: Callable[[int, int], Awaitable[list[int]]],
                block: ModelBlock, curve: VoltVarCurve | None, timeout_s: float) -> list[RegisterWrite]:
    if curve is None:
        writes = encode_assignments(block, [("Ena", DISABLED)])
        for request in writes:
            await write(request.address, list(request.values))
        return writes
    index = writable_curve(block)
    if index is None:
        raise CommandError(f"model {MODEL} has no writable curve (every curve is ReadOnly)")
    writes = encode_assignments(block, curve_assignments(block, index, curve))
    writes += encode_assignments(block, [("AdptCrvReq", index)])
    for request in writes:
        await write(request.address, list(request.values))
    deadline = time.monotonic() + timeout_s
    while True:  # the device may take a moment to check and copy the curve
        result = (await read(block.address_of("AdptCrvRslt"), 1))[0]
        if result != ADOPT_IN_PROGRESS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    if result != ADOPT_COMPLETED:
        outcome = {ADOPT_FAILED: "FAILED", ADOPT_IN_PROGRESS: f"still IN_PROGRESS after {timeout_s:g} s"}.get(result, str(result))
        raise CommandError(f"the device did not adopt curve {index}: AdptCrvRslt {outcome}")
    enable = encode_assignments(block, [("Ena", ENABLED)])
    for request in enable:
        await write(request.address, list(request.values))
    return writes + enable
