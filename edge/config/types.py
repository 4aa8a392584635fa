"""Building blocks of the site profile, shared by edge/config/profile.py and every
driver package's own asset model (drivers/<name>/config.py).

This module imports no driver, so a driver's config can import it without a
cycle; edge/config/profile.py then assembles the whole profile from both.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def _ranged(lo: float, hi: float):
    def check(value: float) -> float:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number in {lo:g}..{hi:g}, got {value}")
        if not lo <= value <= hi:
            raise ValueError(f"must be {lo:g}..{hi:g}, got {value:g}")
        return value

    return AfterValidator(check)


Port = Annotated[int, _ranged(1, 65535)]
UnitId = Annotated[int, _ranged(0, 247)]
PositiveKw = Annotated[float, _ranged(0.0, 1_000_000.0)]
Percent = Annotated[float, _ranged(0.0, 100.0)]
Identifier = Annotated[str, Field(pattern=ID_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AssetBase(Strict):
    id: Identifier = Field(description="Asset identifier, unique in the site.")
    name: str = ""
    controllable: bool = Field(True, description="Whether the controller may command this asset.")
    priority: Annotated[int, _ranged(1, 1000)] = Field(
        100, description="Merit order (control.allocation: merit_order): lower priorities are dispatched first."
    )
    dispatch_cost_per_mwh: Annotated[float, _ranged(0.0, 1_000_000.0)] = Field(
        0.0, description="Merit order among equal priorities: cheaper first (any currency, per MWh of regulation)."
    )
    ramp_kw_per_s: Annotated[float, _ranged(0.001, 1_000_000.0)] | None = Field(
        None, description="How fast the asset changes its power. The controller shares an activation by what each "
                          "asset reaches by the next cycle; a unit switching on starts at its minimum load. "
                          "None: as fast as commanded.",
    )
