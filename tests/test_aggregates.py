"""Interval aggregates (edge/control/aggregates.py): properties of the pure accumulator, and the two
spooled streams on the wire, through a broker outage, with a real Mosquitto."""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import asynccontextmanager
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.control.aggregates import Aggregator
from edge.uplink.messages import ConsumptionData, ValidationData
from edge.config.profile import Profile
from edge.uplink.spool import Spool
from edge.uplink.mqtt import Uplink

T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z: not on a minute boundary
CYCLE_S = 1.0  # telemetry cycle of the synthetic samples: gaps start beyond 3.5 s


def telemetry(site_kw, assets: dict | None = None, *, baseline_kw=None, activation_kw=0.0, cycle_s=CYCLE_S) -> dict:
    """A telemetry message as the controller builds it, with only what the aggregator reads."""
    return {
        "ts": "ignored: at_s is given",
        "site_id": "demo",
        "cycle_s": cycle_s,
        "site": {"p_kw": site_kw, "baseline_kw": baseline_kw, "activation_kw": activation_kw},
        "assets": {
            asset_id: {"kind": "bess", "p_kw": p_kw, "baseline_kw": p_kw, "activation_kw": 0.0}
            for asset_id, p_kw in (assets or {}).items()
        },
    }


def epoch_s(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def feed(aggregator: Aggregator, samples, **add) -> list[tuple[str, dict]]:
    """``samples``: (at_s, site_kw); returns every message, the open intervals flushed at the end."""
    out: list[tuple[str, dict]] = []
    for at_s, site_kw in samples:
        out += aggregator.add(telemetry(site_kw), at_s=at_s, **add)
    return out + aggregator.flush(samples[-1][0] if samples else T0)


def of(messages, stream: str) -> list[dict]:
    return [payload for name, payload in messages if name == stream]


def reference_energies_kwh(samples) -> tuple[float, float]:
    """(export, import) of the piecewise-linear power, by dense midpoint sums: independent of the code's triangles."""
    export = imported = 0.0
    steps = 400
    for (t0, p0), (t1, p1) in zip(samples, samples[1:]):
        for i in range(steps):
            p = p0 + (p1 - p0) * (i + 0.5) / steps
            export += max(p, 0) * (t1 - t0) / steps
            imported += max(-p, 0) * (t1 - t0) / steps
    return export / 3600, imported / 3600


def coverage_rounding_s(interval_s: float, messages: int) -> float:
    """coverage_pct has 2 decimals: up to 0.005 % of the interval per message."""
    return 0.005 / 100 * interval_s * messages + 1e-6


spacings_s = st.floats(0.05, 3.4)  # within the gap limit of 3.5 cycles
powers_kw = st.floats(-200, 200, allow_nan=False)
series = st.lists(st.tuples(spacings_s, powers_kw), min_size=2, max_size=80)


def timeline(start_offset_s: float, steps) -> list[tuple[float, float]]:
    at_s, samples = T0 + start_offset_s, []
    for spacing_s, power_kw in steps:
        at_s += spacing_s
        samples.append((at_s, power_kw))
    return samples


# ------------------------------------------------------------------ properties


@settings(max_examples=150, deadline=None)
@given(st.floats(0, 60), series, st.sampled_from([(2.0, 4.0), (5.0, 60.0), (60.0, 900.0)]))
def test_energy_is_the_integral_of_the_samples_split_exactly_at_the_boundaries(offset_s, steps, intervals):
    samples = timeline(offset_s, steps)
    messages = feed(Aggregator("demo", *intervals), samples)
    expected_export, expected_import = reference_energies_kwh(samples)
    span_s = samples[-1][0] - samples[0][0]
    for stream, interval_s in zip(("consumption", "validation"), intervals):
        site = [m["site"] for m in of(messages, stream)]
        export = sum(s["energy_export_kwh"] or 0 for s in site)
        imported = sum(s["energy_import_kwh"] or 0 for s in site)
        rounding = 1e-6 * len(site)  # kWh are rounded to 6 decimals per message
        assert export == pytest.approx(expected_export, rel=1e-3, abs=1e-5 + rounding)
        assert imported == pytest.approx(expected_import, rel=1e-3, abs=1e-5 + rounding)
        net_kwh = sum((p0 + p1) / 2 * (t1 - t0) for (t0, p0), (t1, p1) in zip(samples, samples[1:])) / 3600
        assert export - imported == pytest.approx(net_kwh, rel=1e-6, abs=1e-5 + rounding)
        # without gaps, the intervals cover exactly the span of the samples
        covered_s = sum(s["coverage_pct"] / 100 * interval_s for s in site)
        assert covered_s == pytest.approx(span_s, abs=coverage_rounding_s(interval_s, len(site)))


@settings(max_examples=150, deadline=None)
@given(st.floats(0, 60), series)
def test_means_lie_within_min_and_max_and_match_the_energy(offset_s, steps):
    for stream, payload in feed(Aggregator("demo", 2.0, 4.0), timeline(offset_s, steps)):
        site = payload["site"]
        if site["p_mean_kw"] is None:
            continue
        assert site["p_min_kw"] - 1e-3 <= site["p_mean_kw"] <= site["p_max_kw"] + 1e-3
        covered_h = site["coverage_pct"] / 100 * payload["interval_s"] / 3600
        net_kwh = site["energy_export_kwh"] - site["energy_import_kwh"]
        # the mean times the covered time is the net energy, up to the rounding of each:
        # kWh to 6 decimals, kW to 3, coverage to 0.005 % (times at most 200 kW)
        rounding_kwh = 2e-6 + 5e-4 * covered_h + 200 * coverage_rounding_s(payload["interval_s"], 1) / 3600
        assert site["p_mean_kw"] * covered_h == pytest.approx(net_kwh, abs=rounding_kwh)


@settings(max_examples=100, deadline=None)
@given(st.floats(0, 3600), series, st.sampled_from([(60.0, 900.0), (2.0, 4.0), (0.5, 30.0)]))
def test_intervals_are_aligned_contiguous_and_hold_their_samples(offset_s, steps, intervals):
    samples = timeline(offset_s, steps)
    messages = feed(Aggregator("demo", *intervals), samples)
    for stream, interval_s in zip(("consumption", "validation"), intervals):
        payloads = of(messages, stream)
        starts = [epoch_s(p["interval_start"]) for p in payloads]
        for payload, start in zip(payloads, starts):
            assert payload["interval_s"] == interval_s
            assert start % interval_s == 0  # whole minutes / quarter hours since the epoch: UTC-aligned
            assert epoch_s(payload["interval_end"]) - start == interval_s
            inside = sum(start <= at_s < start + interval_s for at_s, _ in samples)
            assert payload["site"]["samples"] == inside
        # no gap in the samples: one message per interval touched, in order
        assert all(b - a == interval_s for a, b in zip(starts, starts[1:]))
        assert starts[0] == math.floor(samples[0][0] / interval_s) * interval_s
        assert payloads[0]["partial"] and payloads[-1]["partial"]  # started, then flushed
        assert not any(p["partial"] for p in payloads[1:-1])


@settings(max_examples=100, deadline=None)
@given(series, st.integers(1, 40), st.integers(1, 40))
def test_an_offline_asset_lowers_its_coverage_by_the_gap_and_nothing_else(steps, gap_from, gap_length):
    samples = timeline(0, steps)
    aggregator = Aggregator("demo", 60.0, 900.0)
    offline = set(range(gap_from, gap_from + gap_length))
    messages = []
    for index, (at_s, power_kw) in enumerate(samples):
        asset_kw = None if index in offline else power_kw
        messages += aggregator.add(telemetry(power_kw, {"b1": asset_kw, "b2": power_kw}), at_s=at_s)
    messages += aggregator.flush(samples[-1][0])
    valid = [index for index in range(len(samples)) if index not in offline]
    # b1 is covered only between two consecutive samples where it was online
    covered_s = sum(samples[b][0] - samples[a][0] for a, b in zip(valid, valid[1:]) if b == a + 1)
    lost_s = samples[-1][0] - samples[0][0] - covered_s
    for stream in ("consumption", "validation"):
        b1 = [m["assets"]["b1"] for m in of(messages, stream)]
        b2 = [m["assets"]["b2"] for m in of(messages, stream)]
        interval_s = of(messages, stream)[0]["interval_s"]
        rounding_s = coverage_rounding_s(interval_s, len(b1))
        assert sum(a["coverage_pct"] for a in b1) / 100 * interval_s == pytest.approx(covered_s, abs=rounding_s)
        # the gap shows as exactly the coverage b1 lacks beside b2, online all along
        b1_lacks_s = sum(a["coverage_pct"] - b["coverage_pct"] for a, b in zip(b2, b1)) / 100 * interval_s
        assert b1_lacks_s == pytest.approx(lost_s, abs=2 * rounding_s)
        assert sum(a["samples"] for a in b1) == len(valid)
        assert sum(a["samples_missing"] for a in b1) == len(samples) - len(valid)
        assert sum(a["samples_missing"] for a in b2) == 0


# ------------------------------------------------------------------ examples


def test_export_and_import_are_integrated_separately_across_a_zero_crossing():
    # 10 kW export falling linearly to 10 kW import over 60 s, within one minute
    start = math.ceil(T0 / 60) * 60
    messages = feed(Aggregator("demo"), [(start + 1, 10.0), (start + 3, -10.0)])
    [minute] = of(messages, "consumption")
    # two triangles of 1 s x 10 kW / 2 each: 5 kWs
    assert minute["site"]["energy_export_kwh"] == pytest.approx(5 / 3600, abs=1e-6)
    assert minute["site"]["energy_import_kwh"] == pytest.approx(5 / 3600, abs=1e-6)
    assert minute["site"]["p_mean_kw"] == pytest.approx(0.0, abs=1e-3)
    assert (minute["site"]["p_min_kw"], minute["site"]["p_max_kw"]) == (pytest.approx(-10.0, abs=1e-3), 10.0)


def test_non_finite_and_missing_values_are_skipped_and_counted():
    start = math.ceil(T0 / 60) * 60
    aggregator = Aggregator("demo")
    values = [5.0, float("nan"), 5.0, None, 5.0, float("inf"), "7", True, 5.0, 5.0]
    for second, value in enumerate(values):
        aggregator.add(telemetry(value), at_s=start + second)
    [(_, minute)] = [m for m in aggregator.add(telemetry(5.0), at_s=start + 60) if m[0] == "consumption"]
    site = minute["site"]
    assert (site["samples"], site["samples_missing"]) == (5, 5)
    assert site["p_mean_kw"] == 5.0 and site["p_max_kw"] == 5.0
    # covered: only 8-9 s, where two valid samples follow each other; 9-60 s is a gap of 51 s
    assert site["coverage_pct"] == pytest.approx(1 / 60 * 100, abs=0.01)
    ConsumptionData.model_validate({"seq": 1, **minute})


def test_a_restart_and_a_stop_give_partial_intervals_that_add_up():
    start = math.ceil(T0 / 900) * 900
    before = Aggregator("demo")
    first = feed(before, [(start + 100 + s, 3.0) for s in range(0, 200, 2)])  # stopped 300 s into the quarter
    after = Aggregator("demo")  # the restarted daemon
    second = feed(after, [(start + 400 + s, 3.0) for s in range(0, 500, 2)])  # stopped again just before its end
    quarters = of(first, "validation") + of(second, "validation")
    same = [q for q in quarters if q["interval_start"] == quarters[0]["interval_start"]]
    assert len(same) == 2 and all(q["partial"] for q in same)
    assert sum(q["site"]["coverage_pct"] for q in same) == pytest.approx((198 + 498) / 900 * 100, abs=0.02)
    assert sum(q["site"]["energy_export_kwh"] for q in same) == pytest.approx(3.0 * (198 + 498) / 3600, abs=1e-5)


def test_a_forward_clock_step_closes_what_it_can_and_marks_it():
    start = math.ceil(T0 / 60) * 60
    aggregator = Aggregator("demo")
    messages = []
    for second in range(0, 30):
        messages += aggregator.add(telemetry(2.0), at_s=start + second, mono_s=1000.0 + second)
    # NTP steps the clock 10 minutes forward between two cycles 1 s apart
    for second in range(30, 100):
        messages += aggregator.add(telemetry(2.0), at_s=start + 600 + second, mono_s=1000.0 + second)
    minutes = of(messages, "consumption")
    assert epoch_s(minutes[0]["interval_start"]) == start and minutes[0]["partial"]  # closed at the step
    assert minutes[0]["site"]["coverage_pct"] == pytest.approx(29 / 60 * 100, abs=0.01)
    assert epoch_s(minutes[1]["interval_start"]) == start + 600 and minutes[1]["partial"]  # reopened after it
    assert len(minutes) == 2  # the 9 minutes skipped have no samples: not reported
    assert minutes[1]["site"]["energy_export_kwh"] == pytest.approx(2.0 * 30 / 3600, abs=1e-6)  # 630..660 s


def test_a_small_clock_step_within_an_interval_only_drops_that_segment():
    start = math.ceil(T0 / 60) * 60
    aggregator = Aggregator("demo")
    aggregator.add(telemetry(1.0), at_s=start - 1, mono_s=-1.0)  # the minute is observed from its start
    messages = []
    for second in range(0, 59):
        step_s = 2.0 if second >= 30 else 0.0  # the clock steps 2 s forward at 30 s, within the minute
        messages += aggregator.add(telemetry(1.0), at_s=start + second + step_s, mono_s=float(second))
    [minute] = [p for p in of(messages, "consumption") if epoch_s(p["interval_start"]) == start]
    # 0-29 s and 32-60 s (the last sample, at 60 s, closes it): the segment across the step is not integrated
    assert not minute["partial"] and minute["site"]["coverage_pct"] == pytest.approx(57 / 60 * 100, abs=0.01)


def test_a_backward_clock_step_reopens_the_interval_rather_than_double_counting():
    start = math.ceil(T0 / 60) * 60
    aggregator = Aggregator("demo")
    messages = []
    for second in range(0, 40):
        messages += aggregator.add(telemetry(1.0), at_s=start + second, mono_s=float(second))
    for second in range(40, 80):  # stepped back 30 s: times 10..49 s again
        messages += aggregator.add(telemetry(1.0), at_s=start + second - 30, mono_s=float(second))
    messages += aggregator.flush(start + 50)
    minutes = of(messages, "consumption")
    assert [m["interval_start"] for m in minutes] == [minutes[0]["interval_start"]] * 2
    assert all(m["partial"] and m["site"]["coverage_pct"] <= 100 for m in minutes)
    assert sum(m["site"]["coverage_pct"] for m in minutes) == pytest.approx((39 + 39) / 60 * 100, abs=0.02)


def test_a_stall_longer_than_the_gap_limit_is_a_gap():
    start = math.ceil(T0 / 60) * 60
    samples = [(start + s, 4.0) for s in range(0, 20)] + [(start + s, 4.0) for s in range(25, 70)]  # 5 s stall
    [minute, *_] = of(feed(Aggregator("demo"), samples), "consumption")
    assert minute["site"]["coverage_pct"] == pytest.approx((19 + 35) / 60 * 100, abs=0.01)
    assert minute["site"]["energy_export_kwh"] == pytest.approx(4.0 * 54 / 3600, abs=1e-6)


def test_validation_carries_baseline_activation_and_voltage_and_validates():
    start = math.ceil(T0 / 900) * 900
    aggregator = Aggregator("demo")
    messages = []
    for second in range(-2, 903, 2):  # from the quarter before, so that this one is whole
        voltage = 231.0 if second < 450 else None  # the meter goes quiet half-way
        messages += aggregator.add(
            telemetry(-4.0, {"b1": -4.0}, baseline_kw=-2.0, activation_kw=-2.0), voltage, {"b1": 229.0}, at_s=start + second
        )
    [quarter] = [p for p in of(messages, "validation") if epoch_s(p["interval_start"]) == start]
    site = quarter["site"]
    assert (site["baseline_mean_kw"], site["activation_mean_kw"], site["p_mean_kw"]) == (-2.0, -2.0, -4.0)
    assert site["energy_import_kwh"] == pytest.approx(1.0, abs=1e-6) and site["energy_export_kwh"] == 0.0
    assert site["voltage_mean_v"] == 231.0 and site["voltage_coverage_pct"] == pytest.approx(448 / 900 * 100, abs=0.01)
    assert quarter["assets"]["b1"]["voltage_mean_v"] == 229.0 and quarter["assets"]["b1"]["kind"] == "bess"
    assert not quarter["partial"] and site["coverage_pct"] == 100.0
    ValidationData.model_validate({"seq": 1, **quarter})
    assert "voltage_mean_v" not in of(messages, "consumption")[0]["site"]


def test_intervals_must_divide_a_day():
    for bad in (0, -60, 7, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="divide a day"):
            Aggregator("demo", consumption_interval_s=bad)


# ------------------------------------------------------------------ uplink: seq per stream


async def test_each_aggregate_stream_has_its_own_seq_that_survives_a_restart(tmp_path):
    profile = Profile.model_validate({"site": {"id": "demo"}, "uplink": {"mqtt": {"host": "127.0.0.1", "port": 1}}})
    path = tmp_path / "spool.sqlite"
    for run in range(2):  # the second run is the restarted daemon: never connected, spooling only
        spool = Spool(path, 1024 * 1024)
        uplink = Uplink(profile, spool, lambda payload: None, {"state": "online", "site_id": "demo"})
        assert await uplink.publish("consumption", {"n": 1}) == 2 * run + 1
        assert await uplink.publish("consumption", {"n": 2}) == 2 * run + 2
        assert await uplink.publish("validation", {"n": 1}) == run + 1
        assert await uplink.publish("telemetry", {"n": 1}) == run + 1
        await uplink.close()
        spool.close()
    spool = Spool(path, 1024 * 1024)
    topics = [m.topic for m in spool.oldest(100)]
    spool.close()
    assert topics.count("flexedge/demo/consumption") == 4 and topics.count("flexedge/demo/validation") == 2


# ------------------------------------------------------------------ on the wire


@asynccontextmanager
async def gateway_with_short_intervals(profile: Profile, intervals_s: tuple[float, float]):
    from edge.runtime.daemon import Gateway

    stop = asyncio.Event()
    gateway = Gateway(profile, aggregate_intervals_s=intervals_s)
    task = asyncio.create_task(gateway.run(stop))
    try:
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_consumption_and_validation_arrive_on_their_topics_through_a_broker_outage(tmp_path):
    from test_gateway import SITE, make_profile, until
    from test_uplink import PERSISTENT, Recorder, broker

    from simulators.sunspec import DeviceSpec, SunSpecSimulator

    # A persistent broker keeps the VPP's subscription across the outage, so what the
    # gateway sends from its spool on reconnecting cannot slip past the subscriber.
    mqtt = broker(tmp_path, "broker", PERSISTENT)
    mqtt.start()
    vpp = None
    try:
        vpp = Recorder(mqtt.port, f"flexedge/{SITE}/#", client_id="vpp", clean=False)
        specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=6.0), DeviceSpec(kind="storage", rated_kw=5.0)]
        async with SunSpecSimulator(specs) as sim:
            profile = make_profile(tmp_path, mqtt.port, sim.devices, cycle_s=0.5)
            async with gateway_with_short_intervals(profile, (2.0, 4.0)) as gateway:
                await until(lambda: len(vpp.payloads("consumption", SITE)) >= 2, 8, "live consumption messages")
                mqtt.stop()
                outage_from = time.time()
                await until(lambda: not gateway.uplink.connected, 3, "the gateway to notice the outage")
                await asyncio.sleep(2.2)  # at least one consumption interval closes while offline
                outage_to = time.time()
                mqtt.start()

                def complete(stream: str, count: int):
                    seqs = sorted({p["seq"] for p in vpp.payloads(stream, SITE)})
                    return len(seqs) >= count and seqs == list(range(1, seqs[-1] + 1))

                await until(lambda: complete("consumption", 5) and complete("validation", 2), 8,
                            "every consumption and validation message since the start", interval_s=0.1)
        consumption = vpp.payloads("consumption", SITE)
        validation = vpp.payloads("validation", SITE)
    finally:
        if vpp is not None:
            vpp.stop()
        mqtt.stop()

    for stream, model, payloads, interval_s in (("consumption", ConsumptionData, consumption, 2.0),
                                                 ("validation", ValidationData, validation, 4.0)):
        by_seq = {}
        for payload in payloads:
            model.model_validate(payload)
            by_seq.setdefault(payload["seq"], payload)
        ordered = [by_seq[seq] for seq in sorted(by_seq)]
        starts = [epoch_s(p["interval_start"]) for p in ordered]
        assert all(start % interval_s == 0 for start in starts), stream
        assert starts == sorted(starts) and len(set(starts)) == len(starts), f"{stream}: one message per interval"
        assert ordered[0]["partial"], f"{stream}: the first interval began before the gateway"
        full = [p for p in ordered[1:] if not p["partial"]]
        assert full and all(p["assets"]["pv0"]["coverage_pct"] > 90 for p in full), stream
        assert all(p["assets"]["pv0"]["p_mean_kw"] == pytest.approx(6.0, abs=0.2) for p in full), stream
        assert all(p["assets"]["pv0"]["energy_export_kwh"] > 0 for p in full), stream
    # what closed while the broker was away arrived afterwards, from the spool
    assert any(outage_from < epoch_s(p["ts"]) < outage_to for p in consumption)
