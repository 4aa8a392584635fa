"""Local grid functions: FCR droop and Q(U) (properties with hypothesis), their profile
models, and both fed from the SunSpec simulator through the real driver."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from drivers.sunspec import create
from edge.control.fcr import FcrDroop
from edge.config.functions import FcrConfig, FunctionsConfig, QuConfig
from drivers.sunspec.config import SunSpecAsset
from edge.control.qu import QuDroop
from simulators.sunspec import DeviceSpec
from tests.test_sunspec_driver import simulated

TOL = 1e-9

# ======================================================================= FCR


@st.composite
def fcr_configs(draw) -> FcrConfig:
    # 0 or a deadband well above the float resolution of a frequency near 50 Hz (7e-15 Hz)
    deadband = draw(st.one_of(st.just(0.0), st.floats(min_value=0.001, max_value=10.0)))
    return FcrConfig(
        capacity_kw=draw(st.floats(min_value=0.1, max_value=10_000.0)),
        deadband_mhz=deadband,
        full_deviation_mhz=draw(st.floats(min_value=deadband + 1.0, max_value=1000.0)),
        nominal_hz=draw(st.sampled_from([50.0, 60.0])),
        full_activation_s=draw(st.floats(min_value=0.5, max_value=30.0)),
        frequency_source="pv1",
    )


deviations_hz = st.floats(min_value=-1.5, max_value=1.5)  # f - nominal
# what the controller may pass: a deviation from nominal, or a faulty measurement as it is
measurements = st.one_of(deviations_hz.map(lambda d: ("deviation", d)),
                         st.sampled_from([None, math.nan, math.inf, 30.0, 70.0]).map(lambda f: ("raw", f)))
steps_s = st.floats(min_value=0.0, max_value=5.0)


def fcr(**overrides) -> FcrConfig:
    fields = dict(capacity_kw=100.0, frequency_source="pv1")
    fields.update(overrides)
    return FcrConfig(**fields)


def hold(droop: FcrDroop, frequency_hz, start_s: float, duration_s: float, step_s: float = 0.5) -> float:
    """Feed the same (fresh) measurement every ``step_s`` for ``duration_s``; the time reached."""
    now = start_s
    droop.update(frequency_hz, now, now)
    while now < start_s + duration_s:
        now = min(now + step_s, start_s + duration_s)
        droop.update(frequency_hz, now, now)
    return now


def test_fcr_worked_examples():
    config = fcr(capacity_kw=100.0, deadband_mhz=10.0, full_deviation_mhz=200.0)
    droop = FcrDroop(config)
    assert droop.target_for(49.8) == pytest.approx(100.0)  # full upward: more export
    assert droop.target_for(50.2) == pytest.approx(-100.0)
    assert droop.target_for(49.9) == pytest.approx(50.0)
    assert droop.target_for(49.5) == pytest.approx(100.0)  # clamped
    assert droop.target_for(49.995) == 0.0  # inside the deadband
    # not offset by the deadband: the line goes through nominal
    assert droop.target_for(49.98) == pytest.approx(10.0)


@settings(max_examples=200, deadline=None)
@given(config=fcr_configs(), sequence=st.lists(st.tuples(measurements, steps_s), max_size=40))
def test_fcr_output_in_band_and_rate_limited(config, sequence):
    droop = FcrDroop(config)
    rate = config.capacity_kw / config.full_activation_s
    now, previous = 0.0, droop.update(None, 0.0)
    for (what, value), step in sequence:
        now += step
        out = droop.update(config.nominal_hz + value if what == "deviation" else value, now)
        assert -config.capacity_kw - TOL <= out <= config.capacity_kw + TOL
        assert abs(out - previous) <= rate * step * (1 + 1e-9) + TOL
        assert out == droop.activation_kw
        previous = out


@settings(max_examples=200, deadline=None)
@given(config=fcr_configs(), before=deviations_hz, inside=st.floats(min_value=-0.999, max_value=0.999))
def test_fcr_zero_inside_the_deadband_at_steady_state(config, before, inside):
    droop = FcrDroop(config)
    now = hold(droop, config.nominal_hz + before, 0.0, config.full_activation_s)
    frequency = config.nominal_hz + inside * config.deadband_mhz / 1000.0
    hold(droop, frequency, now, 2 * config.full_activation_s)  # from -capacity to 0 takes one full time
    assert droop.activation_kw == 0.0 and droop.target_kw == 0.0 and droop.measurement_ok


@settings(max_examples=200, deadline=None)
@given(config=fcr_configs(), a=deviations_hz, b=deviations_hz)
def test_fcr_steady_state_is_monotone_non_increasing_in_frequency(config, a, b):
    low, high = sorted((config.nominal_hz + a, config.nominal_hz + b))
    steady = []
    for frequency in (low, high):
        droop = FcrDroop(config)
        hold(droop, frequency, 0.0, config.full_activation_s)
        steady.append(droop.activation_kw)
    assert steady[0] >= steady[1] - TOL
    assert FcrDroop(config).target_for(low) >= FcrDroop(config).target_for(high)


@settings(max_examples=200, deadline=None)
@given(config=fcr_configs(), deviation=deviations_hz, steps=st.lists(st.floats(min_value=0.01, max_value=3.0), min_size=1))
def test_fcr_full_target_within_full_activation_time(config, deviation, steps):
    droop = FcrDroop(config)
    frequency = config.nominal_hz + deviation
    droop.update(config.nominal_hz, 0.0)
    now = 0.0
    for step in steps:  # the frequency steps at t = 0; the controller calls at irregular times
        now = min(now + step, config.full_activation_s)
        droop.update(frequency, now)
    droop.update(frequency, config.full_activation_s)
    assert droop.activation_kw == pytest.approx(droop.target_for(frequency), abs=1e-9 * config.capacity_kw)


@settings(max_examples=100, deadline=None)
@given(config=fcr_configs(), deviation=deviations_hz, fault=st.sampled_from(["stale", "missing", "nan", "implausible"]))
def test_fcr_bad_measurement_ramps_to_zero(config, deviation, fault):
    droop = FcrDroop(config)
    frequency = config.nominal_hz + deviation
    now = hold(droop, frequency, 0.0, config.full_activation_s)
    start_kw, measured_at = droop.activation_kw, now
    rate = config.capacity_kw / config.full_activation_s
    value = {"stale": frequency, "missing": None, "nan": math.nan, "implausible": 66.0}[fault]
    # a stale value is the last measurement read again, its age growing past the limit
    now += config.max_measurement_age_s + 0.5
    out = droop.update(value, now, measured_at if fault == "stale" else None)
    assert not droop.measurement_ok and droop.measurement_problem and droop.target_kw == 0.0
    assert abs(out) <= abs(start_kw) and abs(start_kw - out) <= rate * (config.max_measurement_age_s + 0.5) + TOL
    droop.update(value, now + config.full_activation_s, measured_at if fault == "stale" else None)
    assert droop.activation_kw == 0.0 and droop.frequency_hz is None


def test_fcr_ramp_back_uses_the_same_rate():
    droop = FcrDroop(fcr(capacity_kw=100.0, full_activation_s=10.0))
    hold(droop, 49.7, 0.0, 10.0)
    assert droop.activation_kw == 100.0 and droop.measurement_ok
    assert droop.update(None, 12.0) == pytest.approx(80.0)  # 10 kW/s down
    assert droop.measurement_problem == "no frequency measurement"
    assert droop.update(49.7, 13.0) == pytest.approx(90.0)  # back up at the same rate
    assert droop.update(49.7, 13.5, measured_at_s=7.0) == pytest.approx(85.0)  # 6.5 s old: stale
    assert "stale" in droop.measurement_problem


# ====================================================================== Q(U)


@st.composite
def qu_configs(draw) -> QuConfig:
    v_pus = draw(st.lists(st.floats(min_value=0.8, max_value=1.2), min_size=2, max_size=6, unique=True))
    v_pus = sorted(v_pus)
    if any(b - a < 1e-6 for a, b in zip(v_pus, v_pus[1:])):
        v_pus = [0.8 + 0.4 * i / (len(v_pus) - 1) for i in range(len(v_pus))]
    curve = [{"v_pu": v, "q_pct": draw(st.floats(min_value=-100.0, max_value=100.0))} for v in v_pus]
    return QuConfig(
        voltage_source="meter1",
        nominal_v=draw(st.sampled_from([230.0, 240.0, 11547.0])),
        curve=curve,
        q_max_kvar=draw(st.floats(min_value=0.1, max_value=5000.0)),
        update_interval_s=draw(st.floats(min_value=1.0, max_value=120.0)),
    )


def qu(**overrides) -> QuConfig:
    fields = dict(
        voltage_source="meter1",
        curve=[{"v_pu": 0.92, "q_pct": 100}, {"v_pu": 0.97, "q_pct": 0}, {"v_pu": 1.03, "q_pct": 0},
               {"v_pu": 1.08, "q_pct": -100}],
        q_max_kvar=40.0,
    )
    fields.update(overrides)
    return QuConfig(**fields)


def test_qu_worked_examples():
    droop = QuDroop(qu())
    assert droop.q_for(0.90 * 230) == pytest.approx(40.0)  # low voltage: inject (over-excited)
    assert droop.q_for(0.945 * 230) == pytest.approx(20.0)
    assert droop.q_for(230.0) == 0.0
    assert droop.q_for(1.055 * 230) == pytest.approx(-20.0)
    assert droop.q_for(1.2 * 230) == pytest.approx(-40.0)  # flat beyond the end point


@settings(max_examples=200, deadline=None)
@given(config=qu_configs(), v_pu=st.floats(min_value=0.5, max_value=1.5), fraction=st.floats(min_value=0.0, max_value=1.0),
       index=st.integers(min_value=0))
def test_qu_is_the_piecewise_linear_curve_within_its_range(config, v_pu, fraction, index):
    droop = QuDroop(config)
    qs = [p.q_pct / 100 * config.q_max_kvar for p in config.curve]
    q = droop.q_for(v_pu * config.nominal_v)
    assert min(qs) - 1e-6 <= q <= max(qs) + 1e-6
    for point, q_point in zip(config.curve, qs):  # through every point
        assert droop.q_for(point.v_pu * config.nominal_v) == pytest.approx(q_point, abs=1e-6 * config.q_max_kvar)
    # linear between neighbours
    left = index % (len(config.curve) - 1)
    a, b = config.curve[left], config.curve[left + 1]
    v = a.v_pu + fraction * (b.v_pu - a.v_pu)
    expected = qs[left] + fraction * (qs[left + 1] - qs[left])
    assert droop.q_for(v * config.nominal_v) == pytest.approx(expected, abs=1e-6 * config.q_max_kvar)
    # flat beyond the end points
    assert droop.q_for(config.curve[0].v_pu * config.nominal_v * 0.9) == pytest.approx(qs[0])
    assert droop.q_for(config.curve[-1].v_pu * config.nominal_v * 1.1) == pytest.approx(qs[-1])


@settings(max_examples=200, deadline=None)
@given(config=qu_configs(), calls=st.lists(st.tuples(st.floats(min_value=0.01, max_value=40.0),
                                                     st.floats(min_value=0.85, max_value=1.15)), max_size=60))
def test_qu_updates_only_once_per_interval(config, calls):
    droop = QuDroop(config)
    interval = config.update_interval_s
    first_v = config.nominal_v
    assert droop.update(first_v, 0.0) == pytest.approx(droop.q_for(first_v))  # the first call computes at once
    now, slots_computed = 0.0, {0}
    for step, v_pu in calls:
        now += step
        before = droop.request_kvar
        voltage = v_pu * config.nominal_v
        out = droop.update(voltage, now)
        slot = math.floor(now / interval + 1e-9)
        if slot in slots_computed:  # same slot: the request stands
            assert out == before and droop.computed_at_s <= now
        else:  # first call in a new slot: computed from this voltage
            assert out == droop.q_for(voltage) and droop.computed_at_s == now
            slots_computed.add(slot)
        assert droop.measurement_ok


def test_qu_keeps_the_last_request_for_one_interval_then_none():
    droop = QuDroop(qu(update_interval_s=60.0))
    assert droop.update(0.95 * 230, 0.0) == pytest.approx(16.0)
    assert droop.update(None, 10.0) == pytest.approx(16.0)  # held
    assert not droop.measurement_ok and droop.voltage_v is None
    assert droop.update(500.0, 60.0) == pytest.approx(16.0)  # implausible (2.2 pu); held 50 s so far
    assert droop.update(math.nan, 69.9) == pytest.approx(16.0)
    assert droop.update(None, 70.0) is None  # one interval without a valid voltage: no request
    assert droop.update(1.055 * 230, 72.0) == pytest.approx(-20.0)  # valid again: computed at once
    assert droop.update(0.95 * 230, 100.0) == pytest.approx(-20.0)  # next slot starts at 132
    assert droop.update(0.95 * 230, 132.0) == pytest.approx(16.0)
    assert droop.update(230.0, 200.0, measured_at_s=139.0) == pytest.approx(16.0)  # 61 s old: stale
    assert "stale" in droop.measurement_problem


# ============================================================ configuration


def problems(model, data) -> str:
    with pytest.raises(ValidationError) as error:
        model.model_validate(data)
    return str(error.value)


def test_functions_config_defaults_and_sections():
    config = FunctionsConfig.model_validate({
        "fcr": {"capacity_kw": 50, "frequency_source": "pv1"},
        "q_u": {"voltage_source": "meter1", "q_max_kvar": 20,
                "curve": [{"v_pu": 0.9, "q_pct": 100}, {"v_pu": 1.1, "q_pct": -100}]},
    })
    assert (config.fcr.deadband_mhz, config.fcr.full_deviation_mhz, config.fcr.nominal_hz) == (10, 200, 50)
    assert (config.fcr.full_activation_s, config.fcr.max_measurement_age_s) == (10, 6)
    assert (config.q_u.nominal_v, config.q_u.update_interval_s) == (230, 60)
    assert FunctionsConfig().fcr is None and FunctionsConfig().q_u is None


@pytest.mark.parametrize("overrides, message", [
    ({"capacity_kw": 0}, "must be > 0"),
    ({"deadband_mhz": 20}, "must be 0..10, got 20"),
    ({"deadband_mhz": 10, "full_deviation_mhz": 10}, "full_deviation_mhz (10) must be above deadband_mhz (10)"),
    ({"full_activation_s": 0}, "must be > 0 and at most 30, got 0"),
    ({"full_activation_s": 31}, "must be > 0 and at most 30, got 31"),
    ({"nominal_hz": 70}, "must be 45..65, got 70"),
    ({"full_activation_s": math.nan}, "finite"),
    ({"frequency_source": "no spaces"}, "frequency_source"),
    ({"deadband": 5}, "Extra inputs are not permitted"),
])
def test_fcr_config_errors(overrides, message):
    data = {"capacity_kw": 100, "frequency_source": "pv1"}
    data.update(overrides)
    assert message in problems(FcrConfig, data)


@pytest.mark.parametrize("curve, message", [
    ([{"v_pu": 0.9, "q_pct": 100}], "needs at least 2 points, got 1"),
    ([{"v_pu": 1.1, "q_pct": -100}, {"v_pu": 0.9, "q_pct": 100}],
     "points must be sorted by strictly increasing v_pu: point [1] (v_pu 0.9) is not above point [0] (v_pu 1.1)"),
    ([{"v_pu": 0.9, "q_pct": 100}, {"v_pu": 0.9, "q_pct": 0}], "strictly increasing v_pu"),
    ([{"v_pu": 0.9, "q_pct": 150}, {"v_pu": 1.1, "q_pct": 0}], "must be -100..100, got 150"),
    ([{"v_pu": 0.2, "q_pct": 100}, {"v_pu": 1.1, "q_pct": 0}], "must be 0.5..1.5, got 0.2"),
    ([{"v_pu": 0.9}, {"v_pu": 1.1, "q_pct": 0}], "curve.0.q_pct"),
])
def test_qu_curve_errors(curve, message):
    assert message in problems(QuConfig, {"voltage_source": "m1", "q_max_kvar": 10, "curve": curve})


def test_qu_config_errors():
    curve = [{"v_pu": 0.9, "q_pct": 100}, {"v_pu": 1.1, "q_pct": -100}]
    assert "must be > 0" in problems(QuConfig, {"voltage_source": "m1", "q_max_kvar": 0, "curve": curve})
    assert "must be 1..3600" in problems(QuConfig, {"voltage_source": "m1", "q_max_kvar": 5, "curve": curve,
                                                    "update_interval_s": 0.5})


def test_sources_must_be_measuring_assets():
    class Asset:
        def __init__(self, id, driver):
            self.id, self.driver = id, driver

    config = FunctionsConfig.model_validate({
        "fcr": {"capacity_kw": 50, "frequency_source": "pv1"},
        "q_u": {"voltage_source": "meter1", "q_max_kvar": 20,
                "curve": [{"v_pu": 0.9, "q_pct": 100}, {"v_pu": 1.1, "q_pct": -100}]},
    })
    config.check_sources([Asset("pv1", "sunspec"), Asset("meter1", "sunspec")])
    with pytest.raises(ValueError, match="functions.q_u.voltage_source: no asset 'meter1'"):
        config.check_sources([Asset("pv1", "sunspec")])
    with pytest.raises(ValueError, match=r"functions.fcr.frequency_source: asset 'pv1' \(driver ocpp\) does not measure"):
        config.check_sources([Asset("pv1", "ocpp"), Asset("meter1", "sunspec")])


# ==================================================== through the simulator

CYCLE_S = 0.2


async def until(predicate, timeout_s=3.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def driving(device, kind: str):
    """A real SunSpec driver polling ``device`` every CYCLE_S, until its first good reading."""
    asset = SunSpecAsset(id=f"{kind}{device.port}", kind=kind, driver="sunspec", host="127.0.0.1",
                         port=device.port, unit_id=device.unit_id, timeout_s=0.5)
    driver = create(asset, CYCLE_S, lambda *_: None)
    task = asyncio.create_task(driver.run())
    try:
        await until(lambda: driver.reading().online, what=f"{kind} online")
        yield driver
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 3)


@pytest.mark.parametrize("models", [None, (1, 701, 702, 704)], ids=["103", "701"])
async def test_fcr_reacts_to_a_frequency_step_in_the_inverter_simulator(models):
    async with simulated(DeviceSpec(kind="pv", sun_kw=5.0, models=models)) as sim:
        pv = sim.devices[0]
        async with driving(pv, "pv") as driver:
            config = fcr(capacity_kw=4.0, full_activation_s=5.0, frequency_source="pv1")
            droop = FcrDroop(config)  # on a clock of its own (t): the ramp is checked without waiting for it
            assert driver.reading().frequency_hz == pytest.approx(50.0)
            assert droop.update(driver.reading().frequency_hz, 0.0) == 0.0 and droop.measurement_ok

            pv.set_grid(frequency_hz=49.8)  # under-frequency: 200 mHz, the full deviation
            await until(lambda: driver.reading().frequency_hz == pytest.approx(49.8), what="49.8 Hz read")
            reading = driver.reading()
            fresh = FcrDroop(config)  # the controller's call: wall clock, measured at read_at
            fresh.update(reading.frequency_hz, time.time(), reading.read_at)
            assert fresh.measurement_ok and fresh.target_kw == pytest.approx(4.0)
            assert droop.update(reading.frequency_hz, 1.0) == pytest.approx(0.8)  # ramping at 4 kW / 5 s
            assert droop.update(reading.frequency_hz, 5.0) == pytest.approx(4.0)  # full upward within 5 s

            pv.set_grid(frequency_hz=50.1)  # over-frequency: half downward
            await until(lambda: driver.reading().frequency_hz == pytest.approx(50.1), what="50.1 Hz read")
            assert droop.update(driver.reading().frequency_hz, 15.0) == pytest.approx(-2.0)


@pytest.mark.parametrize("kind, models", [("meter", (1, 201)), ("meter", None), ("pv", (1, 701, 702, 704))],
                         ids=["201", "203", "701"])
async def test_qu_follows_a_voltage_step(kind, models):
    async with simulated(DeviceSpec(kind=kind, sun_kw=5.0, models=models)) as sim:
        device = sim.devices[0]
        async with driving(device, kind) as driver:
            droop = QuDroop(qu(update_interval_s=60.0))
            now = time.monotonic()
            assert driver.reading().voltage_v == pytest.approx(230.0)
            assert droop.update(driver.reading().voltage_v, now) == 0.0 and droop.measurement_ok

            device.set_grid(voltage_v=243.8)  # high voltage, 1.06 pu: absorb 60 %
            await until(lambda: driver.reading().voltage_v == pytest.approx(243.8), what="243.8 V read")
            assert droop.update(driver.reading().voltage_v, now + 30.0) == 0.0  # not before the interval
            assert droop.update(driver.reading().voltage_v, now + 60.0) == pytest.approx(-24.0)

            device.set_grid(voltage_v=0.90 * 230)  # low voltage: inject the full q_max
            await until(lambda: driver.reading().voltage_v == pytest.approx(207.0), what="207 V read")
            assert droop.update(driver.reading().voltage_v, now + 120.0) == pytest.approx(40.0)


async def test_reported_reactive_power_follows_a_704_varset():
    async with simulated(DeviceSpec(kind="pv", sun_kw=5.0)) as sim:
        pv = sim.devices[0]
        async with driving(pv, "pv") as driver:
            q_max = driver.reading().q_max_kvar
            assert q_max == pytest.approx(4.4)  # 0.44 x 10 kW in the simulator's nameplate
            driver.set_target_kvar(-3.0)  # what the controller would send for a Q(U) request
            await until(lambda: driver.reading().q_kvar == pytest.approx(-3.0, abs=0.05), what="-3 kvar read")
            assert pv.q_kvar == pytest.approx(-3.0)


# ================================================= Q(U) in the inverter (705)

VOLT_VAR_MODELS = (1, 103, 120, 121, 123, 701, 702, 704, 705)


async def test_volt_var_curve_written_adopted_and_followed_by_the_inverter(monkeypatch):
    """The driver writes a curve into 705, the simulated inverter adopts it and follows its own voltage."""
    import drivers.sunspec.driver as sunspec_driver
    from edge.asset import VoltVarCurve

    monkeypatch.setattr(sunspec_driver, "VOLT_VAR_RETRY_S", 0.3)
    async with simulated(DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=5.0, models=VOLT_VAR_MODELS,
                                    ramp_pct_per_s=0.0)) as sim:
        pv = sim.devices[0]
        events = []
        asset = SunSpecAsset(id="pv1", kind="pv", driver="sunspec", host="127.0.0.1", port=pv.port,
                             unit_id=pv.unit_id, timeout_s=0.5)
        driver = create(asset, CYCLE_S, lambda kind, asset_id, detail: events.append((kind, detail)))
        task = asyncio.create_task(driver.run())
        try:
            await until(lambda: driver.volt_var_available, what="705 discovered")
            curve = VoltVarCurve(((90.0, 40.0), (97.0, 0.0), (103.0, 0.0), (110.0, -40.0)), response_s=5.0)
            driver.set_volt_var(curve)
            await until(lambda: driver.volt_var_in_force, what="curve in force")
            state = pv.volt_var()
            assert state.enabled and state.points == curve.points and state.dept_ref == "VAR_MAX_PCT"
            assert any(kind == "volt_var_written" for kind, _ in events)
            assert not driver.reading().degraded

            pv.set_grid(voltage_v=1.065 * 230)  # 106.5 %: half way to 110 %, -20 % of VarMax (4.4 kvar)
            await until(lambda: driver.reading().q_kvar == pytest.approx(-0.88, abs=0.05), what="Q on the curve")

            # A restarted inverter forgets the function: the driver finds it off and writes it again.
            pv.image.set_raw(705, "Ena", 0)
            await until(lambda: pv.volt_var().enabled, timeout_s=3.0, what="curve restored")

            # A curve the device cannot hold: refused before anything is written, and reported.
            driver.set_volt_var(VoltVarCurve(tuple((90.0 + 4 * i, 0.0) for i in range(5))))
            await until(lambda: any(kind == "command_failed" and "at most 4" in detail["reason"]
                                    for kind, detail in events), what="refusal reported")
            assert driver.reading().degraded and "volt-var" in driver.reading().detail
            assert pv.volt_var().points == curve.points  # the curve in force is untouched

            driver.set_volt_var(None)
            await until(lambda: not pv.volt_var().enabled, what="curve switched off")
            await until(lambda: not driver.reading().degraded, what="no longer degraded")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 3)


async def test_volt_var_not_offered_without_705():
    async with simulated(DeviceSpec(kind="pv", sun_kw=5.0)) as sim:
        async with driving(sim.devices[0], "pv") as driver:
            assert not driver.volt_var_available
