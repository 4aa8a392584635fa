"""EV charging plans: limits and minimum power always hold, the need is met whenever it can be,
cheapest slots first, and replanning with the energy delivered converges."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st
from pydantic import ValidationError

from edge.control.ev_planner import (
    SLOT_S,
    EvDefaults,
    EvPreferencesRejected,
    plan_charging,
    planning_slots,
    session_needs,
)
from edge.control.schedules import ScheduleBook, Schedule, on_grid, time_weighted_mean
from edge.control.setpoints import iso_time

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z, a slot boundary
HOUR = 3600.0
MIN_KW, MAX_KW = 4.14, 11.04  # 6 A and 16 A on three phases at 230 V
EPS = 1e-6


def energy(plan) -> list[float]:
    return [p * d / 3600 for p, d in zip(plan.charge_kw, plan.usable_s)]


# ------------------------------------------------------------ worked examples


def test_ev_meets_its_departure_energy_when_the_limits_allow():
    plan = plan_charging(NOW, NOW + 8 * HOUR, 40.0, MIN_KW, MAX_KW, available_kw=[8.0] * 32)
    assert plan.shortfall_kwh == 0 and plan.reason is None
    assert plan.expected_energy_kwh == pytest.approx(40.0)
    assert max(plan.charge_kw) <= 8.0
    assert plan.charge_kw[:20] == (8.0,) * 20 and plan.charge_kw[20] == 0  # flat price: as soon as possible


def test_shortfall_is_reported_when_the_limits_do_not_allow():
    plan = plan_charging(NOW, NOW + 4 * HOUR, 40.0, MIN_KW, MAX_KW, available_kw=[6.0] * 8 + [3.0] * 8)
    # 2 h at 6 kW; the 3 kW slots are below the charger's minimum, so unusable.
    assert plan.charge_kw == (6.0,) * 8 + (0.0,) * 8
    assert plan.expected_energy_kwh == pytest.approx(12.0) and plan.max_energy_kwh == pytest.approx(12.0)
    assert plan.shortfall_kwh == pytest.approx(28.0)
    assert plan.reason.startswith("site limits: 40.00 kWh needed by 2027-01-15T12:00:00.000Z")
    assert "at most 12.00 kWh (44.16 kWh without the limits)" in plan.reason


def test_shortfall_for_lack_of_time_names_the_limiting_power():
    plan = plan_charging(NOW, NOW + HOUR, 30.0, MIN_KW, MAX_KW, ev_max_kw=7.4)
    assert plan.shortfall_kwh == pytest.approx(30.0 - 7.4)
    assert "not enough time" in plan.reason and "the EV's maximum 7.4 kW" in plan.reason
    plan = plan_charging(NOW, NOW + HOUR, 30.0, MIN_KW, MAX_KW)
    assert "the charger's maximum 11.04 kW" in plan.reason


def test_cheapest_slots_first():
    prices = [0.30] * 4 + [0.10] * 4 + [0.20] * 8  # 08:00 dear, 09:00 cheap, 10:00 middling
    plan = plan_charging(NOW, NOW + 4 * HOUR, 15.0, MIN_KW, 10.0, prices=prices)
    assert plan.charge_kw[4:8] == (10.0,) * 4  # the cheap hour full: 10 kWh
    assert plan.charge_kw[8:10] == (10.0, 10.0) and sum(plan.charge_kw[10:]) == 0  # then the earliest middling ones
    assert sum(plan.charge_kw[:4]) == 0
    assert plan.expected_cost == pytest.approx(10 * 0.10 + 5 * 0.20)


def test_unpriced_slots_come_after_priced_ones():
    plan = plan_charging(NOW, NOW + 2 * HOUR, 5.0, MIN_KW, 10.0, prices=[None, None, None, 0.5])
    assert plan.charge_kw[3] == 10.0 and plan.charge_kw[0] == 10.0 and sum(plan.charge_kw[1:3]) == 0
    assert plan.expected_cost is None  # an unpriced slot is used


def test_partial_first_slot_and_departure_inside_a_slot():
    now = NOW + 600  # 10 min into the 08:00 slot
    departure = NOW + HOUR + 300  # 09:05
    assert planning_slots(now, departure) == [(NOW + k * SLOT_S, NOW + (k + 1) * SLOT_S) for k in range(5)]
    plan = plan_charging(now, departure, 100.0, MIN_KW, 12.0)
    assert plan.usable_s == (300.0, 900.0, 900.0, 900.0, 300.0)
    assert plan.expected_energy_kwh == pytest.approx(12.0 * 3300 / 3600)
    assert plan.charge_kw_at(now) == 12.0 and plan.charge_kw_at(NOW + 5 * SLOT_S) == 0.0
    assert plan.site_power_kw_at(now) == -12.0  # the sign convention: charging is import


def test_a_rest_below_the_minimum_is_taken_back_from_a_full_slot():
    # 10.5 kWh at up to 10 kW, min 4 kW: 4 full slots (10 kWh) leave 0.5 kWh, less than the 1 kWh a
    # slot at minimum gives; the dearest full slot gives 0.5 kWh back so that the need is met exactly.
    prices = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    plan = plan_charging(NOW, NOW + 1.5 * HOUR, 10.5, 4.0, 10.0, prices=prices)
    assert plan.charge_kw == pytest.approx((10.0, 10.0, 10.0, 8.0, 4.0, 0.0))
    assert plan.expected_energy_kwh == pytest.approx(10.5)


def test_over_delivery_when_the_minimum_makes_the_exact_amount_impossible():
    plan = plan_charging(NOW, NOW + HOUR, 0.5, 4.0, 10.0)
    assert plan.charge_kw == (4.0, 0.0, 0.0, 0.0)  # 1 kWh: the least a slot can take
    assert plan.expected_energy_kwh == pytest.approx(1.0) and plan.shortfall_kwh == 0


def test_nothing_to_do_and_impossible_cases():
    assert sum(plan_charging(NOW, NOW + HOUR, 0.0, MIN_KW, MAX_KW).charge_kw) == 0
    gone = plan_charging(NOW, NOW - 1, 5.0, MIN_KW, MAX_KW)
    assert gone.charge_kw == () and gone.shortfall_kwh == 5.0 and "has passed" in gone.reason
    weak_ev = plan_charging(NOW, NOW + HOUR, 5.0, MIN_KW, MAX_KW, ev_max_kw=3.7)
    assert weak_ev.shortfall_kwh == 5.0 and "below the charger's minimum" in weak_ev.reason
    with pytest.raises(ValueError):
        plan_charging(NOW, NOW + HOUR, 5.0, 12.0, 11.0)
    with pytest.raises(ValueError):
        plan_charging(NOW, math.nan, 5.0, MIN_KW, MAX_KW)


def test_plan_from_schedule_book_tariff():
    book = ScheduleBook()
    book.add(Schedule("t", "tariff", NOW, NOW, 3600, (0.3, 0.1, 0.3), NOW, "EUR"))
    grid = planning_slots(NOW, NOW + 3 * HOUR)
    prices = on_grid(book.slots("tariff", grid[0][0], grid[-1][1]), grid[0][0], SLOT_S, len(grid), time_weighted_mean)
    plan = plan_charging(NOW, NOW + 3 * HOUR, 10.0, MIN_KW, 10.0, prices=prices)
    assert plan.charge_kw[4:8] == (10.0,) * 4 and sum(plan.charge_kw) == 40.0


# ---------------------------------------------------------------- properties


@st.composite
def problems(draw):
    now = NOW + draw(st.integers(0, 899))
    departure = now + draw(st.integers(60, 6 * 3600))
    slots = len(planning_slots(now, departure))
    charger_min = draw(st.sampled_from([0.0, 1.38, 4.14]))
    charger_max = charger_min + draw(st.floats(0.5, 20.0))
    ev_max = draw(st.one_of(st.none(), st.floats(1.0, 25.0)))
    prices = draw(st.one_of(st.none(), st.lists(st.one_of(st.none(), st.sampled_from([-0.05, 0.1, 0.2, 0.25, 0.4])),
                                                 min_size=0, max_size=slots)))
    available = draw(st.one_of(st.none(), st.lists(st.one_of(st.none(), st.floats(-5.0, 25.0)), min_size=0, max_size=slots)))
    need = draw(st.floats(0.0, 80.0))
    return dict(now_s=now, departure_s=departure, energy_needed_kwh=need, charger_min_kw=charger_min,
                charger_max_kw=charger_max, ev_max_kw=ev_max, prices=prices, available_kw=available)


def at(values, i):
    return values[i] if values is not None and i < len(values) else None


def reference_caps_kw(problem) -> list[float]:
    """The most each slot allows, written out independently of the planner."""
    caps = []
    for i, _ in enumerate(planning_slots(problem["now_s"], problem["departure_s"])):
        cap = problem["charger_max_kw"]
        if problem["ev_max_kw"] is not None:
            cap = min(cap, problem["ev_max_kw"])
        if at(problem["available_kw"], i) is not None:
            cap = min(cap, max(0.0, at(problem["available_kw"], i)))
        caps.append(cap if cap > 0 and cap >= problem["charger_min_kw"] else 0.0)
    return caps


def price_rank(problem, i):
    price = at(problem["prices"], i)
    return math.inf if price is None else price


@settings(max_examples=400, deadline=None)
@given(problems())
def test_plan_properties(problem):
    plan = plan_charging(**problem)
    caps = reference_caps_kw(problem)
    minimum = problem["charger_min_kw"]
    need = problem["energy_needed_kwh"]
    slot_energy = energy(plan)
    max_feasible = sum(c * d / 3600 for c, d in zip(caps, plan.usable_s))

    # Never above the limits, never below the minimum when on.
    for power, cap in zip(plan.charge_kw, caps):
        assert power == 0 or minimum - 1e-9 <= power <= cap + 1e-9
    assert plan.max_energy_kwh == pytest.approx(max_feasible, abs=EPS)
    assert sum(slot_energy) == pytest.approx(plan.expected_energy_kwh, abs=EPS)

    # The need is met whenever the feasible capacity allows; otherwise the shortfall is exact.
    if max_feasible >= need - EPS:
        assert plan.shortfall_kwh == 0 and plan.reason is None
        assert plan.expected_energy_kwh >= need - EPS
        least_slot_kwh = max((minimum * d / 3600 for d in plan.usable_s), default=0.0)
        assert plan.expected_energy_kwh <= need + least_slot_kwh + EPS  # over-delivery < one slot at minimum
    else:
        assert plan.expected_energy_kwh == pytest.approx(max_feasible, abs=EPS)
        assert plan.shortfall_kwh == pytest.approx(need - max_feasible, abs=EPS)
        assert plan.reason

    # Cheapest first: no usable slot left unused while a dearer one is used; and a cheaper slot
    # is below its cap only while every dearer slot used runs at its minimum.
    used = [i for i, p in enumerate(plan.charge_kw) if p > 0]
    free = [i for i, c in enumerate(caps) if c > 0 and plan.charge_kw[i] == 0]
    for u in free:
        for v in used:
            assert price_rank(problem, u) >= price_rank(problem, v)
    for a in used:
        if plan.charge_kw[a] < caps[a] - 1e-9:
            for b in used:
                if price_rank(problem, b) > price_rank(problem, a):
                    assert plan.charge_kw[b] == pytest.approx(minimum)


@settings(max_examples=200, deadline=None)
@given(problems(), st.lists(st.integers(1, 900), min_size=1, max_size=8), st.booleans())
def test_replanning_with_the_energy_delivered_converges(problem, steps_s, on_slot_boundaries):
    """Follow each plan until the next replan (every slot boundary, or at odd times), then
    replan with the energy delivered so far: the need is met by departure whenever it could be
    from the start, and otherwise the most that could be charged is."""
    now, departure = problem["now_s"], problem["departure_s"]
    first_slot = math.floor(now / SLOT_S)
    # Prices and limits belong to absolute slots; each replan sees them from its own slot 0.
    prices = {first_slot + i: at(problem["prices"], i) for i in range(len(planning_slots(now, departure)))}
    available = {first_slot + i: at(problem["available_kw"], i) for i in range(len(planning_slots(now, departure)))}
    initial = plan_charging(**problem)
    need = problem["energy_needed_kwh"]
    delivered = 0.0
    step = 0
    while now < departure - 1e-9:
        k0 = math.floor(now / SLOT_S)
        count = len(planning_slots(now, departure))
        plan = plan_charging(now, departure, need - delivered, problem["charger_min_kw"], problem["charger_max_kw"],
                             problem["ev_max_kw"], [prices[k0 + i] for i in range(count)],
                             [available[k0 + i] for i in range(count)])
        if on_slot_boundaries:
            until = min((k0 + 1) * SLOT_S, departure)
        else:
            until = min(now + steps_s[step % len(steps_s)], (k0 + 1) * SLOT_S, departure)
            step += 1
        delivered += plan.charge_kw_at(now) * (until - now) / 3600
        now = until
    target = min(need, initial.max_energy_kwh)
    assert delivered >= target - 1e-5
    assert delivered <= max(need, initial.expected_energy_kwh) + 1e-5


# ------------------------------------------------------------- preferences


DEFAULTS = EvDefaults(default_departure_after_h=8, default_energy_kwh=20)


def test_defaults_fill_what_the_driver_did_not_give():
    needs = session_needs(None, NOW, NOW - HOUR, DEFAULTS)
    assert needs.departure_s == NOW + 7 * HOUR and needs.energy_kwh == 20
    assert (needs.departure_source, needs.energy_source, needs.ev_max_kw) == ("default", "default", None)
    late = session_needs({}, NOW + 100, NOW - 9 * HOUR, DEFAULTS)  # plugged in longer than the default
    assert late.departure_s == NOW + 2 * SLOT_S  # rolls forward: charge as soon as possible


def test_driver_preferences():
    needs = session_needs({"departure": iso_time(NOW + 5 * HOUR), "energy_kwh": 12.5, "ev_max_kw": 7.4}, NOW, NOW, DEFAULTS)
    assert (needs.departure_s, needs.energy_kwh, needs.ev_max_kw) == (NOW + 5 * HOUR, 12.5, 7.4)
    assert (needs.departure_source, needs.energy_source) == ("driver", "driver")
    by_soc = session_needs({"departure": NOW + HOUR, "target_soc_pct": 80, "battery_capacity_kwh": 60}, NOW, NOW, DEFAULTS, soc_pct=30)
    assert by_soc.energy_kwh == pytest.approx(30.0) and by_soc.energy_source == "target_soc"
    full = session_needs({"target_soc_pct": 80, "battery_capacity_kwh": 60}, NOW, NOW, DEFAULTS, soc_pct=90)
    assert full.energy_kwh == 0
    soc_unknown = session_needs({"target_soc_pct": 80, "battery_capacity_kwh": 60}, NOW, NOW, DEFAULTS)
    assert soc_unknown.energy_kwh == 20 and soc_unknown.energy_source == "default"
    nulls = session_needs({"departure": None, "energy_kwh": None}, NOW, NOW, DEFAULTS)
    assert nulls.departure_source == "default" and nulls.energy_source == "default"


@pytest.mark.parametrize(
    "preferences, reason",
    [
        ([1], "must be a JSON object, got list"),
        ({"departure_time": NOW}, "unknown field(s): departure_time"),
        ({"departure": "tonight"}, "departure: not an ISO 8601 time"),
        ({"departure": "2027-01-15T18:00:00"}, "departure: ISO time needs a zone"),
        ({"departure": NOW - 60}, "departure: 2027-01-15T07:59:00.000Z is already past"),
        ({"departure": NOW + 200 * HOUR}, "departure: 200.0 h ahead, more than 168 h"),
        ({"energy_kwh": "10"}, "energy_kwh: must be a number, got str"),
        ({"energy_kwh": math.inf}, "energy_kwh: must be finite"),
        ({"energy_kwh": -1}, "energy_kwh: must be in [0, 1000], got -1"),
        ({"energy_kwh": 5, "target_soc_pct": 80, "battery_capacity_kwh": 60}, "give at most one of energy_kwh or target_soc_pct"),
        ({"target_soc_pct": 120, "battery_capacity_kwh": 60}, "target_soc_pct: must be in [0, 100], got 120"),
        ({"target_soc_pct": 80}, "battery_capacity_kwh: needed with target_soc_pct"),
        ({"battery_capacity_kwh": 60}, "battery_capacity_kwh: only used with target_soc_pct"),
        ({"target_soc_pct": 80, "battery_capacity_kwh": 0}, "battery_capacity_kwh: must be in (0, 1000], got 0"),
        ({"ev_max_kw": True}, "ev_max_kw: must be a number, got bool"),
        ({"ev_max_kw": 0}, "ev_max_kw: must be in (0, 1000], got 0"),
    ],
)
def test_preference_rejections_name_the_field(preferences, reason):
    with pytest.raises(EvPreferencesRejected) as caught:
        session_needs(preferences, NOW, NOW, DEFAULTS, soc_pct=50)
    assert reason in caught.value.reason


def test_ev_defaults_model():
    assert EvDefaults().default_departure_after_h == 8.0
    with pytest.raises(ValidationError):
        EvDefaults(default_energy_kwh=-1)
    with pytest.raises(ValidationError):
        EvDefaults(default_departure_after_h=500)
    with pytest.raises(ValidationError):
        EvDefaults(departure_after_h=5)  # unknown key
