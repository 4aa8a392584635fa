"""Properties of the pro-rata allocation (hypothesis) and a few worked examples."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from edge.control.allocation import AssetBand, allocate

TOL = 1e-6

power = st.floats(min_value=-500, max_value=500, allow_nan=False, allow_infinity=False)


@st.composite
def asset_bands(draw):
    count = draw(st.integers(min_value=0, max_value=8))
    bands = []
    for index in range(count):
        low = draw(power)
        high = draw(st.floats(min_value=low, max_value=low + 500, allow_nan=False))
        baseline = draw(st.floats(min_value=low, max_value=high, allow_nan=False))
        bands.append(AssetBand(f"a{index}", baseline, low, high))
    return bands


limits = st.one_of(st.none(), st.floats(min_value=0, max_value=3000, allow_nan=False))


@settings(max_examples=400, deadline=None)
@given(requested=st.floats(min_value=-3000, max_value=3000, allow_nan=False), bands=asset_bands(),
       uncontrolled=st.floats(min_value=-500, max_value=500, allow_nan=False), export_limit=limits, import_limit=limits)
def test_targets_in_band_limits_held_request_met_when_feasible(requested, bands, uncontrolled, export_limit, import_limit):
    result = allocate(requested, bands, uncontrolled, export_limit, import_limit)

    for band in bands:
        target = result.targets_kw[band.asset_id]
        assert band.p_min_kw - TOL <= target <= band.p_max_kw + TOL

    base_site = uncontrolled + sum(b.baseline_kw for b in bands)
    up = sum(b.up_kw for b in bands)
    down = sum(b.down_kw for b in bands)
    lo, hi = -down, up
    if export_limit is not None:
        hi = min(hi, export_limit - base_site)
    if import_limit is not None:
        lo = max(lo, -import_limit - base_site)
    site = uncontrolled + sum(result.targets_kw.values())

    if lo <= hi + TOL:  # the limits can be held with the band there is
        if export_limit is not None:
            assert site <= export_limit + 1e-6
        if import_limit is not None:
            assert site >= -import_limit - 1e-6
        # the request is met when feasible, otherwise the shortfall is the least possible
        best = min(max(requested, lo), hi)
        assert result.activation_kw == pytest.approx(best, abs=1e-6)
        assert result.limit_violation_kw == 0
    else:  # reported, unless within the rounding tolerance of the limits
        assert result.limit_violation_kw > 0 or lo - hi <= 2e-6

    if result.activation_kw != pytest.approx(requested, abs=1e-6):
        assert result.limited_by in ("export_limit", "import_limit", "band")


@settings(max_examples=200, deadline=None)
@given(requested=st.floats(min_value=-3000, max_value=3000, allow_nan=False), bands=asset_bands())
def test_shares_are_pro_rata_to_the_band_in_the_direction_asked(requested, bands):
    result = allocate(requested, bands)
    total = sum(b.up_kw if requested > 0 else b.down_kw for b in bands)
    for band in bands:
        own = band.up_kw if requested > 0 else band.down_kw
        share = result.targets_kw[band.asset_id] - band.baseline_kw
        expected = result.activation_kw * own / total if total > 0 else 0.0
        assert share == pytest.approx(expected, abs=1e-6)


def test_worked_example_pv_and_battery():
    pv = AssetBand("pv", baseline_kw=8.0, p_min_kw=0.0, p_max_kw=8.0)  # can only curtail
    bess = AssetBand("bess", baseline_kw=0.0, p_min_kw=-5.0, p_max_kw=5.0)
    down = allocate(-6.5, [pv, bess])
    assert down.targets_kw == pytest.approx({"pv": 8.0 - 6.5 * 8 / 13, "bess": -6.5 * 5 / 13})
    up = allocate(3.0, [pv, bess])
    assert up.targets_kw == pytest.approx({"pv": 8.0, "bess": 3.0})
    beyond = allocate(9.0, [pv, bess])
    assert beyond.activation_kw == pytest.approx(5.0) and beyond.limited_by == "band"


def test_export_limit_curtails_even_without_a_request():
    pv = AssetBand("pv", baseline_kw=80.0, p_min_kw=0.0, p_max_kw=80.0)
    result = allocate(0.0, [pv], uncontrolled_kw=-10.0, export_limit_kw=50.0)
    assert result.targets_kw["pv"] == pytest.approx(60.0)
    assert result.limited_by == "export_limit"
    assert result.site_kw == pytest.approx(50.0)


def test_non_finite_request_is_refused():
    with pytest.raises(ValueError, match="finite"):
        allocate(math.nan, [])


# ------------------------------------------------------------ discontinuous ranges
# EV chargers and P2H units run at 0 or between their minimum and maximum load.


@st.composite
def bands_with_gaps(draw):
    """Continuous bands and gapped ones (off or min..max), with both sides of every gap in the band."""
    bands = []
    for index in range(draw(st.integers(min_value=0, max_value=5))):
        low = draw(power)
        high = draw(st.floats(min_value=low, max_value=low + 500, allow_nan=False))
        bands.append(AssetBand(f"c{index}", draw(st.floats(min_value=low, max_value=high, allow_nan=False)), low, high))
    for index in range(draw(st.integers(min_value=0, max_value=6))):
        max_load = draw(st.floats(min_value=1, max_value=300, allow_nan=False))
        min_load = draw(st.floats(min_value=0.1, max_value=max_load * 0.99, allow_nan=False))
        on = draw(st.booleans())
        baseline = -draw(st.floats(min_value=min_load, max_value=max_load, allow_nan=False)) if on else 0.0
        bands.append(AssetBand(f"g{index}", baseline, -max_load, 0.0, (-min_load, 0.0)))
    return bands


def _continuous(bands):
    return [AssetBand(b.asset_id, b.baseline_kw, b.p_min_kw, b.p_max_kw) for b in bands]


@settings(max_examples=500, deadline=None)
@given(requested=st.floats(min_value=-3000, max_value=3000, allow_nan=False), bands=bands_with_gaps(),
       uncontrolled=st.floats(min_value=-500, max_value=500, allow_nan=False), export_limit=limits, import_limit=limits)
def test_discrete_bands_never_commanded_into_their_gap(requested, bands, uncontrolled, export_limit, import_limit):
    result = allocate(requested, bands, uncontrolled, export_limit, import_limit)
    continuous = allocate(requested, _continuous(bands), uncontrolled, export_limit, import_limit)

    for band in bands:
        target = result.targets_kw[band.asset_id]
        assert band.p_min_kw - TOL <= target <= band.p_max_kw + TOL
        assert not band.in_gap(target), f"{band.asset_id} commanded to {target} inside its gap {band.gap_kw}"

    # A violation is never hidden: it is exactly what the targets predict.
    site = uncontrolled + sum(result.targets_kw.values())
    excess = max(0.0, site - export_limit if export_limit is not None else 0.0,
                 -site - import_limit if import_limit is not None else 0.0)
    assert result.limit_violation_kw == pytest.approx(excess, abs=1e-6)
    assert result.site_kw == pytest.approx(site)

    # Where the continuous assets have room to absorb the widest gap in both
    # directions, the discrete result delivers what the continuous one does.
    widest_gap = max((b.gap_kw[1] - b.gap_kw[0] for b in bands if b.gap_kw), default=0.0)
    free = [b for b in bands if b.gap_kw is None]
    room_up = sum(b.p_max_kw - continuous.targets_kw[b.asset_id] for b in free)
    room_down = sum(continuous.targets_kw[b.asset_id] - b.p_min_kw for b in free)
    if room_up >= widest_gap and room_down >= widest_gap:
        assert result.activation_kw == pytest.approx(continuous.activation_kw, abs=1e-6)
        assert result.limit_violation_kw == pytest.approx(continuous.limit_violation_kw, abs=1e-6)

    # A limit the continuous solution held is exceeded only when switching no
    # gapped asset across its gap would lessen the excess.
    if continuous.limit_violation_kw == 0 and result.limit_violation_kw > 0:
        exporting_too_much = export_limit is not None and site > export_limit
        for band in bands:
            if band.gap_kw is None:
                continue
            target = result.targets_kw[band.asset_id]
            switched = band.gap_kw[0] if exporting_too_much else band.gap_kw[1]
            if (target - switched > 0) != exporting_too_much or target == switched:
                continue  # already on the side that helps
            after = site - target + switched
            excess_after = max(0.0, after - export_limit if export_limit is not None else 0.0,
                               -after - import_limit if import_limit is not None else 0.0)
            assert excess_after >= result.limit_violation_kw - 1e-6, f"switching {band.asset_id} would help"
    if result.activation_kw != pytest.approx(requested, abs=1e-6):
        assert result.limited_by in ("export_limit", "import_limit", "band", "discrete_band")


def test_worked_example_chargers_start_whole_and_the_battery_takes_the_rest():
    # Two 11 kW chargers (minimum 4.1 kW) idle, a 10 kW battery idle: -6 kW asked.
    chargers = [AssetBand(f"ev{i}", 0.0, -11.0, 0.0, (-4.1, 0.0)) for i in (1, 2)]
    bess = AssetBand("bess", 0.0, -10.0, 10.0)
    result = allocate(-6.0, [*chargers, bess])
    # Pro rata would give each charger -2.06 kW (in the gap): one starts (at
    # least its minimum), the other stays off, the battery makes up the rest.
    on, off = sorted(result.targets_kw[c.asset_id] for c in chargers)
    assert -11.0 <= on <= -4.1 and off == 0.0
    assert result.targets_kw["bess"] < 0
    assert result.activation_kw == pytest.approx(-6.0)
    assert result.limited_by is None


def test_without_continuous_assets_the_shortfall_is_reported():
    boiler = AssetBand("boiler", 0.0, -500.0, 0.0, (-50.0, 0.0))
    result = allocate(-20.0, [boiler])
    assert result.targets_kw["boiler"] == 0.0  # off is nearer than 50 kW
    assert result.activation_kw == 0.0 and result.limited_by == "discrete_band"
    assert allocate(-30.0, [boiler]).targets_kw["boiler"] == -50.0


def test_an_import_limit_switches_a_charger_off_rather_than_break_it():
    # Site imports 20 kW already; import limit 25 kW; the VPP asks for -6 kW.
    charger = AssetBand("ev", 0.0, -11.0, 0.0, (-6.0, 0.0))
    result = allocate(-6.0, [charger], uncontrolled_kw=-20.0, import_limit_kw=25.0)
    assert result.targets_kw["ev"] == 0.0
    assert result.limit_violation_kw == 0.0 and result.limited_by == "import_limit"


def test_a_band_narrower_than_the_minimum_leaves_only_off():
    # The EV accepts 3 kW at most but the charger cannot go below 4.1 kW.
    charger = AssetBand("ev", 0.0, -3.0, 0.0, (-4.1, 0.0))
    assert allocate(-3.0, [charger]).targets_kw["ev"] == 0.0


# ------------------------------------------------------ merit order and ramp rates


@st.composite
def ranked_bands(draw):
    bands = []
    for index in range(draw(st.integers(min_value=1, max_value=7))):
        low = draw(power)
        high = draw(st.floats(min_value=low, max_value=low + 500, allow_nan=False))
        baseline = draw(st.floats(min_value=low, max_value=high, allow_nan=False))
        merit = (draw(st.integers(min_value=1, max_value=3)), draw(st.sampled_from([0.0, 10.0, 50.0])))
        bands.append(AssetBand(f"a{index}", baseline, low, high, merit=merit))
    return bands


@settings(max_examples=400, deadline=None)
@given(requested=st.floats(min_value=-3000, max_value=3000, allow_nan=False), bands=ranked_bands(),
       export_limit=limits, import_limit=limits)
def test_merit_order_uses_an_asset_only_when_every_better_one_is_full(requested, bands, export_limit, import_limit):
    merit = allocate(requested, bands, 0.0, export_limit, import_limit, strategy="merit_order")
    pro_rata = allocate(requested, bands, 0.0, export_limit, import_limit)
    # the same activation, shared differently
    assert merit.activation_kw == pytest.approx(pro_rata.activation_kw, abs=1e-6)
    assert merit.limit_violation_kw == pytest.approx(pro_rata.limit_violation_kw, abs=1e-6)
    upward = merit.activation_kw > 0
    for band in bands:
        share = merit.targets_kw[band.asset_id] - band.baseline_kw
        assert band.p_min_kw - TOL <= merit.targets_kw[band.asset_id] <= band.p_max_kw + TOL
        if abs(share) <= 1e-6:
            continue
        for better in bands:
            if better.merit < band.merit:
                target = merit.targets_kw[better.asset_id]
                assert target == pytest.approx(better.p_max_kw if upward else better.p_min_kw, abs=1e-6), (
                    f"{band.asset_id} (merit {band.merit}) used while {better.asset_id} (merit {better.merit}) had room")


def test_merit_order_worked_example():
    battery = AssetBand("bess", 0.0, -50.0, 50.0, merit=(1, 0.0))
    boiler = AssetBand("boiler", 0.0, -200.0, 0.0, merit=(2, 0.0))
    pv = AssetBand("pv", 80.0, 0.0, 80.0, merit=(3, 0.0))
    result = allocate(-120.0, [battery, boiler, pv], strategy="merit_order")
    assert result.targets_kw == pytest.approx({"bess": -50.0, "boiler": -70.0, "pv": 80.0})
    with pytest.raises(ValueError, match="strategy"):
        allocate(0.0, [battery], strategy="cheapest")


@st.composite
def ramped_bands(draw):
    bands = []
    for index in range(draw(st.integers(min_value=1, max_value=6))):
        low = draw(power)
        high = draw(st.floats(min_value=low, max_value=low + 500, allow_nan=False))
        baseline = draw(st.floats(min_value=low, max_value=high, allow_nan=False))
        present = draw(st.floats(min_value=low, max_value=high, allow_nan=False))
        ramp = draw(st.one_of(st.none(), st.floats(min_value=0, max_value=200, allow_nan=False)))
        bands.append(AssetBand(f"r{index}", baseline, low, high, present_kw=present, ramp_kw=ramp))
    return bands


@settings(max_examples=500, deadline=None)
@given(requested=st.floats(min_value=-3000, max_value=3000, allow_nan=False), bands=ramped_bands(),
       uncontrolled=st.floats(min_value=-500, max_value=500, allow_nan=False), export_limit=limits, import_limit=limits)
def test_ramps_are_respected_unless_a_grid_limit_needs_more(requested, bands, uncontrolled, export_limit, import_limit):
    result = allocate(requested, bands, uncontrolled, export_limit, import_limit)
    unramped = allocate(requested, [AssetBand(b.asset_id, b.baseline_kw, b.p_min_kw, b.p_max_kw) for b in bands],
                        uncontrolled, export_limit, import_limit)
    # Grid limits: never worse than without ramps.
    assert result.limit_violation_kw <= unramped.limit_violation_kw + 1e-6

    def reach(band):
        if band.ramp_kw is None:
            return band.p_min_kw, band.p_max_kw
        return max(band.p_min_kw, band.present_kw - band.ramp_kw), min(band.p_max_kw, band.present_kw + band.ramp_kw)

    base_site = uncontrolled + sum(b.baseline_kw for b in bands)
    reach_hi = sum(reach(b)[1] - b.baseline_kw for b in bands)
    reach_lo = sum(reach(b)[0] - b.baseline_kw for b in bands)
    grid_hi = math.inf if export_limit is None else export_limit - base_site
    grid_lo = -math.inf if import_limit is None else -import_limit - base_site
    if reach_lo <= grid_hi + 1e-9 and reach_hi >= grid_lo - 1e-9:  # the ramps can hold the limits
        for band in bands:
            low, high = reach(band)
            assert low - TOL <= result.targets_kw[band.asset_id] <= high + TOL
        best = min(max(min(max(requested, grid_lo), grid_hi), reach_lo), reach_hi)
        assert result.activation_kw == pytest.approx(best, abs=1e-6)


def test_a_slow_boiler_switches_on_at_its_minimum_and_then_ramps():
    # Boiler off, 10..40 kW, ramps 2 kW per cycle; battery fast.  -25 kW asked.
    boiler = AssetBand("boiler", 0.0, -40.0, 0.0, (-10.0, 0.0), present_kw=0.0, ramp_kw=2.0)
    bess = AssetBand("bess", 0.0, -20.0, 20.0)
    first = allocate(-25.0, [boiler, bess])
    assert -12.0 - TOL <= first.targets_kw["boiler"] <= -10.0 + TOL  # on, at most its minimum + one ramp step
    assert first.activation_kw == pytest.approx(-25.0)
    # a cycle later it runs at 12 kW: it can take 2 kW more, or switch off
    later = allocate(-25.0, [AssetBand("boiler", 0.0, -40.0, 0.0, (-10.0, 0.0), present_kw=-12.0, ramp_kw=2.0), bess])
    assert -14.0 - TOL <= later.targets_kw["boiler"] <= -10.0 + TOL
    assert later.activation_kw == pytest.approx(-25.0)
    off = allocate(0.0, [AssetBand("boiler", 0.0, -40.0, 0.0, (-10.0, 0.0), present_kw=-12.0, ramp_kw=2.0), bess])
    assert off.targets_kw["boiler"] == 0.0
