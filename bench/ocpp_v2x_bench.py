"""Benchmark: 200 OCPP chargers, a third of them OCPP 2.1 bidirectional, under an aFRR-like trace (issue #13).

    python bench/ocpp_v2x_bench.py                      # 200 chargers, a setpoint every 2 s for 120 s
    python bench/ocpp_v2x_bench.py --setpoint-interval-s 1 --json v2x-1s.json
    python bench/ocpp_v2x_bench.py --v2x-share 0        # 1.6 and 2.0.1 only

Three kinds of process, as on a site: the gateway (`flexedge run` on a
generated profile with an `ocpp:` server and --chargers `driver: ocpp`
chargers, so its CPU and memory are its own), the simulated stations
(bench/ocpp_v2x_sim_host.py, over --sim-processes processes), and this one,
which runs a private Mosquitto and the VPP.

The chargers (every one 16 A x 3 = 11.04 kW, every EV plugged in the whole run):

* --v2x-share of them (default a third) OCPP 2.1 with a bidirectional EV that
  announces its charging needs at plug-in (ISO 15118 NotifyEVChargingNeeds):
  60 kWh, state of charge 50-60 %, minimum 20 %, 80 % wanted by a departure
  4-8 h ahead, 11.5 kW either way (the charger's 11.04 kW is the limit);
* the rest alternately OCPP 1.6J and 2.0.1, with unidirectional EVs (60 kWh,
  SoC 30-50 %, 11.5 kW), half of them "in a hurry" (the driver's preferences:
  30 kWh within the hour, more than the hour allows, so their plan charges at
  the maximum now) and half "idle" (the profile's default need, 20 kWh within
  8 h).

Smart charging is on (`ev_charging`), and the VPP publishes a tariff that is
dear for the next two hours and cheap after: every plan but the hurried ones
charges later, so the chargers' baselines (`ev_plan`) are 0 for the V2X and
idle EVs and -11.04 kW for the hurried ones.  Upward activations therefore
make the V2X EVs discharge and the hurried ones charge less; downward ones
make the V2X and idle EVs charge.  The bench waits until every charger is
online and at its planned power before the trace starts.

The trace (bench/site_bench.py's `afrr_trace`, seeded by --seed, so that runs
are comparable): at 2 s resolution, a random walk reverting to 0 with a step
to a random level about once a minute, each sample at least --min-step-pct of
the band from the last, bounded by 60 % of the site's upward band and 80 % of
its downward band (as telemetry states them when the trace starts); sent as a
setpoint every --setpoint-interval-s (linear between the 2 s samples at 1 s),
half a cycle after the gateway's tick, for --duration-s.

Figures (printed; all of them as one JSON line with --json, or to --json FILE):

* setpoint -> acknowledged profile: per setpoint, from the VPP's publish call to
  each station's answer to its first SetChargingProfile after it that changes
  its target (before the next setpoint; the station's time.monotonic(), one
  clock for every process on Linux; a profile that repeats the target is a
  plan's refresh and does not count), the first, each and the last; p50 / p99
  / max, for all the chargers and per OCPP version.  The issue's bar: the
  last, p99 < 1 s.
* tracking, per setpoint: the site's power measured by the simulators (the sum
  of every station's power, sampled every 0.1 s, taken just before the next
  setpoint) against the site's `setpoint_kw` in the first telemetry that
  carries this setpoint (baseline + the activation allocated); also against
  baseline + the activation requested.  |error| in kW, as % of the mean
  requested activation and of the band; mean, p95, max; the share of
  setpoints within the project's tracking tolerance (0.5 kW + 5 % of the
  activation, docs/dispatch.md) one cycle after the setpoint; and the time to
  get within it.  Beside it, what the VPP sees: the site's p_kw in the
  telemetry of the next setpoint (the chargers' MeterValues) against the same
  setpoint_kw.
* the V2X EVs: the lowest state of charge any of them reached against its
  minimum, and the energy they charged and discharged during the trace.
* the gateway's CPU (% of one core) and RSS, cycle duration and lateness,
  event-loop lag (telemetry's `gateway` block), the simulators' CPU, VM steal.

Loopback only; bounded in time: every wait has a deadline and the simulators
stop on their own.  BENCH_KEEP=1 keeps the work directory (profile, trace,
daemon log, the stations' records, telemetry, the tracking per setpoint); a
run that fails keeps it too and names it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import cpu_seconds, free_port, rss_mb, start_mosquitto, steal_s  # noqa: E402
from bench.iec104_bench import machine_busy_s, stop_process  # noqa: E402
from bench.ocpp_bench import raise_open_files_limit, site_profile, wait_for  # noqa: E402
from bench.site_bench import (  # noqa: E402
    TRACE_DT_S, TimedVpp, abs_error, afrr_trace, command_latencies, ready, resample, spawn, stats, write_trace)
from simulators.vpp import TracePattern  # noqa: E402

CHARGER_MAX_A = 16.0
CHARGER_KW = CHARGER_MAX_A * 230.0 * 3 / 1000  # 11.04
EV_MAX_KW = 11.5  # above the charger's rating: the charger's limit is what the EV draws
EV_CAPACITY_KWH = 60.0
V2X_MIN_SOC_PCT = 20.0
V2X_TARGET_SOC_PCT = 80.0
HURRY_ENERGY_KWH, HURRY_DEPARTURE_S = 30.0, 3600.0  # more than an hour at 11 kW: the plan charges at the maximum
DEAR_SLOTS, TARIFF_SLOTS = 8, 48  # quarter hours: the next 2 h dear, the 10 h after cheap
DEAR_PER_KWH, CHEAP_PER_KWH = 0.40, 0.10
READY_TIMEOUT_S = 150.0  # connection storm of N stations, then plug-in
SETTLE_TIMEOUT_S = 90.0  # plans made, sent and metered
TOLERANCE_KW, TOLERANCE_SHARE = 0.5, 0.05  # docs/dispatch.md, "Tracking"
PHASE_VOLTS = 230.0 * 3  # W per A of a limit in A (every charger here is three-phase, 230 V)
CHANGE_KW = 0.1  # a smaller change of a station's target is a rounding step, not a command (deadband 0.2 kW)


# -- the site ------------------------------------------------------------------------


def charger_plan(count: int, v2x_share: float) -> list[dict]:
    """The chargers: V2X spread evenly through the list; the rest alternately 1.6 and 2.0.1,
    each version alternately hurried and idle."""
    v2x = round(count * v2x_share)
    chargers, unidirectional = [], 0
    for i in range(count):
        if v2x and (i + 1) * v2x // count > i * v2x // count:
            version, group = "2.1", "v2x"
        else:
            version = "1.6" if unidirectional % 2 == 0 else "2.0.1"
            group = "hurry" if unidirectional // 2 % 2 == 0 else "idle"
            unidirectional += 1
        chargers.append({"asset_id": f"ev{i:03d}", "cp_id": f"CP{i:03d}", "version": version, "group": group})
    return chargers


def asset_entry(charger: dict) -> dict:
    entry = {"id": charger["asset_id"], "kind": "ev_charger", "driver": "ocpp", "charge_point_id": charger["cp_id"],
             "ocpp_version": charger["version"], "max_current_a": CHARGER_MAX_A}
    if charger["group"] == "v2x":
        # Said in the profile rather than learned from the device model at each connection; the
        # stations do not run their own aFRR loop (AFRRSignal): the gateway sends setpoints.
        entry["v2x"] = {"bidirectional": True, "afrr_signal": False}
    return entry


def profile_for(chargers: list[dict], broker_port: int, ocpp_port: int, cycle_s: float, setpoint_interval_s: float,
                workdir: Path) -> dict:
    # The gateway's floor for discharging (default 30 %) at the cars' own minimum.
    ev_charging = {"v2x_min_soc_pct": V2X_MIN_SOC_PCT} if any(c["group"] == "v2x" for c in chargers) else {}
    return site_profile(broker_port, ocpp_port, cycle_s, setpoint_interval_s, workdir,
                        [asset_entry(c) for c in chargers], ev_charging=ev_charging)


def station_entries(chargers: list[dict], seed: int, meter_interval_s: float, tick_s: float, now_s: float) -> list[dict]:
    """What each simulated station and its EV are (bench/ocpp_v2x_sim_host.py's --stations-file)."""
    rng = random.Random(seed)
    entries = []
    for n, charger in enumerate(chargers):
        station = {"charge_point_id": charger["cp_id"], "ocpp_version": charger["version"],
                   "max_current_a": CHARGER_MAX_A, "meter_interval_s": meter_interval_s, "tick_s": tick_s,
                   "reconnect_cap_s": 5.0}
        ev = {"id_tag": f"BENCH{n:03d}", "capacity_kwh": EV_CAPACITY_KWH, "max_power_kw": EV_MAX_KW}
        if charger["group"] == "v2x":
            station["bidirectional"] = True
            ev |= {"soc_pct": round(rng.uniform(50.0, 60.0), 1), "target_soc_pct": V2X_TARGET_SOC_PCT,
                   "bidirectional": True, "min_soc_pct": V2X_MIN_SOC_PCT, "max_discharge_kw": EV_MAX_KW,
                   "departure_s": round(now_s + rng.uniform(4.0, 8.0) * 3600)}
        else:
            ev["soc_pct"] = round(rng.uniform(30.0, 50.0), 1)
        entries.append({"station": station, "ev": ev})
    return entries


def spread_over_processes(chargers: list[dict], processes: int) -> list[int]:
    """The simulator process of each charger: each version dealt round the processes on its own, so that
    every process gets its share of each (a 2.1 profile costs a station several times a 1.6 one)."""
    dealt: dict[str, int] = {}
    process_of = []
    for charger in chargers:
        version = charger["version"]
        start = {"1.6": 0, "2.0.1": 1, "2.1": 2}[version]
        process_of.append((start + dealt.get(version, 0)) % processes)
        dealt[version] = dealt.get(version, 0) + 1
    return process_of


def at_plan(charger: dict, asset: dict | None) -> bool:
    """Online, on its smart-charging plan, and metered at the power the plan gives its group."""
    if asset is None or not asset.get("online") or asset.get("p_kw") is None:
        return False
    if asset.get("baseline_method") != "ev_plan":
        return False
    if charger["group"] == "hurry":
        return asset["p_kw"] <= -0.95 * CHARGER_KW
    return abs(asset["p_kw"]) <= 0.3


# -- figures ----------------------------------------------------------------------------


class SitePower:
    """The site's power measured by the simulators (kW, + export), at any time, from their samples."""

    def __init__(self, sample_lists: list[list[list[float]]]):
        self.series = [sorted(samples) for samples in sample_lists if samples]
        self.times = [[s[0] for s in series] for series in self.series]

    def _latest(self, k: int, t_s: float) -> list[float] | None:
        import bisect

        i = bisect.bisect_right(self.times[k], t_s) - 1
        return self.series[k][i] if i >= 0 else None

    def kw_at(self, t_s: float) -> float | None:
        """Sum over the processes of each one's latest sample at or before t_s; None before the first."""
        total_w = 0.0
        for k in range(len(self.series)):
            sample = self._latest(k, t_s)
            if sample is None:
                return None
            total_w += sample[1]
        return -total_w / 1000.0  # the stations meter charging positive; the site's sign is export positive

    def first_within(self, start_s: float, end_s: float, target_kw: float, tolerance_kw: float) -> float | None:
        """The first sample time in [start_s, end_s] when the site is within tolerance of the target."""
        times = sorted({t for series in self.times for t in series if start_s <= t <= end_s})
        for t in times:
            value = self.kw_at(t)
            if value is not None and abs(value - target_kw) <= tolerance_kw:
                return t
        return None

    def energy_kwh(self, column: int, start_s: float, end_s: float) -> float:
        """Integral of a sampled power column (W) over [start_s, end_s], summed over the processes, in kWh."""
        total_ws = 0.0
        for series in self.series:
            inside = [s for s in series if start_s <= s[0] <= end_s]
            for a, b in zip(inside, inside[1:]):
                total_ws += a[column] * (b[0] - a[0])
        return total_ws / 3.6e6


def target_changes(rows: list[list], from_s: float) -> tuple[dict[str, list[float]], dict[str, int], int]:
    """When each station's target changed, from `from_s` on: (times per charge point, profiles by kind, profiles
    that repeated the target).  A profile that repeats the station's last target (the limit, or a V2X
    setpoint, of the period in force) is the refresh of a plan's profile (its first period holds for
    `plan_hold_s` and is sent again before half of it), not a command; so is one that moves it by less than
    CHANGE_KW, a rounding step (0.1 A is 69 W here): the driver sends no new target within its 0.2 kW
    deadband."""
    receipts: dict[str, list[float]] = {}
    kinds: dict[str, int] = {}
    last: dict[str, tuple] = {}
    repeats = 0

    def kw(value: float | None, unit: str) -> float | None:
        return None if value is None else value * (PHASE_VOLTS / 1000 if unit == "A" else 0.001)

    for cp_id, t_s, limit, unit, purpose, _stack, periods, setpoint, mode, _accepted in sorted(rows, key=lambda r: r[1]):
        if "Max" in purpose:  # the failsafe, set at each connection
            continue
        target = (mode, kw(limit, unit), kw(setpoint, unit))
        before = last.get(cp_id)
        changed = before is None or before[0] != target[0] or any(
            (a is None) != (b is None) or (a is not None and abs(a - b) >= CHANGE_KW)
            for a, b in zip(before[1:], target[1:]))
        if changed:
            last[cp_id] = target
        if t_s < from_s:
            continue
        key = f"{purpose}{' ' + mode if mode else ''} in {unit}, {'one period' if periods == 1 else 'several periods'}"
        kinds[key] = kinds.get(key, 0) + 1
        if changed:
            receipts.setdefault(cp_id, []).append(t_s)
        else:
            repeats += 1
    return receipts, kinds, repeats


def tracking_per_setpoint(sends: list[tuple[float, float]], sent: list[dict], telemetry: list[dict],
                          power: SitePower, interval_s: float, cycle_s: float, band_kw: float) -> dict:
    """Per setpoint: the measured site power just before the next setpoint against the site's
    setpoint_kw (and baseline + requested activation) of the first telemetry carrying it."""
    first_telemetry: dict[str, dict] = {}
    for message in telemetry:
        first_telemetry.setdefault(message.get("setpoint_id"), message)
    errors, errors_requested, errors_telemetry, requested_abs = [], [], [], []
    reached, to_reach, missing, limited, rows = 0, [], 0, {}, []
    for k, ((sent_at, activation_kw), payload) in enumerate(zip(sends, sent)):
        message = first_telemetry.get(payload["id"])
        site = message["site"] if message else {}
        target, baseline = site.get("setpoint_kw"), site.get("baseline_kw")
        requested = site.get("activation_requested_kw", activation_kw)
        if target is None or baseline is None:
            missing += 1
            continue
        until = sends[k + 1][0] if k + 1 < len(sends) else sent_at + interval_s
        measured = power.kw_at(until - 1e-3)
        if measured is None:
            missing += 1
            continue
        tolerance = TOLERANCE_KW + TOLERANCE_SHARE * abs(requested)
        errors.append(measured - target)
        # What the VPP sees: the site's p_kw in the telemetry of the next setpoint (the chargers' MeterValues,
        # up to a meter interval old), against this setpoint's target.
        following = first_telemetry.get(sent[k + 1]["id"]) if k + 1 < len(sent) else None
        if following is not None and following["site"].get("p_kw") is not None:
            errors_telemetry.append(following["site"]["p_kw"] - target)
        errors_requested.append(measured - (baseline + requested))
        requested_abs.append(abs(requested))
        at_one_cycle = power.kw_at(sent_at + cycle_s)
        if at_one_cycle is not None and abs(at_one_cycle - target) <= tolerance:
            reached += 1
        first = power.first_within(sent_at, until, target, tolerance)
        if first is not None:
            to_reach.append(first - sent_at)
        rows.append({"id": payload["id"], "sent_mono": sent_at, "activation_kw": activation_kw, "requested_kw": requested,
                     "baseline_kw": baseline, "setpoint_kw": target, "measured_kw_one_cycle_after": at_one_cycle,
                     "measured_kw_before_next": measured,
                     "within_after_s": None if first is None else round(first - sent_at, 3),
                     "limited_by": site.get("limited_by")})
        if site.get("limited_by"):
            limited[site["limited_by"]] = limited.get(site["limited_by"], 0) + 1
    mean_requested = sum(requested_abs) / len(requested_abs) if requested_abs else 0.0

    def summary(values: list[float]) -> dict:
        figures = abs_error(values, band_kw)
        if values and mean_requested:
            figures["mean_pct_of_mean_requested_activation"] = round(
                100 * sum(abs(v) for v in values) / len(values) / mean_requested, 2)
        return figures

    return {
        "setpoints_counted": len(errors),
        "setpoints_without_telemetry_or_samples": missing,
        "mean_abs_activation_requested_kw": round(mean_requested, 1),
        "measured_minus_setpoint_kw": summary(errors),
        "measured_minus_baseline_plus_requested": summary(errors_requested),
        "telemetry_p_kw_at_next_setpoint_minus_setpoint": summary(errors_telemetry),
        "share_within_tolerance_one_cycle_after": round(reached / len(errors), 3) if errors else None,
        "time_to_within_tolerance_s": stats(to_reach, 2) | {"never_before_next_setpoint": len(errors) - len(to_reach)},
        "limited_by_counts": limited,
        "per_setpoint": rows,
    }


def v2x_figures(v2x_records: dict, power: SitePower, start_s: float, end_s: float) -> dict:
    lowest = None
    below = []
    for cp_id, record in v2x_records.items():
        seen, floor = record.get("soc_min_seen_pct"), record.get("ev_min_soc_pct")
        if seen is None:
            continue
        floor = V2X_MIN_SOC_PCT if floor is None else floor
        if lowest is None or seen - floor < lowest[1] - lowest[2]:
            lowest = (cp_id, seen, floor)
        if seen < floor - 1e-9:
            below.append(cp_id)
    return {
        "ev_count": len(v2x_records),
        "soc_lowest_seen_pct": round(lowest[1], 2) if lowest else None,
        "soc_lowest_seen_ev_min_soc_pct": lowest[2] if lowest else None,
        "evs_below_their_min_soc": len(below),
        "soc_at_plug_in_min_pct": min((r["soc_at_plug_in_pct"] for r in v2x_records.values()
                                       if r.get("soc_at_plug_in_pct") is not None), default=None),
        "charged_kwh": round(power.energy_kwh(2, start_s, end_s), 2),
        "discharged_kwh": round(power.energy_kwh(3, start_s, end_s), 2),
    }


# -- the run ------------------------------------------------------------------------------


async def run(args) -> dict:
    nofile_before, nofile = raise_open_files_limit(args.chargers)
    workdir = Path(tempfile.mkdtemp(prefix="flexedge-ocpp-v2x-bench-"))
    print(f"work directory {workdir}", file=sys.stderr)
    chargers = charger_plan(args.chargers, args.v2x_share)
    by_cp = {c["cp_id"]: c for c in chargers}
    mosquitto, broker_port = await start_mosquitto(workdir)
    ocpp_port = free_port()
    sims: list[subprocess.Popen] = []
    daemon = None
    cycle_s = args.cycle_s or args.setpoint_interval_s
    valid_s = max(10.0, 5 * args.setpoint_interval_s)
    try:
        profile_path = workdir / "bench.yaml"
        profile_path.write_text(yaml.safe_dump(profile_for(chargers, broker_port, ocpp_port, cycle_s,
                                                           args.setpoint_interval_s, workdir)))
        with open(workdir / "daemon.log", "wb") as daemon_log:
            daemon = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(profile_path),
                                       "--log-level", args.log_level], cwd=ROOT, stderr=daemon_log)
        # The simulators stop on their own after this, even if this process dies.
        sims_max_run_s = READY_TIMEOUT_S + SETTLE_TIMEOUT_S + args.warmup_s + args.duration_s + 120
        entries = station_entries(chargers, args.seed, args.meter_interval_s, args.tick_s, time.time())
        process_of = spread_over_processes(chargers, args.sim_processes)
        for index in range(args.sim_processes):
            mine = [e for n, e in enumerate(entries) if process_of[n] == index]
            (workdir / f"stations-{index}.json").write_text(json.dumps(mine))
            sims.append(spawn([str(ROOT / "bench" / "ocpp_v2x_sim_host.py"),
                               "--url", f"ws://127.0.0.1:{ocpp_port}/ocpp",
                               "--stations-file", str(workdir / f"stations-{index}.json"),
                               "--ready-file", str(workdir / f"sim-ready-{index}.json"),
                               "--out-file", str(workdir / f"sim-out-{index}.json"),
                               "--max-run-s", str(sims_max_run_s)], workdir / f"sim-{index}.log"))
        readies = [workdir / f"sim-ready-{i}.json" for i in range(args.sim_processes)]
        everything = [daemon, *sims]
        async with TimedVpp("127.0.0.1", broker_port, "flexedge", "bench", cadence_s=args.setpoint_interval_s,
                            valid_s=valid_s) as vpp:
            started = time.monotonic()
            await wait_for(lambda: all(ready(r) for r in readies), READY_TIMEOUT_S, "stations connected, EVs plugged in",
                           everything)
            plugged = sum(json.loads(r.read_text())["charging"] for r in readies)
            if plugged != args.chargers:
                raise RuntimeError(f"only {plugged} of {args.chargers} EVs plugged in (see {workdir}/sim-*.log)")

            def all_online() -> bool:
                assets = vpp.telemetry[-1]["assets"] if vpp.telemetry else {}
                return len(assets) == len(chargers) and all(a["online"] and a["p_kw"] is not None
                                                            for a in assets.values())

            await wait_for(all_online, READY_TIMEOUT_S - (time.monotonic() - started), "every charger online", everything)
            # The tariff (dear now, cheap later) and the hurried drivers' preferences: the baselines.
            now = time.time()
            prices = [DEAR_PER_KWH] * DEAR_SLOTS + [CHEAP_PER_KWH] * (TARIFF_SLOTS - DEAR_SLOTS)
            tariff = await vpp.send_schedule("tariff", prices, resolution_s=900, currency="EUR")
            ack = await vpp.wait_schedule_ack(tariff["id"], timeout_s=10)
            if ack.get("status") != "accepted":
                raise RuntimeError(f"tariff rejected: {ack.get('reason')}")
            hurried = [c for c in chargers if c["group"] == "hurry"]
            for charger in hurried:
                await vpp.send_raw(json.dumps({"asset_id": charger["asset_id"], "departure": round(now + HURRY_DEPARTURE_S),
                                               "energy_kwh": HURRY_ENERGY_KWH}), leaf="ev/preferences")
            await wait_for(lambda: len(vpp.preference_acks) >= len(hurried), 20, "answers to the drivers' preferences",
                           everything)
            refused = [a for a in vpp.preference_acks if a.get("status") != "accepted"]
            if refused:
                raise RuntimeError(f"{len(refused)} preferences rejected, e.g. {refused[0]}")

            def settled() -> bool:
                assets = vpp.telemetry[-1]["assets"] if vpp.telemetry else {}
                return all(at_plan(c, assets.get(c["asset_id"])) for c in chargers)

            try:
                await wait_for(settled, SETTLE_TIMEOUT_S, "every charger at its planned power", everything)
            except RuntimeError:
                assets = vpp.telemetry[-1]["assets"] if vpp.telemetry else {}
                off = [(c["asset_id"], c["group"], {k: assets.get(c["asset_id"], {}).get(k) for k in
                                                     ("online", "p_kw", "baseline_method", "baseline_kw")})
                       for c in chargers if not at_plan(c, assets.get(c["asset_id"]))]
                raise RuntimeError(f"{len(off)} chargers not at their planned power, e.g. {off[:3]}") from None
            ready_after_s = time.monotonic() - started
            await asyncio.sleep(args.warmup_s)

            site = vpp.telemetry[-1]["site"]
            band_up_kw, band_down_kw = site["band_up_kw"], site["band_down_kw"]
            recorded = afrr_trace(args.seed, int(math.ceil(args.duration_s / TRACE_DT_S)) + 1, TRACE_DT_S,
                                  band_up_kw, band_down_kw, args.min_step_pct)
            points = resample(recorded, args.setpoint_interval_s, args.duration_s)
            trace_path = workdir / "trace.csv"
            write_trace(trace_path, points, f"aFRR-like activation, seed {args.seed}, band +{band_up_kw:g} / "
                        f"-{band_down_kw:g} kW, every {args.setpoint_interval_s:g} s, + is upward regulation")
            vpp.pattern = TracePattern.from_csv(trace_path)

            first_seq = vpp.telemetry[-1]["seq"]
            events_before = len(vpp.events)
            # Setpoints half a cycle after the gateway's tick, so that a setpoint and a tick do not
            # coincide and every run has the same phase.
            await vpp.wait_telemetry(len(vpp.telemetry) + 1, timeout_s=2 * cycle_s + 5)
            await asyncio.sleep(cycle_s / 2)
            sims_cpu0, busy0 = sum(cpu_seconds(p.pid) for p in sims), machine_busy_s()
            cpu0, t0, steal0 = cpu_seconds(daemon.pid), time.monotonic(), steal_s()
            await vpp.run(args.duration_s)
            cpu1, t1, steal1 = cpu_seconds(daemon.pid), time.monotonic(), steal_s()
            sims_cpu1, busy1 = sum(cpu_seconds(p.pid) for p in sims), machine_busy_s()
            memory_mb = rss_mb(daemon.pid)
            await asyncio.sleep(min(1.0, cycle_s))
            telemetry = [t for t in vpp.telemetry if t["seq"] > first_seq]
            events = list(vpp.events)[events_before:]
            rejected = vpp.acks_rejected
            sends = list(vpp.sends)
            sent = list(vpp.sent)[-len(sends):] if sends else []
        for proc in sims:
            stop_process(proc, 30)
        outs = [json.loads((workdir / f"sim-out-{i}.json").read_text()) for i in range(args.sim_processes)]
    finally:
        if daemon is not None:
            stop_process(daemon)
        for proc in (*sims, mosquitto):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(5)

    receipts, purposes, refreshes = target_changes([row for out in outs for row in out["profiles"]], sends[0][0])
    version_of = {cp_id: by_cp[cp_id]["version"] for cp_id in receipts}
    send_times = [s for s, _ in sends]
    latencies = command_latencies(send_times, send_times[-1] + args.setpoint_interval_s, receipts, version_of, 1)
    power = SitePower([out["samples"] for out in outs])
    band_kw = band_up_kw + band_down_kw
    v2x_records = {cp: r for out in outs for cp, r in out["v2x"].items()}
    gateway = [t["gateway"] for t in telemetry]
    durations = [g["cycle_duration_ms_last"] for g in gateway if g["cycle_duration_ms_last"] is not None]
    lateness = [g["cycle_lateness_ms_last"] for g in gateway if g["cycle_lateness_ms_last"] is not None]
    lags = [t["gateway"]["loop_lag_ms_max_since_last"] for t in telemetry]
    vpp_view = [t["site"]["p_kw"] - t["site"]["setpoint_kw"] for t in telemetry
                if t["site"].get("p_kw") is not None and t["site"].get("setpoint_kw") is not None]
    activations = [a for _, a in sends]
    tracking = tracking_per_setpoint(sends, sent, telemetry, power, args.setpoint_interval_s, cycle_s, band_kw)
    per_setpoint = tracking.pop("per_setpoint")
    if os.environ.get("BENCH_KEEP"):
        (workdir / "setpoints.json").write_text(json.dumps(per_setpoint, indent=1))
        (workdir / "telemetry.jsonl").write_text("".join(json.dumps(t) + "\n" for t in telemetry))
        (workdir / "receipts.json").write_text(json.dumps({"sends_mono": send_times, "target_changes_mono": receipts}))
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "chargers": args.chargers,
        "by_version": {v: sum(c["version"] == v for c in chargers) for v in ("1.6", "2.0.1", "2.1")},
        "by_group": {g: sum(c["group"] == g for c in chargers) for g in ("v2x", "hurry", "idle")},
        "simulator_processes": args.sim_processes,
        "open_files_soft_limit": nofile, "open_files_soft_limit_before": nofile_before,
        "cycle_s": cycle_s,
        "setpoint_interval_s": args.setpoint_interval_s,
        "meter_interval_s": args.meter_interval_s,
        "seed": args.seed,
        "ready_after_s": round(ready_after_s, 1),
        "duration_s": round(t1 - t0, 1),
        "band_at_start_kw": {"up": band_up_kw, "down": band_down_kw},
        "trace_kw": {"min": min(activations, default=None), "max": max(activations, default=None),
                     "mean_abs": round(sum(map(abs, activations)) / len(activations), 1) if activations else None,
                     "upward_share": round(sum(a > 0 for a in activations) / len(activations), 2) if activations else None},
        "setpoints_sent": len(sends),
        "setpoints_rejected": rejected,
        "command_failed_events": sum(e.get("type") == "command_failed" for e in events),
        "incapacity_events": sum(e.get("type") == "incapacity" for e in events),
        "profiles_during_the_trace_by_kind": purposes,
        "profiles_during_the_trace_not_changing_the_target": refreshes,
        "chargers_moved_per_setpoint": latencies["assets_moved_per_setpoint"],
        "setpoints_counted_for_latency": latencies["setpoints_counted"],
        "further_profiles_in_a_setpoint_window": latencies["further_commands_in_a_setpoint_window"],
        "setpoint_to_first_ack_ms": latencies["setpoint_to_first_command_ms"],
        "setpoint_to_each_ack_ms": latencies["setpoint_to_each_command_ms"],
        "setpoint_to_last_ack_ms": latencies["setpoint_to_last_command_ms"],
        "setpoint_to_last_ack_ms_by_version": latencies["setpoint_to_last_command_ms_by_protocol"],
        "setpoint_to_each_ack_ms_by_version": latencies["setpoint_to_each_command_ms_by_protocol"],
        "tracking": tracking,
        # The VPP simulator's statistic, per telemetry message: p_kw is the chargers' last MeterValues, often
        # from before the setpoint this message carries.
        "telemetry_p_minus_setpoint_same_message_kw": abs_error(vpp_view, band_kw),
        "v2x": v2x_figures(v2x_records, power, t0, t1),
        "daemon_cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "daemon_rss_mb": round(memory_mb, 1),
        "simulators_cpu_pct_of_one_core": round(100 * (sims_cpu1 - sims_cpu0) / (t1 - t0), 1),
        # The bench, Mosquitto and whatever else runs on the machine (other jobs make the figures noisy).
        "rest_of_machine_cpu_pct_of_one_core": round(
            100 * ((busy1 - busy0) - (cpu1 - cpu0) - (sims_cpu1 - sims_cpu0)) / (t1 - t0), 1),
        # A VM's stolen time shows up as stalls no code of ours can prevent: report it beside the figures.
        "vm_steal_pct_of_machine": round(100 * (steal1 - steal0) / (t1 - t0) / (os.cpu_count() or 1), 1),
        "cycles": len(telemetry),
        "missed_cycles": telemetry[-1]["gateway"]["missed_cycles"] if telemetry else None,
        "cycle_duration_ms": stats(durations),
        "cycle_lateness_ms": stats(lateness),
        "loop_lag_ms_max_per_cycle": stats(lags),
        "loop_lag_ms_p99_daemon_window": telemetry[-1]["gateway"]["loop_lag_ms_p99"] if telemetry else None,
    }


def summary(r: dict) -> str:
    """The figures a field engineer reads first."""
    def ms(d: dict) -> str:
        return "n/a" if d.get("p50") is None else f"p50 {d['p50']:.0f} / p99 {d['p99']:.0f} / max {d['max']:.0f} ms"

    t, v = r["tracking"], r["v2x"]
    e, q = t["measured_minus_setpoint_kw"], t["measured_minus_baseline_plus_requested"]
    m = t["telemetry_p_kw_at_next_setpoint_minus_setpoint"]
    last_by = r["setpoint_to_last_ack_ms_by_version"]
    lines = [
        f"{r['chargers']} chargers ({', '.join(f'{n} x {k}' for k, n in r['by_version'].items() if n)}; "
        f"{r['by_group']['v2x']} V2X, {r['by_group']['hurry']} hurried, {r['by_group']['idle']} idle), "
        f"{r['simulator_processes']} simulator processes; ready after {r['ready_after_s']:g} s",
        f"trace: {r['setpoints_sent']} setpoints every {r['setpoint_interval_s']:g} s over {r['duration_s']:g} s, "
        f"{r['trace_kw']['min']:g} .. {r['trace_kw']['max']:g} kW (band +{r['band_at_start_kw']['up']:g} / "
        f"-{r['band_at_start_kw']['down']:g}), rejected {r['setpoints_rejected']}, "
        f"command_failed {r['command_failed_events']}, incapacity events {r['incapacity_events']}",
        f"setpoint -> last ack, all chargers:  {ms(r['setpoint_to_last_ack_ms'])}   (bar: p99 < 1000 ms)",
    ]
    for version, figures in sorted(last_by.items()):
        lines.append(f"setpoint -> last ack, OCPP {version:<5}:  {ms(figures)}")
    lines += [
        f"setpoint -> each ack:               {ms(r['setpoint_to_each_ack_ms'])}; chargers moved per setpoint "
        f"p50 {r['chargers_moved_per_setpoint'].get('p50')} (min {r['chargers_moved_per_setpoint'].get('min')})",
        f"tracking |measured - setpoint_kw| at the next setpoint: mean {e.get('mean_kw')} / p95 {e.get('p95_kw')} / "
        f"max {e.get('max_kw')} kW ({e.get('mean_pct_of_mean_requested_activation')} % of the mean activation "
        f"{t['mean_abs_activation_requested_kw']} kW, {e.get('mean_pct_of_band')} % of the band)",
        f"  against baseline + requested: mean {q.get('mean_kw')} / p95 {q.get('p95_kw')} / max {q.get('max_kw')} kW; "
        f"within tolerance one cycle after: {100 * (t['share_within_tolerance_one_cycle_after'] or 0):.0f} %; "
        f"time to tolerance {t['time_to_within_tolerance_s']}",
        f"  the telemetry's site p_kw at the next setpoint (MeterValues) - setpoint_kw: mean {m.get('mean_kw')} / "
        f"p95 {m.get('p95_kw')} / max {m.get('max_kw')} kW",
    ]
    if v["ev_count"]:
        lines.append(f"V2X EVs: lowest SoC {v['soc_lowest_seen_pct']} % "
                     f"(its minimum {v['soc_lowest_seen_ev_min_soc_pct']} %), "
                     f"{v['evs_below_their_min_soc']} below their minimum; charged {v['charged_kwh']} kWh, "
                     f"discharged {v['discharged_kwh']} kWh during the trace")
    lines += [
        f"gateway: CPU {r['daemon_cpu_pct_of_one_core']} % of one core, RSS {r['daemon_rss_mb']} MB; "
        f"cycles {r['cycles']} (missed {r['missed_cycles']}), duration p99 {r['cycle_duration_ms']['p99']} ms, "
        f"lateness p99 {r['cycle_lateness_ms']['p99']} ms, "
        f"loop lag worst per cycle p99 {r['loop_lag_ms_max_per_cycle']['p99']} ms",
        f"simulators: CPU {r['simulators_cpu_pct_of_one_core']} % of one core; rest of the machine "
        f"{r['rest_of_machine_cpu_pct_of_one_core']} % of one core; VM steal {r['vm_steal_pct_of_machine']} %",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chargers", type=int, default=200)
    parser.add_argument("--v2x-share", type=float, default=1 / 3, help="share of OCPP 2.1 bidirectional chargers")
    parser.add_argument("--setpoint-interval-s", type=float, default=2.0, help="a setpoint this often")
    parser.add_argument("--cycle-s", type=float, default=None, help="the gateway's cycle (default the setpoint interval)")
    parser.add_argument("--duration-s", type=float, default=120.0, help="length of the trace")
    parser.add_argument("--seed", type=int, default=1, help="the trace's and the EVs' random numbers")
    parser.add_argument("--min-step-pct", type=float, default=4.0, help="smallest change between two 2 s samples, "
                        "%% of the band")
    parser.add_argument("--meter-interval-s", type=float, default=2.0, help="MeterValues period of each station")
    parser.add_argument("--tick-s", type=float, default=0.5, help="the stations' physics tick")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--sim-processes", type=int, default=3, help="processes the stations are spread over")
    parser.add_argument("--log-level", choices=["debug", "info", "warning"], default="warning", help="the daemon's")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="also the figures as one JSON line: on stdout, or to FILE")
    args = parser.parse_args()
    if not 3 <= args.chargers <= 1000 or not 0.0 <= args.v2x_share <= 1.0:
        parser.error("--chargers 3..1000, --v2x-share 0..1")
    if not 10 <= args.duration_s <= 1800 or not 0.5 <= args.setpoint_interval_s <= 10:
        parser.error("--duration-s 10..1800, --setpoint-interval-s 0.5..10")
    if args.cycle_s is not None and not 0.5 <= args.cycle_s <= 10:
        parser.error("--cycle-s 0.5..10")
    if not 1 <= args.sim_processes <= 8 or not 0.5 <= args.meter_interval_s <= 60 or not 0.05 <= args.tick_s <= 2:
        parser.error("--sim-processes 1..8, --meter-interval-s 0.5..60, --tick-s 0.05..2")
    result = asyncio.run(run(args))
    print(summary(result))
    if args.json == "-":
        print(json.dumps(result))
    elif args.json:
        Path(args.json).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
