"""Schedules: every rejection names its field; the book's replacement rule and lookups agree with slot arithmetic."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from edge.control.schedules import (
    ConnectionLimits,
    Schedule,
    ScheduleBook,
    ScheduleRejected,
    ScheduleRules,
    ScheduleValidator,
    on_grid,
    tightest_limits,
    time_weighted_mean,
)
from edge.control.setpoints import iso_time

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z, a whole hour
HOUR = 3600.0


def message(**fields) -> bytes:
    payload = {"id": "sch-1", "ts": iso_time(NOW), "kind": "activation", "start": iso_time(NOW), "resolution_s": 900,
               "values": [5.0, None, -3]}
    payload.update(fields)
    return json.dumps({k: v for k, v in payload.items() if v is not ...}).encode()


@pytest.fixture
def validator():
    return ScheduleValidator()


def schedule(id: str, kind: str, start_s: float, resolution_s: int, values, issued_at: float = NOW, currency=None) -> Schedule:
    return Schedule(id, kind, issued_at, start_s, resolution_s, tuple(values), NOW, currency)


# ------------------------------------------------------------------- accepted


def test_accepts_each_kind(validator):
    activation = validator.validate(message(), NOW)
    assert activation.values == (5.0, None, -3.0) and activation.end_s == NOW + 2700
    assert activation.start_s == NOW and activation.resolution_s == 900
    site_power = validator.validate(message(id="p", kind="site_power", start=NOW - 60, values=[-40, None]), NOW)
    assert site_power.start_s == NOW - 60 and site_power.values == (-40.0, None)
    limits = validator.validate(message(id="l", kind="connection_limits", resolution_s=3600,
                                        values=[{"import_limit_kw": 50, "export_limit_kw": None}, {"export_limit_kw": 0}, None]), NOW)
    assert limits.values == (ConnectionLimits(50.0, None), ConnectionLimits(None, 0.0), None)
    tariff = validator.validate(message(id="t", kind="tariff", currency="EUR", resolution_s=3600, values=[0.25, -0.01]), NOW)
    assert tariff.currency == "EUR" and tariff.values == (0.25, -0.01)


def test_a_schedule_that_started_earlier_but_has_not_ended_is_accepted(validator):
    accepted = validator.validate(message(start=iso_time(NOW - 2000)), NOW)  # ends at NOW + 700
    assert accepted.covers(NOW)


# ------------------------------------------------------------------ rejected


SEVEN_DAYS_OF_MINUTES = [0.0] * (7 * 1440)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff", "not valid JSON"),
        (b"[]", "must be a JSON object, got list"),
        (message(id=""), "id: must be a non-empty string"),
        (message(id="x" * 129), "id: must be a non-empty string of at most 128"),
        (message(extra=1), "unknown field(s): extra"),
        (message(kind="fcr"), "kind: must be one of activation, site_power, connection_limits, tariff"),
        (message(kind=...), "kind: must be one of"),
        (message(start=...), "start: missing"),
        (message(ts=...), "ts: missing"),
        (message(values=...), "values: missing"),
        (message(resolution_s=...), "resolution_s: missing"),
        (message(ts="noon"), "ts: not an ISO 8601 time"),
        (message(start="2027-01-15T08:00:00"), "start: ISO time needs a zone"),
        (message(start=True), "start: must be an ISO 8601 time or epoch seconds"),
        (message(resolution_s="900"), "resolution_s: must be a number, got str"),
        (message(resolution_s=30), "resolution_s: must be a whole number of seconds in 60..3600, got 30"),
        (message(resolution_s=7200), "resolution_s: must be a whole number of seconds in 60..3600, got 7200"),
        (message(resolution_s=90.5), "resolution_s: must be a whole number of seconds"),
        (message(resolution_s=700), "resolution_s: must divide 86400"),
        (message(values=[]), "values: must be a non-empty array"),
        (message(values={"0": 1}), "values: must be a non-empty array"),
        (message(resolution_s=60, values=SEVEN_DAYS_OF_MINUTES + [0.0]), "values: 10081 slots of 60 s span 168.017 h, more than the 168 h allowed"),
        (message(values=[1, "2"]), "values[1]: must be a number, got str"),
        (message(values=[1, True]), "values[1]: must be a number, got bool"),
        (message(values=[2e6]), "values[0]: 2e+06 kW is beyond"),
        (message(id="n", values=[1]).replace(b"[1]", b"[NaN]"), "values[0]: must be finite, got nan"),
        (message(id="n", values=[1]).replace(b"[1]", b"[-Infinity]"), "values[0]: must be finite, got -inf"),
        (message(kind="connection_limits", values=[{"import_limit_kw": -1}]),
         "values[0].import_limit_kw: a limit is a magnitude and must be >= 0, got -1"),
        (message(kind="connection_limits", values=[None, {"export_limit_kw": "5"}]), "values[1].export_limit_kw: must be a number, got str"),
        (message(kind="connection_limits", values=[{"import_limit": 5}]), "values[0]: unknown field(s): import_limit"),
        (message(kind="connection_limits", values=[5]), "values[0]: must be an object with import_limit_kw"),
        (message(kind="tariff", currency="EUR", values=[0.2, None]), "values[1]: a tariff needs a price in every slot, got null"),
        (message(kind="tariff", currency="EUR", values=[2e5]), "values[0]: 200000 per kWh is beyond"),
        (message(kind="tariff", values=[0.2]), "currency: a tariff needs an ISO 4217 code such as EUR, got None"),
        (message(kind="tariff", currency="euro", values=[0.2]), "currency: a tariff needs an ISO 4217 code"),
        (message(currency="EUR"), "currency: only a tariff has a currency, not activation"),
        (message(ts=iso_time(NOW + 30)), "ts: 30.0 s in the future (tolerance 5 s"),
        (message(ts=iso_time(NOW - 2 * HOUR), start=NOW), "ts: issued 7200.0 s ago (limit 3600 s)"),
        (message(start=NOW - 25 * HOUR, resolution_s=3600, values=[1] * 30), "start: 25.00 h in the past (limit 24 h)"),
        (message(start=NOW + 8 * 24 * HOUR), "start: 192.00 h in the future (limit 168 h)"),
        (message(start=NOW - HOUR, values=[1, 2]), "values: the schedule ended 1800.0 s ago"),
    ],
)
def test_rejections_name_the_field(validator, raw, reason):
    with pytest.raises(ScheduleRejected) as caught:
        validator.validate(raw, NOW)
    assert reason in caught.value.reason


def test_rejection_keeps_the_id(validator):
    with pytest.raises(ScheduleRejected) as caught:
        validator.validate(message(id="sch-9", resolution_s=1), NOW)
    assert caught.value.schedule_id == "sch-9"


def test_replay_is_rejected_but_a_rejected_id_may_be_sent_again(validator):
    with pytest.raises(ScheduleRejected):
        validator.validate(message(id="a", values=["x"]), NOW)
    validator.validate(message(id="a"), NOW)  # the corrected message with the same id
    with pytest.raises(ScheduleRejected, match=r"id: already received \(replay\)"):
        validator.validate(message(id="a", kind="site_power"), NOW)


def test_tariff_in_another_currency_than_the_one_in_force_is_rejected(validator):
    book = ScheduleBook()
    book.add(validator.validate(message(id="t1", kind="tariff", currency="EUR", values=[0.2]), NOW, book))
    with pytest.raises(ScheduleRejected, match=r"currency: USD differs from the tariff in force \(t1, EUR\)"):
        validator.validate(message(id="t2", kind="tariff", currency="USD", values=[0.2]), NOW, book)
    assert validator.validate(message(id="t3", kind="tariff", currency="EUR", values=[0.3]), NOW, book).currency == "EUR"


def test_rules_are_configurable():
    validator = ScheduleValidator(ScheduleRules(max_span_s=3600, clock_skew_tolerance_s=60))
    validator.validate(message(id="a", ts=NOW + 30), NOW)
    with pytest.raises(ScheduleRejected, match="more than the 1 h allowed"):
        validator.validate(message(id="b", values=[0] * 5), NOW)
    with pytest.raises(ValueError):
        ScheduleRules(max_age_s=-1)


# ---------------------------------------------------------------------- book


def test_newer_schedule_replaces_the_overlapping_part_only():
    book = ScheduleBook()
    book.add(schedule("old", "activation", NOW, 3600, [1, 2, 3, 4], issued_at=NOW - 10))
    book.add(schedule("new", "activation", NOW + 5400, 900, [10, None, 30]))  # 09:30-10:15, a null at 09:45
    assert book.value_at("activation", NOW + 1800) == 1  # old
    assert book.value_at("activation", NOW + 5400) == 10  # new
    assert book.value_at("activation", NOW + 6300) is None  # new's null cancels old's 2 there
    assert book.value_at("activation", NOW + 7200) == 30
    assert book.value_at("activation", NOW + 8100) == 3  # old again after new's end
    assert book.value_at("activation", NOW + 4 * HOUR) is None  # nothing covers
    assert [(s.start_s - NOW, s.end_s - NOW, s.value, s.schedule_id) for s in book.slots("activation", NOW + 3000, NOW + 9000)] == [
        (3000, 3600, 1, "old"), (3600, 5400, 2, "old"), (5400, 6300, 10, "new"), (6300, 7200, None, "new"),
        (7200, 8100, 30, "new"), (8100, 9000, 3, "old"),
    ]


def test_older_ts_arriving_late_only_fills_gaps_and_equal_ts_goes_to_the_last_received():
    book = ScheduleBook()
    book.add(schedule("b", "site_power", NOW, 900, [-20, -20], issued_at=NOW))
    book.add(schedule("a", "site_power", NOW, 900, [-5, -5, -5], issued_at=NOW - 60))  # reordered: older ts
    assert [book.value_at("site_power", NOW + t) for t in (0, 900, 1800)] == [-20, -20, -5]
    book.add(schedule("c", "site_power", NOW, 900, [-7], issued_at=NOW))
    assert book.value_at("site_power", NOW) == -7
    assert book.deciding("site_power", NOW).id == "c"


def test_kinds_are_independent():
    book = ScheduleBook()
    book.add(schedule("a", "activation", NOW, 900, [5]))
    assert book.value_at("site_power", NOW) is None and book.value_at("activation", NOW) == 5


def test_expire_drops_ended_and_fully_shadowed_schedules():
    book = ScheduleBook()
    book.add(schedule("ended", "activation", NOW - 1800, 900, [1, 1], issued_at=NOW - 20))
    book.add(schedule("shadowed", "activation", NOW - 900, 900, [2, 2, 2], issued_at=NOW - 10))  # [-900, 1800)
    book.add(schedule("partly", "activation", NOW, 900, [3, 3, 3, 3], issued_at=NOW - 5))  # [0, 3600)
    book.add(schedule("newest", "activation", NOW, 900, [4, 4], issued_at=NOW))  # [0, 1800)
    dropped = {s.id for s in book.expire(NOW)}
    assert dropped == {"ended", "shadowed"}
    assert [s.id for s in book.in_force("activation")] == ["newest", "partly"]
    assert book.value_at("activation", NOW + 2000) == 3


def test_scheduled_activation_rule():
    book = ScheduleBook()
    assert book.scheduled_activation_kw(NOW, -30.0) == (None, None)
    book.add(schedule("act", "activation", NOW, 900, [5, None], issued_at=NOW - 10))
    assert book.scheduled_activation_kw(NOW, -30.0)[0] == 5
    assert book.scheduled_activation_kw(NOW + 900, -30.0) == (None, book.deciding("activation", NOW))  # a null slot
    # A newer site-power schedule decides: activation = scheduled site power - baseline.
    book.add(schedule("peak", "site_power", NOW, 900, [-20], issued_at=NOW))
    activation, source = book.scheduled_activation_kw(NOW, -30.0)
    assert activation == pytest.approx(10.0) and source.id == "peak"  # import 30 -> 20 kW: 10 kW upward
    assert book.scheduled_activation_kw(NOW, None)[0] is None  # baseline unknown: nothing to compute
    assert book.scheduled_activation_kw(NOW + 900, -30.0)[0] is None  # site_power ended; act's slot is null


def test_connection_limit_schedules_only_tighten():
    book = ScheduleBook()
    assert book.grid_limits_kw(NOW, 100.0, None) == (100.0, None)
    book.add(schedule("dso", "connection_limits", NOW, 900, [ConnectionLimits(60.0, 200.0), ConnectionLimits(None, 0.0), None]))
    assert book.grid_limits_kw(NOW, 100.0, 80.0) == (60.0, 80.0)  # import tightened; export 200 ignored
    assert book.grid_limits_kw(NOW, 100.0, None) == (60.0, 200.0)  # no profile export limit: the schedule's applies
    assert book.grid_limits_kw(NOW + 900, 100.0, 80.0) == (100.0, 0.0)
    assert book.grid_limits_kw(NOW + 1800, 100.0, 80.0) == (100.0, 80.0)  # a null slot: the profile's


def test_on_grid_resamples_tariffs_and_limits():
    book = ScheduleBook()
    book.add(schedule("t", "tariff", NOW, 1800, [0.2, 0.4], currency="EUR"))
    prices = on_grid(book.slots("tariff", NOW - 900, NOW + 5400), NOW - 900, 900, 7, time_weighted_mean)
    assert prices == [None, 0.2, 0.2, 0.4, 0.4, None, None]
    half = on_grid(book.slots("tariff", NOW + 900, NOW + 2700), NOW + 900, 1800, 1, time_weighted_mean)
    assert half == [pytest.approx(0.3)]
    book.add(schedule("l", "connection_limits", NOW, 300, [ConnectionLimits(50, None), ConnectionLimits(40, 9), None]))
    limits = on_grid(book.slots("connection_limits", NOW, NOW + 1800), NOW, 900, 2, tightest_limits)
    assert limits == [ConnectionLimits(40, 9), None]


# ---------------------------------------------------------------- properties

RESOLUTIONS = [60, 300, 900, 1800, 3600]


@st.composite
def schedules(draw):
    count = draw(st.integers(1, 6))
    result = []
    for i in range(count):
        resolution = draw(st.sampled_from(RESOLUTIONS))
        start = NOW + draw(st.integers(-2, 8)) * 450 + draw(st.sampled_from([0, 0, 7, 60]))
        values = draw(st.lists(st.one_of(st.none(), st.integers(-50, 50).map(float)), min_size=1, max_size=8))
        issued_at = NOW - draw(st.integers(0, 3))  # ties are common: arrival order breaks them
        result.append(schedule(f"s{i}", "activation", start, resolution, values, issued_at=issued_at))
    return result


def reference_value(added: list[Schedule], t: float):
    """The rule, written out: the newest (ts, then arrival) schedule covering t, and its slot."""
    covering = [(s.issued_at, order, s) for order, s in enumerate(added) if s.start_s <= t < s.end_s]
    if not covering:
        return None, None
    _, _, decider = max(covering, key=lambda c: (c[0], c[1]))
    return decider.values[int((t - decider.start_s) // decider.resolution_s)], decider.id


@settings(max_examples=200, deadline=None)
@given(schedules(), st.lists(st.integers(-2000, 8 * 3600 - 1), min_size=1, max_size=20))
def test_value_at_and_slots_follow_the_slot_arithmetic(added, offsets):
    book = ScheduleBook()
    for s in added:
        book.add(s)
    for offset in offsets:
        t = NOW + offset
        expected, decider = reference_value(added, t)
        assert book.value_at("activation", t) == expected
        got = book.deciding("activation", t)
        assert (got.id if got else None) == decider

    window = (NOW - 2000, NOW + 8 * 3600)
    stretches = book.slots("activation", *window)
    for a, b in zip(stretches, stretches[1:]):
        assert a.end_s <= b.start_s
    for stretch in stretches:
        assert stretch.start_s < stretch.end_s
        for t in (stretch.start_s, (stretch.start_s + stretch.end_s) / 2, math.nextafter(stretch.end_s, -math.inf)):
            assert reference_value(added, t) == (stretch.value, stretch.schedule_id)
    for offset in offsets:  # every covered instant lies in a stretch, every uncovered one in none
        t = NOW + offset
        inside = any(s.start_s <= t < s.end_s for s in stretches)
        assert inside == (reference_value(added, t)[1] is not None)


@settings(max_examples=200, deadline=None)
@given(schedules(), st.integers(0, 4 * 3600), st.lists(st.integers(0, 8 * 3600), min_size=1, max_size=20))
def test_expire_never_changes_what_is_decided_from_now_on(added, now_offset, offsets):
    book = ScheduleBook()
    for s in added:
        book.add(s)
    now = NOW + now_offset
    before = {t: (book.value_at("activation", NOW + t), getattr(book.deciding("activation", NOW + t), "id", None)) for t in offsets}
    book.expire(now)
    for t in offsets:
        if NOW + t >= now:
            assert (book.value_at("activation", NOW + t), getattr(book.deciding("activation", NOW + t), "id", None)) == before[t]
    assert all(s.end_s > now for s in book.in_force("activation"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(-1e6, 1e6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3)),
                min_size=1, max_size=5))
def test_validator_accepts_exactly_finite_numbers_and_nulls(values):
    validator = ScheduleValidator()
    raw = json.dumps({"id": "x", "ts": NOW, "kind": "activation", "start": NOW, "resolution_s": 60, "values": values}).encode()
    good = all(v is None or (isinstance(v, float) and math.isfinite(v) and abs(v) <= 1e6) for v in values)
    if good:
        assert validator.validate(raw, NOW).values == tuple(values)
    else:
        with pytest.raises(ScheduleRejected, match=r"values\[\d+\]"):
            validator.validate(raw, NOW)


def test_baseline_schedules_name_their_asset_and_are_kept_per_asset(validator):
    plan = validator.validate(message(id="b-1", kind="baseline", asset_id="bess-1", values=[5.0, -2.0]), NOW)
    assert plan.asset_id == "bess-1" and plan.book_key == "baseline:bess-1"
    with pytest.raises(ScheduleRejected, match="asset_id: a baseline schedule names its asset"):
        validator.validate(message(id="b-2", kind="baseline"), NOW)
    with pytest.raises(ScheduleRejected, match="asset_id: only a baseline schedule"):
        validator.validate(message(id="b-3", asset_id="bess-1"), NOW)
    book = ScheduleBook()
    book.add(plan)
    book.add(validator.validate(message(id="b-4", kind="baseline", asset_id="pv-1", values=[8.0]), NOW))
    assert book.value_at("baseline:bess-1", NOW + 1) == 5.0 and book.value_at("baseline:pv-1", NOW + 1) == 8.0
    assert book.value_at("baseline:bess-1", NOW + 901) == -2.0
    assert book.value_at("baseline:other", NOW) is None
