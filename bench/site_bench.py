"""Benchmark: one gateway driving a mixed site of 100 assets along an aFRR-like trace (issue #5).

    python bench/site_bench.py --cycle-s 2 --duration-s 120
    python bench/site_bench.py --cycle-s 1 --duration-s 120

The site (every count and rating can be changed on the command line):

=====  ========================  =========  ==================================  ============
count  asset                     protocol   rating                              band (+ export)
=====  ========================  =========  ==================================  ============
40     PV inverter               SunSpec    10 kW, sun 8 kW                     -8 .. 0 kW (curtail only)
10     storage inverter          SunSpec    20 kW, 40 kWh, SoC 50 %             -20 .. +20 kW
15     battery (BESS)            IEC 104    50 kW, 100 kWh, SoC 50 %            -50 .. +50 kW
10     electric boiler (P2H)     IEC 104    20 .. 100 kW, off at the start      off, or -100 .. -20 kW
25     EV charger (13 x 1.6J,    OCPP       16 A x 3 = 11.04 kW, EV charging    off, or -4.1 .. 0 kW up
       12 x 2.0.1)                          at 11 kW the whole run              from -11 kW
=====  ========================  =========  ==================================  ============

Processes, as on a site: the gateway (`flexedge run` on a generated profile
with all 100 assets, so its CPU and memory are its own), five simulator
processes (bench/sim_host.py twice: PV, storage; bench/iec104_sim_host.py
twice: batteries, boilers; bench/ocpp_sim_host.py once: the chargers), and
this one, which runs a private Mosquitto and the VPP simulator.  The IEC 104
batteries send P and Q spontaneously every 100 ms with a +-0.5 kW ripple
(the boilers send what changes, without ripple), the chargers send
MeterValues every cycle.  No connection-point meter: the site's
power is the sum of the assets' measured power (the gateway's telemetry does
the same when no meter is configured).

The trace: an aFRR-like activation signal, generated here (seeded, so the same
command gives the same trace) at 2 s resolution and saved as trace-2s.csv in
--out (trace.csv is what is sent: the same, or at a 1 s cycle linear between
the 2 s samples): a mean-reverting random walk (each sample moves by at
least --min-step-pct of the band, so that each setpoint moves the assets
beyond their deadbands) with occasional steps to a new level, bounded by
60 % of the site's nominal upward band (so the chargers stay above their
minimum current) and 80 % of the downward band.  Assets move in their
direction only: PV and boilers on downward activations, chargers on upward
ones, storage both ways; the bench reports how many moved per setpoint.  The VPP simulator sends it
with `TracePattern` and `VppSimulator.run`, one setpoint per cycle.

Measured:
* setpoint -> device command: per setpoint, from the VPP's publish call to
  each device's first command before the next setpoint (SunSpec: the
  simulator's WriteRecord.t_s of a WMaxLimPct or WSet write that changes the
  value, so that the revert-timer refresh is not taken for a command;
  IEC 104: time.monotonic() in the unit's command callback, recorded by the
  bench host (CommandRecord.at is wall time and is not used); OCPP:
  ProfileRecord.received_mono).  All are time.monotonic(), one clock for every
  process on Linux.  First, each, and last per setpoint, overall and per
  protocol; a setpoint counts when it moved at least --min-moved assets.
* allocation time: the telemetry's gateway.allocation_ms_last (the cycle's
  own allocation) and the daemon's allocation_ms_p99 (every allocation,
  setpoints included, last 300).
* tracking: the VPP simulator's |site.p_kw - site.setpoint_kw| (the
  gateway's own plan: baseline + the activation it allocated), and the
  error between the activation requested (the setpoint in force) and the
  activation delivered (sum of measured power - sum of baselines), per
  telemetry message (the setpoints go out half a cycle after the gateway's
  tick, so the telemetry sees each setpoint half a cycle old), and the same
  error per group of assets (p_kw - setpoint_kw summed over the group).
* the daemon's CPU and RSS, the simulators' CPU, cycle duration and
  lateness, event-loop lag, missed cycles, VM steal.

Loopback only; bounded in time: every wait has a deadline and the simulators
stop on their own.  --out keeps trace-2s.csv, trace.csv, site.yaml, result.json,
telemetry.jsonl (site and gateway blocks), receipts.json (send and receipt
times) and the daemon's log; BENCH_KEEP=1 keeps the work directory too.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import cpu_seconds, free_port, rss_mb, start_mosquitto, steal_s  # noqa: E402
from bench.iec104_bench import machine_busy_s, stop_process  # noqa: E402
from bench.ocpp_bench import wait_for  # noqa: E402
from edge.runtime.health import percentile  # noqa: E402
from simulators.vpp import TracePattern, VppSimulator  # noqa: E402

PV_KW, PV_SUN_KW = 10.0, 8.0
STORAGE_KW, STORAGE_KWH = 20.0, 40.0
BESS_KW = 50.0  # 2 h
P2H_MIN_KW, P2H_MAX_KW = 20.0, 100.0
EV_KW = 11.0
CHARGER_MAX_A = 16.0  # x 230 V x 3 = 11.04 kW: the EV's 11 kW is the charger's full rating
READY_TIMEOUT_S = 120.0
# Bounds of the trace, fractions of the nominal band: upward 60 %, so that a charger's share (its 11 kW
# times the fraction) leaves it above its 6 A minimum and it follows each setpoint instead of sitting
# at an end of its gap; downward 80 %.
TRACE_BOUND_UP, TRACE_BOUND_DOWN = 0.6, 0.8
TRACE_DT_S = 2.0
# The points that carry the target (the enables are written with them, the revert timer every 15 s).
SUNSPEC_POINTS = "WMaxLimPct,WSet"


# -- the trace ------------------------------------------------------------------


def afrr_trace(seed: int, samples: int, dt_s: float, up_kw: float, down_kw: float, min_step_pct: float) -> list[tuple[float, float]]:
    """An aFRR-like activation signal: (t_s, activation_kw), + up.

    Ornstein-Uhlenbeck walk toward 0 (time constant 60 s, 4 %/sqrt(2 s) of
    the band), each sample at least `min_step_pct` of the band away from the
    last (in the walk's direction); a step to a uniformly drawn level about
    every 60 s; clamped to TRACE_BOUND_UP / _DOWN of the band.
    """
    rng = random.Random(seed)
    scale = (up_kw + down_kw) / 2
    lo, hi = -TRACE_BOUND_DOWN * down_kw, TRACE_BOUND_UP * up_kw
    sigma = 0.04 * scale * math.sqrt(dt_s / 2.0)
    min_step = min_step_pct / 100 * scale
    step_probability = dt_s / 60.0
    value, points = 0.0, []
    for n in range(samples):
        if n == 0:
            new = rng.uniform(0.2, 0.4) * (hi if rng.random() < 0.5 else lo)  # the first activation, a step
        elif rng.random() < step_probability:
            new = rng.uniform(lo, hi)
        else:
            increment = -value * dt_s / 60.0 + rng.gauss(0.0, sigma)
            if abs(increment) < min_step:
                increment = math.copysign(min_step, increment)
            new = value + increment
            if not lo <= new <= hi:  # bounce off the bound rather than stick to it
                new = value - increment
        value = round(min(hi, max(lo, new)), 1)
        points.append((round(n * dt_s, 3), value))
    return points


def resample(points: list[tuple[float, float]], dt_s: float, end_s: float) -> list[tuple[float, float]]:
    """The trace at `dt_s` resolution up to `end_s`: linear between its samples, held after the last."""
    out, k, n = [], 0, 0
    while n * dt_s < end_s - 1e-9:
        t = n * dt_s
        while k + 1 < len(points) and points[k + 1][0] <= t + 1e-9:
            k += 1
        (t0, v0), (t1, v1) = points[k], points[min(k + 1, len(points) - 1)]
        value = v0 if t1 <= t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
        out.append((round(t, 3), round(value, 1)))
        n += 1
    return out


def write_trace(path: Path, points: list[tuple[float, float]], header: str) -> None:
    with path.open("w", newline="") as f:
        f.write(f"# {header}\n")
        writer = csv.writer(f)
        writer.writerow(["t_s", "activation_kw"])
        writer.writerows(points)


# -- the site ---------------------------------------------------------------------


def nominal_band(args) -> tuple[float, float]:
    """(up, down) kW of the site at rest: what the trace is bounded by."""
    up = args.storage * STORAGE_KW + args.bess * BESS_KW + args.chargers * EV_KW
    down = args.pv * PV_SUN_KW + args.storage * STORAGE_KW + args.bess * BESS_KW + args.p2h * P2H_MAX_KW
    return up, down


def profile_for(args, sims: dict, broker_port: int, ocpp_port: int, workdir: Path) -> dict:
    cycle_s = args.cycle_s
    assets: list[dict] = []
    for i, port in enumerate(sims["pv"]):
        assets.append({"id": f"pv{i:03d}", "kind": "pv", "driver": "sunspec", "host": "127.0.0.1", "port": port,
                       "unit_id": 1, "timeout_s": 0.5})
    for i, port in enumerate(sims["storage"]):
        assets.append({"id": f"sto{i:03d}", "kind": "bess", "driver": "sunspec", "host": "127.0.0.1", "port": port,
                       "unit_id": 1, "timeout_s": 0.5})
    for i, unit in enumerate(sims["bess"]):
        assets.append({"id": f"bess{i:03d}", "kind": "bess", "driver": "iec104", "host": "127.0.0.1",
                       "port": unit["port"], "common_address": unit["common_address"], "template": "bess-generic",
                       "max_charge_kw": BESS_KW, "max_discharge_kw": BESS_KW})
    for i, unit in enumerate(sims["p2h"]):
        assets.append({"id": f"p2h{i:03d}", "kind": "p2h", "driver": "iec104", "host": "127.0.0.1",
                       "port": unit["port"], "common_address": unit["common_address"], "template": "electric-boiler",
                       "min_load_kw": P2H_MIN_KW, "max_load_kw": P2H_MAX_KW})
    for asset_id, cp_id, version in charger_ids(args.chargers):
        assets.append({"id": asset_id, "kind": "ev_charger", "driver": "ocpp", "charge_point_id": cp_id,
                       "ocpp_version": version, "max_current_a": CHARGER_MAX_A})
    return {
        "site": {"id": "bench"},
        "control": {"cycle_s": cycle_s, "setpoint_timeout_s": max(10.0, 5 * cycle_s)},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": broker_port},
                   "spool": {"path": str(workdir / "spool.sqlite"), "max_mb": 256}},
        "ocpp": {"host": "127.0.0.1", "port": ocpp_port, "security_profile": 1,
                 "authorize": {"mode": "accept_all"}, "id_tag_salt_file": str(workdir / "ocpp-id-salt")},
        "assets": assets,
    }


def charger_ids(count: int) -> list[tuple[str, str, str]]:
    """(asset id, charge point id, OCPP version): the first half (rounded up) 1.6, the rest 2.0.1."""
    return [(f"ev{i:03d}", f"CP{i:03d}", "1.6" if i < (count + 1) // 2 else "2.0.1") for i in range(count)]


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, *argv], stderr=f, cwd=ROOT)


def ready(path: Path) -> bool:
    return path.exists() and bool(path.read_text())


class TimedVpp(VppSimulator):
    """The VPP simulator, noting the monotonic time of each publish call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sends: list[tuple[float, float]] = []  # (time.monotonic() before the publish, activation_kw)

    async def send_setpoint(self, activation_kw, *args, **kwargs):
        sent_at = time.monotonic()
        payload = await super().send_setpoint(activation_kw, *args, **kwargs)
        self.sends.append((sent_at, payload["activation_kw"]))
        return payload


# -- figures ------------------------------------------------------------------------


def pct_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": round(1000 * percentile(values, 50), 1), "p99": round(1000 * percentile(values, 99), 1),
            "max": round(1000 * max(values), 1)}


def stats(values: list[float], digits: int = 2) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": round(percentile(values, 50), digits), "p99": round(percentile(values, 99), digits),
            "max": round(max(values), digits)}


def abs_error(errors: list[float], scale_kw: float) -> dict[str, float | None]:
    if not errors:
        return {"mean_kw": None, "p95_kw": None, "max_kw": None}
    a = [abs(e) for e in errors]
    return {"mean_kw": round(sum(a) / len(a), 2), "p95_kw": round(percentile(a, 95), 2), "max_kw": round(max(a), 2),
            "mean_pct_of_band": round(100 * sum(a) / len(a) / scale_kw, 2),
            "mean_signed_kw": round(sum(errors) / len(errors), 2)}


def command_latencies(sends: list[float], end_s: float, receipts: dict[str, list[float]], protocol_of: dict[str, str],
                      min_moved: int) -> dict:
    """Per setpoint, every device's first receipt in [its send, the next send)."""
    protocols = sorted(set(protocol_of.values()))
    moved_counts, extra = [], 0
    first, last, each = [], [], []
    last_by_protocol = {p: [] for p in protocols}
    each_by_protocol = {p: [] for p in protocols}
    moved_by_protocol = {p: [] for p in protocols}
    for k, sent_at in enumerate(sends):
        until = sends[k + 1] if k + 1 < len(sends) else end_s
        arrivals: dict[str, float] = {}
        for device, times in receipts.items():
            inside = [t for t in times if sent_at <= t < until]
            if inside:
                arrivals[device] = inside[0] - sent_at
                extra += len(inside) - 1
        moved_counts.append(len(arrivals))
        for p in protocols:
            moved_by_protocol[p].append(sum(1 for d in arrivals if protocol_of[d] == p))
        if len(arrivals) < min_moved:
            continue
        first.append(min(arrivals.values()))
        last.append(max(arrivals.values()))
        each.extend(arrivals.values())
        for p in protocols:
            mine = [v for d, v in arrivals.items() if protocol_of[d] == p]
            if mine:
                last_by_protocol[p].append(max(mine))
                each_by_protocol[p].extend(mine)
    return {
        "setpoints": len(sends),
        "setpoints_counted": len(last),
        "assets_moved_per_setpoint": stats([float(c) for c in moved_counts], 0) | {
            "min": min(moved_counts, default=0),
            "mean": round(sum(moved_counts) / len(moved_counts), 1) if moved_counts else None},
        "assets_moved_per_setpoint_by_protocol_mean": {
            p: round(sum(v) / len(v), 1) if v else None for p, v in moved_by_protocol.items()},
        # Commands to a device after its first in the same setpoint window (a cycle re-allocating).
        "further_commands_in_a_setpoint_window": extra,
        "setpoint_to_first_command_ms": pct_ms(first),
        "setpoint_to_each_command_ms": pct_ms(each),
        "setpoint_to_last_command_ms": pct_ms(last),
        "setpoint_to_last_command_ms_by_protocol": {p: pct_ms(v) for p, v in last_by_protocol.items()},
        "setpoint_to_each_command_ms_by_protocol": {p: pct_ms(v) for p, v in each_by_protocol.items()},
    }


def epoch_s(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def tracking(telemetry: list[dict], band_scale_kw: float, sent_ts: dict[str, str]) -> dict:
    """Per telemetry message: the gateway's own error, and delivered - requested (see the module's docstring)."""
    gateway_plan, now_errors, ages = [], [], []
    by_group: dict[str, list[float]] = {}  # per kind of asset: sum of (p_kw - setpoint_kw), the part it misses
    requested_abs, delivered_abs, limited = [], [], {}
    for message in telemetry:
        if message.get("setpoint_id") in sent_ts:
            ages.append(epoch_s(message["ts"]) - epoch_s(sent_ts[message["setpoint_id"]]))
        site = message["site"]
        p, baseline, setpoint = site.get("p_kw"), site.get("baseline_kw"), site.get("setpoint_kw")
        requested = site.get("activation_requested_kw")
        if None in (p, baseline, setpoint, requested):
            continue
        delivered = p - baseline
        groups: dict[str, float] = {}
        for asset_id, asset in message["assets"].items():
            if asset.get("p_kw") is not None and asset.get("setpoint_kw") is not None:
                group = asset_id.rstrip("0123456789")
                groups[group] = groups.get(group, 0.0) + asset["p_kw"] - asset["setpoint_kw"]
        for group, error in groups.items():
            by_group.setdefault(group, []).append(error)
        gateway_plan.append(p - setpoint)
        now_errors.append(delivered - requested)
        requested_abs.append(abs(requested))
        delivered_abs.append(abs(delivered))
        if site.get("limited_by"):
            limited[site["limited_by"]] = limited.get(site["limited_by"], 0) + 1
    mean_requested = sum(requested_abs) / len(requested_abs) if requested_abs else 0.0
    return {
        "telemetry_messages": len(now_errors),
        # How old the setpoint in force was when the telemetry was taken (both wall clock, ms resolution).
        "setpoint_age_at_telemetry_s": stats(ages, 3),
        "mean_abs_activation_requested_kw": round(mean_requested, 1),
        "vpp_site_p_minus_setpoint": abs_error(gateway_plan, band_scale_kw),
        "delivered_minus_requested_in_force": abs_error(now_errors, band_scale_kw),
        "delivered_minus_requested_mean_abs_pct_of_mean_abs_request": round(
            100 * sum(abs(e) for e in now_errors) / len(now_errors) / mean_requested, 1) if mean_requested else None,
        "limited_by_counts": limited,
        "p_minus_setpoint_by_asset_group": {g: abs_error(v, band_scale_kw) for g, v in sorted(by_group.items())},
    }


# -- the run ------------------------------------------------------------------------


async def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="flexedge-site-bench-"))
    print(f"work directory {workdir}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    up_kw, down_kw = nominal_band(args)
    # The recorded trace has 2 s resolution; a faster cycle gets it interpolated, so that the 2 s and
    # the 1 s runs follow the same activation.
    recorded = afrr_trace(args.seed, int(math.ceil(args.duration_s / TRACE_DT_S)) + 1, TRACE_DT_S, up_kw, down_kw,
                          args.min_step_pct)
    header = (f"aFRR-like activation, seed {args.seed}, band +{up_kw:g} / -{down_kw:g} kW, bounded at "
              f"{TRACE_BOUND_UP:.0%} / {TRACE_BOUND_DOWN:.0%}, + is upward regulation")
    write_trace(out / "trace-2s.csv", recorded, header + f", {TRACE_DT_S:g} s resolution")
    points = resample(recorded, args.cycle_s, args.duration_s)
    trace_path = out / "trace.csv"
    write_trace(trace_path, points, header + f", as sent: every {args.cycle_s:g} s (linear between the 2 s samples)")
    pattern = TracePattern.from_csv(trace_path)

    sims_max_s = READY_TIMEOUT_S + args.warmup_s + args.duration_s + 120
    mosquitto, broker_port = await start_mosquitto(workdir)
    ocpp_port = free_port()
    procs: dict[str, subprocess.Popen] = {}
    daemon = None
    try:
        # Device simulators (the OCPP stations come after the gateway: they connect to it).
        procs["pv"] = spawn([str(ROOT / "bench/sim_host.py"), "--count", str(args.pv), "--kind", "pv",
                             "--rated-kw", str(PV_KW), "--points", SUNSPEC_POINTS,
                             "--ready-file", str(workdir / "pv-ready.json"),
                             "--writes-file", str(workdir / "pv-writes.json")], workdir / "pv.log")
        procs["storage"] = spawn([str(ROOT / "bench/sim_host.py"), "--count", str(args.storage), "--kind", "storage",
                                  "--rated-kw", str(STORAGE_KW), "--capacity-kwh", str(STORAGE_KWH),
                                  "--points", SUNSPEC_POINTS, "--ready-file", str(workdir / "storage-ready.json"),
                                  "--writes-file", str(workdir / "storage-writes.json")], workdir / "storage.log")
        # Batteries with a +-0.5 kW transducer ripple on P and Q; boilers without (off, they measure 0).
        for name, count_args in (("bess", ["--bess", str(args.bess), "--p2h", "0"]),
                                 ("p2h", ["--bess", "0", "--p2h", str(args.p2h), "--ripple-kw", "0"])):
            procs[name] = spawn([str(ROOT / "bench/iec104_sim_host.py"), *count_args, "--bess-kw", str(BESS_KW),
                                 "--p2h-min-load-kw", str(P2H_MIN_KW), "--p2h-max-load-kw", str(P2H_MAX_KW),
                                 "--max-s", str(sims_max_s), "--ready-file", str(workdir / f"{name}-ready.json"),
                                 "--commands-file", str(workdir / f"{name}-commands.json")], workdir / f"{name}.log")
        names = ("pv", "storage", "bess", "p2h")
        await wait_for(lambda: all(ready(workdir / f"{n}-ready.json") for n in names), 60, "device simulators",
                       list(procs.values()))
        sims = {n: json.loads((workdir / f"{n}-ready.json").read_text()) for n in names}
        sims = {"pv": sims["pv"]["ports"], "storage": sims["storage"]["ports"],
                "bess": sims["bess"]["units"], "p2h": sims["p2h"]["units"]}
        profile_path = workdir / "site.yaml"
        profile = profile_for(args, sims, broker_port, ocpp_port, workdir)
        profile_path.write_text(yaml.safe_dump(profile))
        shutil.copy(profile_path, out / "site.yaml")
        with open(workdir / "daemon.log", "wb") as daemon_log:
            daemon = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(profile_path),
                                       "--log-level", "warning"], cwd=ROOT, stderr=daemon_log)
        chargers = charger_ids(args.chargers)
        (workdir / "stations.json").write_text(json.dumps([[cp, v] for _, cp, v in chargers]))
        procs["ocpp"] = spawn([str(ROOT / "bench/ocpp_sim_host.py"), "--url", f"ws://127.0.0.1:{ocpp_port}/ocpp",
                               "--stations-file", str(workdir / "stations.json"),
                               "--ready-file", str(workdir / "ocpp-ready.json"),
                               "--profiles-file", str(workdir / "ocpp-profiles.json"),
                               "--meter-interval-s", str(args.cycle_s), "--ev-max-kw", str(EV_KW),
                               "--max-run-s", str(sims_max_s)], workdir / "ocpp.log")

        valid_s = max(10.0, 5 * args.cycle_s)
        async with TimedVpp("127.0.0.1", broker_port, "flexedge", "bench", pattern=pattern, cadence_s=args.cycle_s,
                            valid_s=valid_s) as vpp:
            started = time.monotonic()
            everything = [daemon, *procs.values()]
            await wait_for(lambda: ready(workdir / "ocpp-ready.json"), READY_TIMEOUT_S, "stations with EVs", everything)
            charging = json.loads((workdir / "ocpp-ready.json").read_text())["charging"]
            if charging != args.chargers:
                raise RuntimeError(f"only {charging} of {args.chargers} EVs charging")

            def site_ready() -> bool:
                if not vpp.telemetry:
                    return False
                assets = vpp.telemetry[-1]["assets"]
                return (len(assets) == len(profile["assets"]) and all(a["online"] for a in assets.values())
                        and all(a["p_kw"] is not None and a["p_kw"] <= -0.9 * EV_KW
                                for a in assets.values() if a["kind"] == "ev_charger"))

            await wait_for(site_ready, READY_TIMEOUT_S - (time.monotonic() - started), "every asset online, EVs charging",
                           everything)
            ready_after_s = time.monotonic() - started
            await asyncio.sleep(args.warmup_s)
            band_at_start = {k: vpp.telemetry[-1]["site"][k] for k in ("band_up_kw", "band_down_kw", "p_kw")}
            first_seq = vpp.telemetry[-1]["seq"]
            events_before = len(vpp.events)
            sims_cpu0, busy0 = sum(cpu_seconds(p.pid) for p in procs.values()), machine_busy_s()
            # Setpoints half a cycle after the gateway's tick (its telemetry arrives a few ms after it), so
            # that a setpoint and a tick do not coincide and every run has the same phase.
            await vpp.wait_telemetry(len(vpp.telemetry) + 1, timeout_s=2 * args.cycle_s + 5)
            await asyncio.sleep(args.cycle_s / 2)
            cpu0, t0, steal0 = cpu_seconds(daemon.pid), time.monotonic(), steal_s()
            await vpp.run(args.duration_s)
            cpu1, t1, steal1 = cpu_seconds(daemon.pid), time.monotonic(), steal_s()
            sims_cpu1, busy1 = sum(cpu_seconds(p.pid) for p in procs.values()), machine_busy_s()
            memory_mb = rss_mb(daemon.pid)
            await asyncio.sleep(min(1.0, args.cycle_s))
            telemetry = [t for t in vpp.telemetry if t["seq"] > first_seq]
            events = list(vpp.events)[events_before:]
            rejected = vpp.acks_rejected
            summary = vpp.summary()
            sends = [s for s, _ in vpp.sends]
            sent_ts = {payload["id"]: payload["ts"] for payload in vpp.sent}
        stop_process(daemon)
        for proc in procs.values():
            stop_process(proc, 30)
        # Device-side receipts: each device's (time.monotonic(), value received).
        received: dict[str, list[tuple[float, float]]] = {}
        for name in ("pv", "storage"):
            for port, t_s, _point, value in json.loads((workdir / f"{name}-writes.json").read_text()):
                received.setdefault(f"{name}:{port}", []).append((t_s, value))
        for name in ("bess", "p2h"):
            for port, at, value, _accepted in json.loads((workdir / f"{name}-commands.json").read_text())["commands"]:
                received.setdefault(f"{name}:{port}", []).append((at, value))
        for cp_id, t_s, limit, _unit in json.loads((workdir / "ocpp-profiles.json").read_text()):
            received.setdefault(f"ocpp:{cp_id}", []).append((t_s, limit))
        # Every IEC 104 command and OCPP profile is a command; a SunSpec write is one when it changes the
        # value (the revert-timer refresh rewrites the same limit every 15 s at the device's poll).
        receipts: dict[str, list[float]] = {}
        protocol_of: dict[str, str] = {}
        for device, values in received.items():
            changes, last = [], None
            for t_s, value in sorted(values):
                if last is None or abs(value - last) > 1e-6 or not device.startswith(("pv:", "storage:")):
                    changes.append(t_s)
                last = value
            receipts[device] = changes
            protocol_of[device] = {"pv": "sunspec", "storage": "sunspec", "bess": "iec104", "p2h": "iec104",
                                   "ocpp": "ocpp"}[device.split(":")[0]]
        shutil.copy(workdir / "daemon.log", out / "daemon.log")
        (out / "receipts.json").write_text(json.dumps({"sends_mono": vpp.sends, "received_mono": received}))
    finally:
        if daemon is not None:
            stop_process(daemon)
        for proc in (*procs.values(), mosquitto):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(5)
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)

    # The last setpoint's window is one cycle: after it the daemon is stopped (and releases the devices).
    latencies = command_latencies(sends, sends[-1] + args.cycle_s, receipts, protocol_of, args.min_moved)
    durations = [t["gateway"]["cycle_duration_ms_last"] for t in telemetry if t["gateway"]["cycle_duration_ms_last"] is not None]
    lateness = [t["gateway"]["cycle_lateness_ms_last"] for t in telemetry if t["gateway"]["cycle_lateness_ms_last"] is not None]
    lags = [t["gateway"]["loop_lag_ms_max_since_last"] for t in telemetry]
    allocations = [t["gateway"]["allocation_ms_last"] for t in telemetry if t["gateway"].get("allocation_ms_last") is not None]
    scale = (up_kw + down_kw) / 2
    result = {
        "site": {"pv": args.pv, "sunspec_storage": args.storage, "iec104_bess": args.bess, "iec104_p2h": args.p2h,
                 "ocpp_chargers": args.chargers,
                 "ocpp_1_6": sum(v == "1.6" for _, _, v in charger_ids(args.chargers)),
                 "nominal_band_up_kw": up_kw, "nominal_band_down_kw": down_kw, "at_start": band_at_start},
        "cycle_s": args.cycle_s,
        "seed": args.seed,
        "trace": str(trace_path),
        "ready_after_s": round(ready_after_s, 1),
        "duration_s": round(t1 - t0, 1),
        "daemon_cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "daemon_rss_mb": round(memory_mb, 1),
        "simulators_cpu_pct_of_one_core": round(100 * (sims_cpu1 - sims_cpu0) / (t1 - t0), 1),
        "rest_of_machine_cpu_pct_of_one_core": round(
            100 * ((busy1 - busy0) - (cpu1 - cpu0) - (sims_cpu1 - sims_cpu0)) / (t1 - t0), 1),
        # A VM's stolen time shows up as stalls no code of ours can prevent: report it beside the figures.
        "vm_steal_pct_of_machine": round(100 * (steal1 - steal0) / (t1 - t0) / (os.cpu_count() or 1), 1),
        "setpoints_sent": summary["setpoints_sent"],
        "setpoints_rejected": rejected,
        "command_failed_events": sum(e.get("type") == "command_failed" for e in events),
        "incapacity_events": sum(e.get("type") == "incapacity" for e in events),
        **latencies,
        "allocation_ms_per_cycle": stats(allocations, 3),
        "allocation_ms_p99_daemon_window": telemetry[-1]["gateway"].get("allocation_ms_p99") if telemetry else None,
        "cycles": len(telemetry),
        "missed_cycles": telemetry[-1]["gateway"]["missed_cycles"] if telemetry else None,
        "cycle_duration_ms": stats(durations),
        "cycle_lateness_ms": stats(lateness),
        "loop_lag_ms_max_per_cycle": stats(lags),
        "loop_lag_ms_p99_daemon_window": telemetry[-1]["gateway"]["loop_lag_ms_p99"] if telemetry else None,
        "tracking": tracking(telemetry, scale, sent_ts),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "telemetry.jsonl").write_text("".join(json.dumps({"seq": t["seq"], "ts": t["ts"], "mode": t["mode"],
                                                             "site": t["site"], "gateway": t["gateway"]}) + "\n"
                                                 for t in telemetry))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycle-s", type=float, default=2.0, help="the gateway's cycle and the VPP's cadence")
    parser.add_argument("--duration-s", type=float, default=120.0, help="length of the trace")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min-step-pct", type=float, default=4.0, help="smallest change between two samples, %% of the band")
    parser.add_argument("--min-moved", type=int, default=40, help="a setpoint counts when it moved this many assets")
    parser.add_argument("--pv", type=int, default=40)
    parser.add_argument("--storage", type=int, default=10)
    parser.add_argument("--bess", type=int, default=15)
    parser.add_argument("--p2h", type=int, default=10)
    parser.add_argument("--chargers", type=int, default=25)
    parser.add_argument("--out", default=None, help="directory for trace.csv, result.json, telemetry, the daemon's log "
                        "(default /tmp/flexedge-site-bench-<cycle>s)")
    args = parser.parse_args()
    if not 10 <= args.duration_s <= 1800 or not 0.5 <= args.cycle_s <= 10:
        parser.error("--duration-s 10..1800, --cycle-s 0.5..10")
    if min(args.pv, args.storage, args.bess, args.p2h, args.chargers) < 1:
        parser.error("at least one asset of each kind")
    args.out = args.out or f"/tmp/flexedge-site-bench-{args.cycle_s:g}s"
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
