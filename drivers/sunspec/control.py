"""Active-power control: which SunSpec model to write, and the register writes for a target.

Preference (first that the device has, with the points needed):

=========  ======================  ==================================================
path       used for                writes (target t kW, + export / discharge)
=========  ======================  ==================================================
704-set    bess                    ``WSetRvrtTms``; ``WSetEna=1``, ``WSetMod=1`` (W),
                                   ``WSet`` = t x 1000 W (``WSet_SF``)
704-limit  pv                      ``WMaxLimPctRvrtTms``; ``WMaxLimPctEna=1``,
                                   ``WMaxLimPct`` = t / rating x 100 (``WMaxLimPct_SF``);
                                   rating = 702 ``WMaxRtg``, else 120 ``WRtg``
124-rate   bess without 704        ``InOutWRte_RvrtTms``; ``OutWRte`` = t / WChaMax x 100,
                                   ``InWRte`` = -OutWRte (``InOutWRte_SF``);
                                   ``StorCtl_Mod`` = 3 (charge and discharge limits)
123-limit  pv (and bess without    ``WMaxLimPct_RvrtTms``; ``WMaxLimPct`` = t / WMax x 100
           704 and 124)            (``WMaxLimPct_SF``, WMax from 121, else 120 ``WRtg``);
                                   ``WMaxLim_Ena=1``
=========  ======================  ==================================================

Reactive power (target q kvar, + over-excited, i.e. injecting), chosen by
``choose_var_path``:

=========  ======================  ==================================================
704-var    pv and bess with 704    ``VarSetRvrtTms``; ``VarSetEna=1``, ``VarSetMod=4``
                                   (vars), ``VarSet`` = q x 1000 var (``VarSet_SF``)
=========  ======================  ==================================================

Release (target None) writes only the enable: ``WSetEna=0``,
``WMaxLimPctEna=0``, ``StorCtl_Mod=0``, ``WMaxLim_Ena=0`` or ``VarSetEna=0``.  The revert timer
is written first so that the device never holds an enabled command without
its timer; adjacent points are written in one request.  A revert timer is
written only if the device's model is long enough to contain it.  Percentages
are clamped to 0..100 (limits) or -100..100 (124 rates).

Public API:

``choose_path(kind, blocks) -> str | None``
    ``kind`` is the profile's ``pv``/``bess``/``meter``, ``blocks`` the last
    read ``ModelBlock`` per model id.  None: no way to control this device.

``choose_var_path(kind, blocks) -> str | None``
    ``"704-var"`` where model 704 has ``VarSetEna`` and ``VarSet``, else None.

``build_writes(path, target_kw, revert_s, blocks, rated_kw=None) -> list[RegisterWrite]``
    The writes, in order.  ``rated_kw`` (the profile's) is used only when the
    device states no rating.  Raises ``CommandError`` naming what is missing
    or out of range.

``PATH_CAN_CHARGE``: whether a path can command negative power.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.sunspec.codec import EncodeError, ModelBlock, encode

PATH_CAN_CHARGE = {"704-set": True, "124-rate": True, "704-limit": False, "123-limit": False}
STORCTL_CHARGE_AND_DISCHARGE = 0b11
VARSETMOD_VARS = 4  # 704 VarSetMod: VarSet is in vars
# Written only when the device does not already hold them (and skipped where a
# shorter model revision lacks them).
_OPTIONAL_POINTS = ("WSetMod", "VarSetMod")


class CommandError(Exception):
    """A target that cannot be turned into register writes for this device."""


@dataclass(frozen=True, slots=True)
class RegisterWrite:
    address: int
    values: tuple[int, ...]
    points: tuple[str, ...]  # model.point names, for logs and events

    def __str__(self) -> str:
        return f"{'+'.join(self.points)} @{self.address}={list(self.values)}"


def _has(blocks: dict[int, ModelBlock], model_id: int, *points: str) -> bool:
    block = blocks.get(model_id)
    return block is not None and all(block.has(p) for p in points)


def choose_path(kind: str, blocks: dict[int, ModelBlock]) -> str | None:
    if kind == "meter":
        return None
    if kind == "bess":
        if _has(blocks, 704, "WSetEna", "WSet"):
            return "704-set"
        if _has(blocks, 124, "StorCtl_Mod", "OutWRte", "InWRte", "WChaMax"):
            return "124-rate"
    if kind in ("pv", "bess"):
        if _has(blocks, 704, "WMaxLimPctEna", "WMaxLimPct"):
            return "704-limit"
        if _has(blocks, 123, "WMaxLimPct", "WMaxLim_Ena"):
            return "123-limit"
    return None


def choose_var_path(kind: str, blocks: dict[int, ModelBlock]) -> str | None:
    if kind in ("pv", "bess") and _has(blocks, 704, "VarSetEna", "VarSet"):
        return "704-var"
    return None


def _watts(blocks: dict[int, ModelBlock], candidates: list[tuple[int, str]]) -> float | None:
    for model_id, point in candidates:
        block = blocks.get(model_id)
        if block is None:
            continue
        try:
            value = block.value(point)
        except ValueError:
            continue
        if value is not None and value > 0:
            return value
    return None


def _reference_w(blocks, candidates, rated_kw, what) -> float:
    watts = _watts(blocks, candidates)
    if watts is None and rated_kw:
        watts = rated_kw * 1000.0
    if watts is None:
        names = ", ".join(f"{m} {p}" for m, p in candidates)
        raise CommandError(f"no {what} to convert kW to percent (none of {names}; set rated_kw in the profile)")
    return watts


def _clamp(value: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, value))


def _assignments(path: str, target_kw: float | None, revert_s: int, blocks, rated_kw):
    if path == "704-set":
        if target_kw is None:
            return 704, [("WSetEna", 0)]
        return 704, [("WSetRvrtTms", revert_s), ("WSetEna", 1), ("WSetMod", 1), ("WSet", target_kw * 1000.0)]
    if path == "704-var":
        if target_kw is None:
            return 704, [("VarSetEna", 0)]
        return 704, [("VarSetRvrtTms", revert_s), ("VarSetEna", 1), ("VarSetMod", VARSETMOD_VARS),
                     ("VarSet", target_kw * 1000.0)]
    if path == "704-limit":
        if target_kw is None:
            return 704, [("WMaxLimPctEna", 0)]
        rating = _reference_w(blocks, [(702, "WMaxRtg"), (120, "WRtg"), (702, "WMax")], rated_kw, "rating")
        pct = _clamp(target_kw * 1000.0 / rating * 100.0, 0.0, 100.0)
        return 704, [("WMaxLimPctRvrtTms", revert_s), ("WMaxLimPctEna", 1), ("WMaxLimPct", pct)]
    if path == "123-limit":
        if target_kw is None:
            return 123, [("WMaxLim_Ena", 0)]
        wmax = _reference_w(blocks, [(121, "WMax"), (120, "WRtg")], rated_kw, "WMax")
        pct = _clamp(target_kw * 1000.0 / wmax * 100.0, 0.0, 100.0)
        return 123, [("WMaxLimPct_RvrtTms", revert_s), ("WMaxLimPct", pct), ("WMaxLim_Ena", 1)]
    if path == "124-rate":
        if target_kw is None:
            return 124, [("StorCtl_Mod", 0)]
        wchamax = _reference_w(blocks, [(124, "WChaMax")], None, "WChaMax")
        pct = _clamp(target_kw * 1000.0 / wchamax * 100.0, -100.0, 100.0)
        return 124, [
            ("InOutWRte_RvrtTms", revert_s),
            ("OutWRte", pct),
            ("InWRte", -pct),
            ("StorCtl_Mod", STORCTL_CHARGE_AND_DISCHARGE),
        ]
    raise CommandError(f"unknown control path {path!r}")


def build_writes(
    path: str, target_kw: float | None, revert_s: int, blocks: dict[int, ModelBlock], rated_kw: float | None = None,
    refresh: bool = True,
) -> list[RegisterWrite]:
    """The register writes for a target.  ``refresh=False`` (a new target) leaves out
    a revert timer or mode the device already holds, so the command is one request."""
    model_id, assignments = _assignments(path, target_kw, revert_s, blocks, rated_kw)
    block = blocks.get(model_id)
    if block is None:
        raise CommandError(f"model {model_id} has not been read")
    return encode_assignments(block, assignments, refresh)


def encode_assignments(block: ModelBlock, assignments: list[tuple[str, float]], refresh: bool = True,
                       ) -> list[RegisterWrite]:
    """The writes for ``(point, value)`` pairs of one model, adjacent points merged into one request.

    Revert timers and the optional mode points are left out where the model lacks them; any other
    missing point, an unknown scale factor or a value the point cannot hold raises ``CommandError``.
    """
    model_id = block.model_id
    writes: list[RegisterWrite] = []
    for name, value in assignments:
        if not block.has(name):
            if name.endswith("RvrtTms") or name in _OPTIONAL_POINTS:
                continue  # optional: older or shorter model revisions lack them
            raise CommandError(f"model {model_id} has no point {name}")
        if not refresh and name.endswith("RvrtTms") and block.raw(name) == value:
            # The device already holds it (read back every poll).  Writing it again
            # would cost a second request: in 704 the timer is not adjacent to the
            # enable and the setpoint, and a new command must arrive at once.  The
            # refresh every cycle still rewrites the timer, for devices that restart
            # it only when the timer itself is written.  (A mode point, by contrast,
            # sits between the enable and the value: leaving it out would split the
            # command in two requests, so it is always written.)
            continue
        spec = block.layout.points[name]
        try:
            sf = block.sf(name)
        except ValueError as error:
            raise CommandError(str(error)) from None
        if sf is None:
            raise CommandError(f"model {model_id} {name}: scale factor {spec.sf} is not implemented")
        try:
            registers = encode(spec, value, sf)
        except EncodeError as error:
            raise CommandError(f"model {model_id} {error}") from None
        address = block.address_of(name)
        label = f"{model_id}.{name}"
        if writes and writes[-1].address + len(writes[-1].values) == address:
            last = writes.pop()
            writes.append(RegisterWrite(last.address, last.values + tuple(registers), last.points + (label,)))
        else:
            writes.append(RegisterWrite(address, tuple(registers), (label,)))
    return writes
