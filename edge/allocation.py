"""Sharing a site activation across assets: a pure function, no I/O.

Priorities, highest first: the grid connection limits, then the VPP's
activation.  Each asset's target stays within [p_min_kw, p_max_kw]; the
activation is shared pro rata to each asset's band in the direction asked
(upward: p_max - baseline; downward: baseline - p_min).

The grid limits hold for the predicted site power

    site_kw = uncontrolled_kw + sum(target_kw)

where ``uncontrolled_kw`` is what the controller cannot command: with a
connection-point meter, the meter reading minus the controllable assets'
measured power (so uncontrolled load counts); without one, the power of the
non-controllable assets.  Signs: + export; activation + upward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

EPSILON_KW = 1e-9


@dataclass(frozen=True, slots=True)
class AssetBand:
    asset_id: str
    baseline_kw: float  # the power without activation
    p_min_kw: float  # lowest power it can be commanded to now (+ export)
    p_max_kw: float  # highest

    @property
    def up_kw(self) -> float:
        return max(0.0, self.p_max_kw - self.baseline_kw)

    @property
    def down_kw(self) -> float:
        return max(0.0, self.baseline_kw - self.p_min_kw)


@dataclass(frozen=True, slots=True)
class Allocation:
    targets_kw: dict[str, float]
    requested_kw: float  # the activation asked for
    activation_kw: float  # the activation commanded (sum of target - baseline)
    band_up_kw: float
    band_down_kw: float
    # Why the commanded activation differs from the request, if it does:
    # "export_limit", "import_limit", "band", or None.
    limited_by: str | None = None
    # The grid limits cannot be held even with the whole band (kW over the limit).
    limit_violation_kw: float = 0.0
    site_kw: float = 0.0  # predicted site power with these targets
    notes: list[str] = field(default_factory=list)


def _clamp_band(asset: AssetBand) -> AssetBand:
    """A baseline outside [p_min, p_max] (the device moved) is pulled inside."""
    baseline = min(max(asset.baseline_kw, asset.p_min_kw), asset.p_max_kw)
    return AssetBand(asset.asset_id, baseline, asset.p_min_kw, asset.p_max_kw)


def allocate(
    requested_kw: float,
    assets: list[AssetBand],
    uncontrolled_kw: float = 0.0,
    export_limit_kw: float | None = None,
    import_limit_kw: float | None = None,
) -> Allocation:
    if not math.isfinite(requested_kw):
        raise ValueError(f"requested_kw must be finite, got {requested_kw}")
    bands = [_clamp_band(a) for a in assets if a.p_max_kw >= a.p_min_kw]
    up_total = sum(a.up_kw for a in bands)
    down_total = sum(a.down_kw for a in bands)
    baseline_site = uncontrolled_kw + sum(a.baseline_kw for a in bands)

    # Activation range the grid limits allow, then the range the band allows.
    grid_hi = math.inf if export_limit_kw is None else export_limit_kw - baseline_site
    grid_lo = -math.inf if import_limit_kw is None else -import_limit_kw - baseline_site
    activation = requested_kw
    limited_by = None
    if activation > grid_hi:
        activation, limited_by = grid_hi, "export_limit"
    if activation < grid_lo:
        activation, limited_by = grid_lo, "import_limit"
    if activation > up_total:
        activation, limited_by = up_total, limited_by or "band"
    if activation < -down_total:
        activation, limited_by = -down_total, limited_by or "band"
    if limited_by and abs(activation - requested_kw) <= 1e-6:
        limited_by = None

    targets: dict[str, float] = {}
    for asset in bands:
        if activation > 0 and up_total > 0:
            share = activation * asset.up_kw / up_total
        elif activation < 0 and down_total > 0:
            share = activation * asset.down_kw / down_total
        else:
            share = 0.0
        targets[asset.asset_id] = min(max(asset.baseline_kw + share, asset.p_min_kw), asset.p_max_kw)

    site_kw = uncontrolled_kw + sum(targets.values())
    violation = 0.0
    if export_limit_kw is not None and site_kw > export_limit_kw + 1e-6:
        violation = site_kw - export_limit_kw
    if import_limit_kw is not None and -site_kw > import_limit_kw + 1e-6:
        violation = -site_kw - import_limit_kw
    delivered = sum(targets[a.asset_id] - a.baseline_kw for a in bands)
    return Allocation(
        targets_kw=targets,
        requested_kw=requested_kw,
        activation_kw=delivered,
        band_up_kw=up_total,
        band_down_kw=down_total,
        limited_by=limited_by,
        limit_violation_kw=violation,
        site_kw=site_kw,
    )
