"""Sharing a site activation across assets: a pure function, no I/O.

Priorities, highest first: the grid connection limits, then the VPP's
activation.  Each asset's target stays within [p_min_kw, p_max_kw]; the
activation is shared pro rata to each asset's band in the direction asked
(upward: p_max - baseline; downward: baseline - p_min), or by merit order
(``strategy="merit_order"``: lowest ``merit`` first, equal merits pro rata).
An asset with a ramp rate takes part with what it reaches by the next cycle;
the ramps never hold a grid limit back.  docs/dispatch.md tells the rules.

The grid limits hold for the predicted site power

    site_kw = uncontrolled_kw + sum(target_kw)

where ``uncontrolled_kw`` is what the controller cannot command: with a
connection-point meter, the meter reading minus the controllable assets'
measured power (so uncontrolled load counts); without one, the power of the
non-controllable assets.  Signs: + export; activation + upward.

Discontinuous ranges.  An EV charger or a P2H unit is off (0 kW) or between
its minimum and maximum load, never in between: its band has a gap, an open
interval of powers it cannot run at.  The pro-rata shares are computed as if
the band were continuous; then each asset whose share falls in its gap is put
at one end of it, choosing the ends so that the running rounding error stays
within what the continuous assets can absorb (error diffusion), and the
continuous assets take up the remainder.  If that cannot hold a grid limit,
gapped assets are switched to the side that helps, one at a time.  What is
still missing is reported (``limited_by = "discrete_band"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

EPSILON_KW = 1e-9


@dataclass(frozen=True, slots=True)
class AssetBand:
    asset_id: str
    baseline_kw: float  # the power without activation
    p_min_kw: float  # lowest power it can be commanded to now (+ export)
    p_max_kw: float  # highest
    # Open interval (low, high) of powers inside [p_min, p_max] that the asset
    # cannot run at: (-min_load, 0) for a charger or P2H unit.  None: continuous.
    gap_kw: tuple[float, float] | None = None
    # What it can reach by the next cycle: within ramp_kw of present_kw, the
    # gap crossed at no cost (a unit switches on at its minimum load and ramps
    # from there).  None: no ramp limit.
    present_kw: float | None = None
    ramp_kw: float | None = None
    # Merit order: (priority, cost); lower is dispatched first, equals share pro rata.
    merit: tuple[float, float] = (0.0, 0.0)

    @property
    def up_kw(self) -> float:
        return max(0.0, self.p_max_kw - self.baseline_kw)

    @property
    def down_kw(self) -> float:
        return max(0.0, self.baseline_kw - self.p_min_kw)

    def in_gap(self, power_kw: float) -> bool:
        return self.gap_kw is not None and self.gap_kw[0] + EPSILON_KW < power_kw < self.gap_kw[1] - EPSILON_KW

    def segment(self, power_kw: float) -> tuple[float, float]:
        """The continuous part of the band that ``power_kw`` (not in the gap) lies in."""
        if self.gap_kw is None:
            return self.p_min_kw, self.p_max_kw
        low, high = self.gap_kw
        return (self.p_min_kw, low) if power_kw <= low + EPSILON_KW else (high, self.p_max_kw)


@dataclass(frozen=True, slots=True)
class Allocation:
    targets_kw: dict[str, float]
    requested_kw: float  # the activation asked for
    activation_kw: float  # the activation commanded (sum of target - baseline)
    band_up_kw: float  # the assets' capacity up from their baselines (ramp rates aside)
    band_down_kw: float
    # Why the commanded activation differs from the request, if it does:
    # "export_limit", "import_limit", "band", "discrete_band", or None.
    limited_by: str | None = None
    # The grid limits cannot be held even with the whole band (kW over the limit).
    limit_violation_kw: float = 0.0
    site_kw: float = 0.0  # predicted site power with these targets
    notes: list[str] = field(default_factory=list)


STRATEGIES = ("pro_rata", "merit_order")


def _fit_gap(p_min: float, p_max: float, gap: tuple[float, float] | None) -> tuple[float, float, tuple[float, float] | None]:
    """Fit a gap to a band.  A gap that leaves only one side of the band removes the
    other side: a charger whose EV takes less than the minimum current can only be off."""
    if gap is None:
        return p_min, p_max, None
    low, high = gap
    has_lower, has_upper = p_min <= low + EPSILON_KW, high <= p_max + EPSILON_KW
    if high - low <= EPSILON_KW or not (has_lower or has_upper):
        return p_min, p_max, None  # no gap, or the whole band in it: nothing better to do than ignore it
    if not has_lower:
        return max(p_min, high), p_max, None
    if not has_upper:
        return p_min, min(p_max, low), None
    return p_min, p_max, gap


def _clamp_band(asset: AssetBand) -> AssetBand:
    """The physical band: gap fitted, and a baseline outside it (the device moved) pulled inside."""
    p_min, p_max, gap = _fit_gap(asset.p_min_kw, asset.p_max_kw, asset.gap_kw)
    baseline = min(max(asset.baseline_kw, p_min), p_max)
    if (baseline, p_min, p_max, gap) == (asset.baseline_kw, asset.p_min_kw, asset.p_max_kw, asset.gap_kw):
        return asset  # the usual case: nothing to fit (replace() costs as much as the rest)
    return replace(asset, baseline_kw=baseline, p_min_kw=p_min, p_max_kw=p_max, gap_kw=gap)


def _reachable(band: AssetBand) -> AssetBand:
    """The band narrowed to what the ramp rate reaches by the next cycle (baseline unchanged).

    Distances are measured with the gap collapsed, so switching on at the
    minimum load is one step.  A reach that misses the band entirely (the
    band moved: a SoC limit, a full store) gives the band's nearest end: the
    device's limits come before its ramp.
    """
    if band.ramp_kw is None or band.present_kw is None or not math.isfinite(band.present_kw):
        return band
    low, width = (band.gap_kw[0], band.gap_kw[1] - band.gap_kw[0]) if band.gap_kw else (math.inf, 0.0)
    present = min(max(band.present_kw, band.p_min_kw), band.p_max_kw)
    collapsed = present if present <= low else max(low, present - width)
    reach_lo = collapsed - band.ramp_kw
    reach_hi = collapsed + band.ramp_kw
    reach_lo = reach_lo if reach_lo <= low else reach_lo + width
    reach_hi = reach_hi if reach_hi < low else reach_hi + width
    p_min, p_max = max(band.p_min_kw, reach_lo), min(band.p_max_kw, reach_hi)
    if p_min > p_max:
        p_min = p_max = band.p_min_kw if reach_hi < band.p_min_kw else band.p_max_kw
    p_min, p_max, gap = _fit_gap(p_min, p_max, band.gap_kw)
    return replace(band, p_min_kw=p_min, p_max_kw=p_max, gap_kw=gap)


def allocate(
    requested_kw: float,
    assets: list[AssetBand],
    uncontrolled_kw: float = 0.0,
    export_limit_kw: float | None = None,
    import_limit_kw: float | None = None,
    strategy: str = "pro_rata",
) -> Allocation:
    if not math.isfinite(requested_kw):
        raise ValueError(f"requested_kw must be finite, got {requested_kw}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    physical = [_clamp_band(a) for a in assets if a.p_max_kw >= a.p_min_kw]
    up_total = sum(a.up_kw for a in physical)
    down_total = sum(a.down_kw for a in physical)
    bands = [_reachable(a) for a in physical]
    baseline_site = uncontrolled_kw + sum(a.baseline_kw for a in bands)

    # Activation range the grid limits allow, then the range the bands reach
    # by the next cycle.  The ramps shape the sharing but never hold a grid
    # limit back: where the ramps cannot hold it, the physical bands do.
    grid_hi = math.inf if export_limit_kw is None else export_limit_kw - baseline_site
    grid_lo = -math.inf if import_limit_kw is None else -import_limit_kw - baseline_site
    activation = requested_kw
    limited_by = None
    if activation > grid_hi:
        activation, limited_by = grid_hi, "export_limit"
    if activation < grid_lo:
        activation, limited_by = grid_lo, "import_limit"
    reach_hi = sum(a.p_max_kw - a.baseline_kw for a in bands)
    reach_lo = sum(a.p_min_kw - a.baseline_kw for a in bands)
    within_reach = min(max(activation, reach_lo), reach_hi)
    beyond_reach = not grid_lo - 1e-9 <= within_reach <= grid_hi + 1e-9
    if beyond_reach:
        physical_hi = sum(a.p_max_kw - a.baseline_kw for a in physical)
        physical_lo = sum(a.p_min_kw - a.baseline_kw for a in physical)
        within_reach = min(max(min(max(within_reach, grid_lo), grid_hi), physical_lo), physical_hi)
    if abs(within_reach - activation) > 1e-9:
        activation, limited_by = within_reach, limited_by or "band"

    # Each asset starts from its baseline, or the nearest power it can reach;
    # the rest of the activation is shared by strategy.
    targets = {a.asset_id: min(max(a.baseline_kw, a.p_min_kw), a.p_max_kw) for a in bands}
    _distribute(bands, targets, activation - _delivered(bands, targets), strategy)
    if beyond_reach:
        _distribute(physical, targets, activation - _delivered(bands, targets), strategy)
        bands = physical

    if any(band.in_gap(targets[band.asset_id]) for band in bands):
        _round_out_of_gaps(bands, targets)
        _absorb(bands, targets, activation - _delivered(bands, targets), strategy)
        _hold_grid_limits(bands, targets, uncontrolled_kw, export_limit_kw, import_limit_kw, activation, strategy)

    delivered = _delivered(bands, targets)
    if abs(delivered - activation) > 1e-6 and limited_by is None:
        limited_by = "discrete_band"
    if limited_by and abs(delivered - requested_kw) <= 1e-6:
        limited_by = None
    site_kw = uncontrolled_kw + sum(targets.values())
    return Allocation(
        targets_kw=targets,
        requested_kw=requested_kw,
        activation_kw=delivered,
        band_up_kw=up_total,
        band_down_kw=down_total,
        limited_by=limited_by,
        limit_violation_kw=_violation_kw(site_kw, export_limit_kw, import_limit_kw),
        site_kw=site_kw,
    )


def _delivered(bands: list[AssetBand], targets: dict[str, float]) -> float:
    return sum(targets[b.asset_id] - b.baseline_kw for b in bands)


def _merit_groups(bands: list[AssetBand], strategy: str, worst_first: bool = False) -> list[list[AssetBand]]:
    if strategy != "merit_order":
        return [bands]
    merits = sorted({band.merit for band in bands}, reverse=worst_first)
    return [[band for band in bands if band.merit == merit] for merit in merits]


def _move(groups: list[list[AssetBand]], targets: dict[str, float], residual_kw: float,
          room: Callable[[AssetBand, float, bool], float]) -> float:
    """Move targets by ``residual_kw`` in all, group after group, pro rata to ``room``
    within a group; returns what could not be moved."""
    upward = residual_kw > 0
    remaining = abs(residual_kw)
    for group in groups:
        if remaining <= EPSILON_KW:
            break
        rooms = {band.asset_id: room(band, targets[band.asset_id], upward) for band in group}
        total = sum(rooms.values())
        if total <= EPSILON_KW:
            continue
        moved = min(remaining, total)
        for band in group:
            share = moved * rooms[band.asset_id] / total
            targets[band.asset_id] += share if upward else -share
        remaining -= moved
    return math.copysign(remaining, residual_kw) if remaining > EPSILON_KW else 0.0


def _band_room(band: AssetBand, target: float, upward: bool) -> float:
    return max(0.0, band.p_max_kw - target) if upward else max(0.0, target - band.p_min_kw)


def _segment_room(band: AssetBand, target: float, upward: bool) -> float:
    low, high = band.segment(target)
    return max(0.0, high - target) if upward else max(0.0, target - low)


def _room_toward_baseline(band: AssetBand, target: float, upward: bool) -> float:
    """Room to give back activation, without crossing the baseline or the gap."""
    room = _segment_room(band, target, upward)
    return min(room, max(0.0, band.baseline_kw - target)) if upward else min(room, max(0.0, target - band.baseline_kw))


def _distribute(bands: list[AssetBand], targets: dict[str, float], residual_kw: float, strategy: str) -> None:
    """Share ``residual_kw`` of activation: pro rata to each asset's room in that
    direction, or by merit order (best first, equal merits pro rata), within [p_min, p_max]."""
    if abs(residual_kw) > EPSILON_KW:
        _move(_merit_groups(bands, strategy), targets, residual_kw, _band_room)
    for band in bands:  # rounding must not leave the band
        targets[band.asset_id] = min(max(targets[band.asset_id], band.p_min_kw), band.p_max_kw)


def _absorb(bands: list[AssetBand], targets: dict[str, float], residual_kw: float, strategy: str) -> float:
    """Move targets within their segments to deliver ``residual_kw`` more; returns what is left.

    Activation already given is taken back first (by the marginal assets first
    in merit order), before any asset is moved the other way from its baseline.
    """
    if abs(residual_kw) <= EPSILON_KW:
        return 0.0
    residual_kw = _move(_merit_groups(bands, strategy, worst_first=True), targets, residual_kw, _room_toward_baseline)
    if abs(residual_kw) <= EPSILON_KW:
        return 0.0
    return _move(_merit_groups(bands, strategy), targets, residual_kw, _segment_room)


def _violation_kw(site_kw: float, export_limit_kw: float | None, import_limit_kw: float | None) -> float:
    if export_limit_kw is not None and site_kw > export_limit_kw + 1e-6:
        return site_kw - export_limit_kw
    if import_limit_kw is not None and -site_kw > import_limit_kw + 1e-6:
        return -site_kw - import_limit_kw
    return 0.0


def _room(bands: list[AssetBand], targets: dict[str, float]) -> tuple[float, float]:
    """How far the targets can move up and down without leaving a segment."""
    up = down = 0.0
    for band in bands:
        target = targets[band.asset_id]
        low, high = band.segment(target)
        up += max(0.0, high - target)
        down += max(0.0, target - low)
    return up, down


def _round_out_of_gaps(bands: list[AssetBand], targets: dict[str, float]) -> None:
    """Put every target that lies in its gap at one end of the gap (error diffusion).

    ``error`` is what the rounded targets deliver beyond the continuous shares;
    the assets outside their gaps can absorb it while it stays within
    [-room_up, room_down].  Each asset takes the end that keeps the error in
    that window, or nearest to it, and otherwise nearest to zero.  When the
    window is at least as wide as the widest gap the error never leaves it.
    """
    in_gap = [b for b in bands if b.in_gap(targets[b.asset_id])]
    outside = [b for b in bands if not b.in_gap(targets[b.asset_id])]
    room_up, room_down = _room(outside, targets)
    error = 0.0
    # Widest gaps first: the narrow ones then correct what the wide ones left.
    for band in sorted(in_gap, key=lambda b: (b.gap_kw[0] - b.gap_kw[1], b.asset_id)):
        target = targets[band.asset_id]
        low, high = band.gap_kw
        options = (error + (high - target), error + (low - target))

        def cost(candidate: float) -> tuple[float, float]:
            outside_window = max(0.0, -room_up - candidate, candidate - room_down)
            return outside_window, abs(candidate)

        chosen = min(options, key=cost)
        targets[band.asset_id] = high if chosen == options[0] else low
        error = chosen


def _hold_grid_limits(
    bands: list[AssetBand],
    targets: dict[str, float],
    uncontrolled_kw: float,
    export_limit_kw: float | None,
    import_limit_kw: float | None,
    activation_kw: float,
    strategy: str,
) -> None:
    """Switch gapped assets across their gap while that brings the site closer to its limits.

    A switch moves one asset to the end of its gap on the limit's safe side;
    the assets then move back, within their segments, toward the activation
    asked for (which lies within the limits).  A switch is kept only if it
    lessens the excess, so this ends, and a narrow window between the two
    limits cannot make it swing.
    """
    def excess_kw() -> float:
        return _violation_kw(uncontrolled_kw + sum(targets.values()), export_limit_kw, import_limit_kw)

    excess = excess_kw()
    while excess > 0:
        downward = export_limit_kw is not None and uncontrolled_kw + sum(targets.values()) > export_limit_kw
        candidates = []
        for band in bands:
            if band.gap_kw is None:
                continue
            low, high = band.gap_kw
            target = targets[band.asset_id]
            if downward and target >= high - EPSILON_KW:
                candidates.append((target - low, low, band))
            elif not downward and target <= low + EPSILON_KW:
                candidates.append((high - target, high, band))
        # Smallest switches that clear the excess first, then the largest that do not.
        candidates.sort(key=lambda c: (c[0] < excess - 1e-6, c[0] if c[0] >= excess - 1e-6 else -c[0]))
        for _, switched_to, band in candidates:
            before = dict(targets)
            targets[band.asset_id] = switched_to
            _absorb(bands, targets, activation_kw - _delivered(bands, targets), strategy)
            now = excess_kw()
            if now < excess - 1e-9:
                excess = now
                break
            targets.clear()
            targets.update(before)
        else:
            return
