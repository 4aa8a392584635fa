"""The battery rules of a bidirectional EV (edge/control/v2x.py, edge/control/ev_dispatch.py):
pure logic, properties with hypothesis."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.asset import EvStatus
from edge.config.functions import EvDefaults
from edge.control.ev_dispatch import battery_energy
from edge.control.ev_planner import session_needs
from edge.control.v2x import BatteryEnergy, energy_range

EPS = 1e-6
kw = st.floats(0.0, 50.0)
kwh = st.floats(-20.0, 100.0)
maybe_kwh = st.none() | kwh


@given(charge=kw, discharge=kw, above=maybe_kwh, below=maybe_kwh, need=st.none() | st.floats(0, 100),
       left_s=st.none() | st.floats(-3600, 48 * 3600), horizon_s=st.floats(60, 3600))
@settings(max_examples=400, deadline=None)
def test_the_range_stays_inside_and_keeps_every_rule_for_the_horizon(charge, discharge, above, below, need, left_s, horizon_s):
    p_min, p_max = -charge, discharge
    got = energy_range(p_min, p_max, BatteryEnergy(above, below, need, left_s), horizon_s)
    h = horizon_s / 3600
    assert p_min - EPS <= got.p_min_kw <= got.p_max_kw + EPS <= p_max + 2 * EPS
    if got.p_max_kw > EPS:  # any discharge it allows, held for the horizon:
        assert above is not None, "no discharge without a figure for the battery's energy"
        assert got.p_max_kw * h <= max(0.0, above) + EPS, "below the minimum state of charge"
        if need is not None and left_s is not None and left_s > 0:
            window = min(h, left_s / 3600)
            assert need + got.p_max_kw * window <= charge * (left_s / 3600 - window) + EPS, "departure energy missed"
    if below is not None and got.p_min_kw < -EPS and got.p_min_kw < got.p_max_kw - EPS:
        assert -got.p_min_kw * h <= max(0.0, below) + EPS, "charged above the maximum state of charge"


@given(start_above=st.floats(0, 40), need=st.floats(0, 40), hours=st.floats(0.5, 12), charge=st.floats(3, 22),
       discharge=st.floats(1, 22), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=150, deadline=None)
def test_following_any_target_in_the_band_never_breaks_min_soc_or_a_reachable_departure(
        start_above, need, hours, charge, discharge, seed):
    """Cycle by cycle: the band is made again from the battery's state, any power in it is
    run for the cycle; the battery never goes below its minimum, and a departure that was
    reachable (with a horizon's margin) stays reachable to the end."""
    import random

    rng = random.Random(seed)
    horizon_s, step_s = 900.0, 60.0
    left_s = hours * 3600
    reachable = need <= charge * max(0.0, left_s / 3600 - horizon_s / 3600)
    above = start_above
    while left_s > 0:
        got = energy_range(-charge, discharge, BatteryEnergy(above, None, need, left_s), horizon_s)
        power = rng.choice([got.p_min_kw, got.p_max_kw, rng.uniform(got.p_min_kw, got.p_max_kw)])
        energy = power * step_s / 3600  # discharged (+) or charged (-)
        above -= energy
        need = max(0.0, need + energy)
        left_s -= step_s
        assert above >= -EPS, "went below the minimum state of charge"
        if reachable:
            assert need <= charge * max(0.0, left_s) / 3600 + EPS, "the departure energy became unreachable"


@pytest.mark.parametrize("left_s", [5e-324, 1e-12, 0.0036])
@pytest.mark.parametrize("need", [0.0, 5.0])
def test_a_departure_that_is_now_is_no_division_by_nothing(left_s, need):
    """A time to departure that rounds to nothing (hypothesis found 5e-324 s): no discharge, and what
    is still needed is charged at the maximum."""
    got = energy_range(-11.0, 11.0, BatteryEnergy(20.0, 20.0, need, left_s), 900.0)
    assert got.p_max_kw <= (-11.0 if need > 0 else 0.0) + EPS
    assert -11.0 - EPS <= got.p_min_kw <= got.p_max_kw + EPS


def test_each_rule_names_itself():
    h = 900
    assert energy_range(-11, 11, BatteryEnergy(None, None, None, None), h).limited_by == "energy_unknown"
    low_battery = energy_range(-11, 11, BatteryEnergy(1.0, None, None, None), h)
    assert (low_battery.p_max_kw, low_battery.limited_by) == (pytest.approx(4.0), "minimum_soc")
    leaving = energy_range(-11, 11, BatteryEnergy(30.0, None, 20.0, 2 * 3600), h)
    # 20 kWh in the 1.75 h after the horizon at 11 kW leaves -0.75 kWh: it must charge 3 kW at least
    assert leaving.limited_by == "departure_energy" and leaving.p_max_kw == pytest.approx(-3.0)
    full = energy_range(-11, 11, BatteryEnergy(30.0, 0.5, None, None), h)
    assert full.p_min_kw == pytest.approx(-2.0) and full.limited_by == "maximum_soc"
    with pytest.raises(ValueError):
        energy_range(1, -1, BatteryEnergy(None, None, None, None), h)
    with pytest.raises(ValueError):
        energy_range(-1, 1, BatteryEnergy(None, None, None, None), math.nan)


def test_the_floor_is_the_highest_minimum_known():
    car = EvStatus(bidirectional=True, soc_pct=50.0, capacity_kwh=60.0, energy_above_min_kwh=25.0)
    # profile/driver minimum 30 % of 60 kWh at 50 %: 12 kWh to give; the car's own says 25: 12 wins
    assert battery_energy(car, 30.0, None, None, None, 0.0).above_min_kwh == pytest.approx(12.0)
    # the driver's capacity figure counts over the car's
    assert battery_energy(car, 30.0, 40.0, None, None, 0.0).above_min_kwh == pytest.approx(8.0)
    # SoC unknown: only the car's figure; nothing known: None (nothing is discharged)
    assert battery_energy(EvStatus(energy_above_min_kwh=5.0), 30.0, None, None, None, 0.0).above_min_kwh == 5.0
    assert battery_energy(EvStatus(), 30.0, None, None, None, 0.0).above_min_kwh is None


NOW = 1_800_000_000.0


def test_the_cars_needs_come_after_the_drivers_and_before_the_defaults():
    defaults = EvDefaults()
    car = EvStatus(departure_s=NOW + 3 * 3600, energy_to_target_kwh=14.0, max_charge_kw=7.4)
    needs = session_needs(None, NOW, NOW, defaults, car=car)
    assert (needs.departure_s, needs.departure_source) == (NOW + 3 * 3600, "ev")
    assert (needs.energy_kwh, needs.energy_source, needs.ev_max_kw) == (14.0, "ev", 7.4)
    assert needs.energy_is_remaining
    driver = session_needs({"departure": NOW + 5 * 3600, "energy_kwh": 9, "min_soc_pct": 50}, NOW, NOW, defaults, car=car)
    assert (driver.departure_source, driver.energy_source, driver.min_soc_pct) == ("driver", "driver", 50)
    # a car's departure in the past, NaN or absurd is not used: the default applies
    for bad in (NOW - 10, math.nan, NOW + 400 * 24 * 3600):
        assert session_needs(None, NOW, NOW, defaults, car=EvStatus(departure_s=bad)).departure_source == "default"
