"""Properties of the pro-rata allocation (hypothesis) and a few worked examples."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from edge.allocation import AssetBand, allocate

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
    else:
        assert result.limit_violation_kw > 0

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
