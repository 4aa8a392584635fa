"""Model 705 (DERVoltVar) in the simulator: initial curves, write rules, curve adoption, Q(U).

Curve n (SunSpec numbers curves from 1, as ``AdptCrvReq`` does) is the layout's
``"Crv[n-1]"``; points are ``"Crv[n-1].Pt[j].V"`` / ``".Var"`` (j from 0).
Curve 1 is the curve in force and read-only (``ReadOnly`` = 1): a write to any
of its points is refused (exception 2).  Curves 2..NCrv start as copies of
curve 1 with ``ReadOnly`` = 0 and take any defined value (``Pt`` points also
"not implemented", for points beyond ``ActPt``); they are checked only when
adopted.  Writing ``AdptCrvReq`` = n (2..NCrv) checks curve n at once: valid, it
is copied into curve 1 (``ReadOnly`` stays 1) and ``AdptCrvRslt`` = COMPLETED;
invalid, ``AdptCrvRslt`` = FAILED and curve 1 is unchanged.  ``AdptCrvReq``
reads 0 again afterwards (the request is consumed; 1 adopts nothing and
completes).  Enum values come from pysunspec2's definition, looked up by name:
its 705 numbers ``DeptRef`` W_MAX_PCT 0, VAR_MAX_PCT 1, VAR_AVAL_PCT 2 (older
drafts of the model used 1, 2, 3), and a client must use those.

With ``Ena`` = 1 the device's reactive power target is curve 1 evaluated at
the measured voltage in % of the nominal voltage: linear between the first
``ActPt`` points, flat beyond the ends, in % of VarMax (``DeptRef``
VAR_MAX_PCT) or of WMax (W_MAX_PCT).  ``RspTms``, ``Pri``, ``VRef`` and the
autonomous Vref points are stored but not simulated; reversion (``RvrtTms``,
``RvrtCrv``) is not implemented (markers, writes refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from sunspec2.device import get_model_def

from .image import RegisterImage

MODEL = 705
V_RANGE_PCT = (50.0, 150.0)
VAR_RANGE_PCT = (-100.0, 100.0)
DEFAULT_CURVE = ((92.0, 30.0), (98.0, 0.0), (102.0, 0.0), (108.0, -30.0))  # (V % of VNom, Var % of VarMax)
DEFAULT_RSP_TMS_S = 10
_NOT_SIMULATED = ("RvrtTms", "RvrtCrv")


@cache
def _symbols(point: str) -> dict[str, int]:
    def find(group: dict) -> dict[str, int] | None:
        for pdef in group.get("points", []):
            if pdef["name"] == point:
                return {sym["name"]: sym["value"] for sym in pdef.get("symbols", [])}
        for sub in group.get("groups", []):
            if (found := find(sub)) is not None:
                return found
        return None

    found = find(get_model_def(MODEL)["group"])
    if not found:
        raise KeyError(f"model {MODEL} has no enum point {point}")
    return found


def symbol(point: str, name: str) -> int:
    """Value of enum symbol ``name`` of 705 point ``point`` (e.g. ``symbol("DeptRef", "VAR_MAX_PCT")``)."""
    return _symbols(point)[name]


def _symbol_name(point: str, value: int | None) -> str:
    return next((name for name, v in _symbols(point).items() if v == value), str(value))


@dataclass(frozen=True, slots=True)
class VoltVarState:
    """What ``SimulatedDevice.volt_var()`` reports.

    ``points``: curve 1's first ``ActPt`` points as (V % of VNom, Var % of the
    DeptRef reference); ``dept_ref`` and ``adopt_result`` are symbol names
    (``"VAR_MAX_PCT"``, ``"COMPLETED"``/``"FAILED"``); ``adopt_error`` says why
    the last adoption failed ("" otherwise).
    """

    enabled: bool
    points: tuple[tuple[float, float], ...]
    dept_ref: str
    adopt_result: str
    adopt_error: str
    rsp_tms_s: float | None


def curve_count(image: RegisterImage) -> int:
    return image.get_raw(MODEL, "NCrv") or 0


def init(image: RegisterImage) -> None:
    """Initial 705 values: disabled, last adoption completed, every curve the default curve."""
    for name, raw in (("Ena", 0), ("AdptCrvReq", 0), ("AdptCrvRslt", symbol("AdptCrvRslt", "COMPLETED"))):
        image.set_raw(MODEL, name, raw)
    points = image.get_raw(MODEL, "NPt") or 0
    for index in range(curve_count(image)):
        prefix = f"Crv[{index}]."
        for name, raw in (
            ("ActPt", len(DEFAULT_CURVE)), ("DeptRef", symbol("DeptRef", "VAR_MAX_PCT")),
            ("Pri", symbol("Pri", "REACTIVE")), ("VRefAutoEna", symbol("VRefAutoEna", "DISABLED")),
            ("VRefAutoTms", 0), ("RspTms", DEFAULT_RSP_TMS_S),
            ("ReadOnly", symbol("ReadOnly", "R" if index == 0 else "RW")),
        ):
            image.set_raw(MODEL, prefix + name, raw)
        image.set(MODEL, prefix + "VRef", 100.0)
        for number in range(points):
            v_pct, var_pct = DEFAULT_CURVE[number] if number < len(DEFAULT_CURVE) else (None, None)
            image.set(MODEL, f"{prefix}Pt[{number}].V", v_pct)
            image.set(MODEL, f"{prefix}Pt[{number}].Var", var_pct)


def write_refused(image: RegisterImage, name: str) -> str:
    """Why a write to writable point ``name`` is refused ("" = allowed); the wording maps to exception 2."""
    if name in _NOT_SIMULATED:
        return "not writable: the simulator does not implement 705 reversion"
    if name.startswith("Crv["):
        index = int(name[4 : name.index("]")])
        if image.get_raw(MODEL, f"Crv[{index}].ReadOnly") == symbol("ReadOnly", "R"):
            return (f"read-only curve: curve {index + 1} is the curve in force (ReadOnly = 1); write one of "
                    f"curves 2..{curve_count(image)} and adopt it with AdptCrvReq")
    return ""


def check_value(image: RegisterImage, point, raw) -> str:
    """Why ``raw`` is refused for writable 705 point ``point`` ("" = accepted)."""
    if raw is None:
        # a point beyond ActPt is unused: a client may leave it "not implemented"
        return "" if ".Pt[" in point.name else "value is the 'not implemented' marker"
    if point.symbols and raw not in point.symbols:
        return f"{raw} is not one of {sorted(point.symbols)}"
    if point.name == "AdptCrvReq" and not 0 <= raw <= curve_count(image):
        return f"no curve {raw}: curves are 1..{curve_count(image)} (0 = no request)"
    return ""


def curve_points(image: RegisterImage, index: int) -> list[tuple[float | None, float | None]]:
    """(V %, Var %) of the first ActPt points of ``"Crv[index]"`` (None where not implemented)."""
    active = min(image.get_raw(MODEL, f"Crv[{index}].ActPt") or 0, image.get_raw(MODEL, "NPt") or 0)
    return [
        (image.get(MODEL, f"Crv[{index}].Pt[{n}].V"), image.get(MODEL, f"Crv[{index}].Pt[{n}].Var"))
        for n in range(active)
    ]


def problem(image: RegisterImage, index: int) -> str:
    """Why curve ``"Crv[index]"`` cannot be adopted ("" = it can)."""
    act_pt, n_pt = image.get_raw(MODEL, f"Crv[{index}].ActPt"), image.get_raw(MODEL, "NPt") or 0
    if act_pt is None or not 2 <= act_pt <= n_pt:
        return f"ActPt {act_pt} is outside 2..{n_pt}"
    dept_ref = image.get_raw(MODEL, f"Crv[{index}].DeptRef")
    if dept_ref not in (symbol("DeptRef", "W_MAX_PCT"), symbol("DeptRef", "VAR_MAX_PCT")):
        return f"DeptRef {_symbol_name('DeptRef', dept_ref)} is not supported (W_MAX_PCT, VAR_MAX_PCT are)"
    last_v = None
    for number, (v_pct, var_pct) in enumerate(curve_points(image, index)):
        if v_pct is None or var_pct is None:
            return f"point {number + 1} is not set"
        if not V_RANGE_PCT[0] <= v_pct <= V_RANGE_PCT[1]:
            return f"point {number + 1}: V {v_pct:g} % is outside {V_RANGE_PCT[0]:g}..{V_RANGE_PCT[1]:g} %"
        if not VAR_RANGE_PCT[0] <= var_pct <= VAR_RANGE_PCT[1]:
            return f"point {number + 1}: Var {var_pct:g} % is outside {VAR_RANGE_PCT[0]:g}..{VAR_RANGE_PCT[1]:g} %"
        if last_v is not None and v_pct <= last_v:
            return f"point {number + 1}: V {v_pct:g} % does not increase (previous {last_v:g} %)"
        last_v = v_pct
    return ""


def adopt(image: RegisterImage) -> tuple[int, str]:
    """Serve the ``AdptCrvReq`` just written: (curve number, why it failed or "")."""
    number = image.get_raw(MODEL, "AdptCrvReq") or 0
    image.set_raw(MODEL, "AdptCrvReq", 0)
    if number == 0:
        return 0, ""
    reason = problem(image, number - 1) if number > 1 else ""
    if reason:
        image.set_raw(MODEL, "AdptCrvRslt", symbol("AdptCrvRslt", "FAILED"))
        return number, reason
    if number > 1:
        source, read_only = f"Crv[{number - 1}].", "Crv[0].ReadOnly"
        for name in [n for n in image.names(MODEL) if n.startswith(source)]:
            target = "Crv[0]." + name[len(source) :]
            if target != read_only:
                image.set_raw(MODEL, target, image.get_raw(MODEL, name))
    image.set_raw(MODEL, "AdptCrvRslt", symbol("AdptCrvRslt", "COMPLETED"))
    return number, ""


def active_curve(image: RegisterImage) -> tuple[tuple[tuple[float, float], ...], bool] | None:
    """Curve 1's points and whether they are in % of WMax (else of VarMax) when 705 is enabled, else None."""
    if not image.has(MODEL) or image.get_raw(MODEL, "Ena") != symbol("Ena", "ENABLED"):
        return None
    points = tuple((v, var) for v, var in curve_points(image, 0) if v is not None and var is not None)
    if not points:
        return None
    return points, image.get_raw(MODEL, "Crv[0].DeptRef") == symbol("DeptRef", "W_MAX_PCT")


def var_pct_at(points: tuple[tuple[float, float], ...], v_pct: float) -> float:
    """The curve's Var % at ``v_pct``: linear between points, flat beyond the ends."""
    if v_pct <= points[0][0]:
        return points[0][1]
    for (v0, q0), (v1, q1) in zip(points, points[1:]):
        if v_pct <= v1:
            return q0 + (q1 - q0) * (v_pct - v0) / (v1 - v0)
    return points[-1][1]


def state(image: RegisterImage, adopt_error: str) -> VoltVarState:
    return VoltVarState(
        enabled=image.get_raw(MODEL, "Ena") == symbol("Ena", "ENABLED"),
        points=tuple((v, var) for v, var in curve_points(image, 0) if v is not None and var is not None),
        dept_ref=_symbol_name("DeptRef", image.get_raw(MODEL, "Crv[0].DeptRef")),
        adopt_result=_symbol_name("AdptCrvRslt", image.get_raw(MODEL, "AdptCrvRslt")),
        adopt_error=adopt_error,
        rsp_tms_s=image.get(MODEL, "Crv[0].RspTms"),
    )
