"""Benchmark: one gateway as the central system of N simulated OCPP charge points (issue #4).

    python bench/ocpp_bench.py --chargers 500 --duration-s 90

Three kinds of process, as on a site: the gateway (`flexedge run` on a
generated profile with an `ocpp:` server and N `driver: ocpp` chargers, so its
CPU and memory are its own), the simulated charge points (bench/ocpp_sim_host.py,
half OCPP 1.6J and half 2.0.1, spread over --sim-processes processes), and this
one, which runs a private Mosquitto and the VPP.

Every station has an EV plugged in and charging at its maximum (11 kW of a
22 kW station) for the whole run and sends MeterValues every 10 s.  Chargers
only get a band while an EV is plugged in: the bench waits until every charger
is online and metered charging before it starts.  The VPP then publishes an
upward activation every --setpoint-interval-s, alternating between two levels
(30 % and 50 % of the site's upward band), so that every setpoint moves every
charger's limit by about 2 kW (beyond its 0.2 kW deadband, and above its 6 A
minimum): each setpoint is N SetChargingProfile calls.

Prints: the daemon's CPU (% of one core) with meter values only and with the
setpoints, its memory (RSS); the time from a setpoint's publication to each
station's answer to its SetChargingProfile (both read time.monotonic(), one
clock for all processes on Linux), to the first and to the last of the N
(p50, p99, max); cycle figures from the telemetry's `gateway` block (and the
loop lag while only meter values flow); the simulators' CPU; and the VM's
steal time.  Raises the soft limit on open files
(inherited by every child) if N connections would not fit.  Loopback only;
bounded in time: every wait has a deadline and the simulators stop on their own.
BENCH_PROFILE=<file> runs the daemon under cProfile; BENCH_DAEMON_LOG=<file>
keeps its log (by default it goes with the temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import cpu_seconds, free_port, rss_mb, start_mosquitto, steal_s  # noqa: E402
from edge.runtime.health import percentile  # noqa: E402
from simulators.vpp import VppSimulator  # noqa: E402

EV_MAX_KW = 11.0
LEVELS = (0.3, 0.5)  # fractions of the upward band, alternating
READY_TIMEOUT_S = 180.0  # connection storm of N stations plus the first MeterValues
# The daemon holds one socket per charger (a simulator process at most as many);
# the spare covers the spool, the broker link, Python itself.
FILES_SPARE = 256


def raise_open_files_limit(chargers: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE (inherited by the children) if N connections need it: (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = chargers + FILES_SPARE
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft, soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"open-files hard limit {hard} < {needed} needed for {chargers} chargers: raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return soft, needed


def charger_ids(count: int) -> list[tuple[str, str, str]]:
    """(asset id, charge point id, OCPP version): the first half 1.6, the second 2.0.1."""
    return [(f"ev{i:03d}", f"CP{i:03d}", "1.6" if i < count // 2 else "2.0.1") for i in range(count)]


def profile_for(chargers, broker_port: int, ocpp_port: int, cycle_s: float, setpoint_interval_s: float,
                workdir: Path) -> dict:
    return site_profile(broker_port, ocpp_port, cycle_s, setpoint_interval_s, workdir,
                        [{"id": asset_id, "kind": "ev_charger", "driver": "ocpp", "charge_point_id": cp_id,
                          "ocpp_version": version} for asset_id, cp_id, version in chargers])


def site_profile(broker_port: int, ocpp_port: int, cycle_s: float, setpoint_interval_s: float, workdir: Path,
                 assets: list[dict], **sections) -> dict:
    """The benches' OCPP site: a private broker, a spool in ``workdir``, the central system open to
    every tag, and ``assets``; ``sections`` adds or replaces top-level sections (e.g. ev_charging)."""
    return {
        "site": {"id": "bench"},
        "control": {"cycle_s": cycle_s, "setpoint_timeout_s": max(10.0, 5 * setpoint_interval_s)},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": broker_port},
                   "spool": {"path": str(workdir / "spool.sqlite"), "max_mb": 256}},
        # Security profile 1 without passwords: the bench measures the protocol, not Basic auth.
        "ocpp": {"host": "127.0.0.1", "port": ocpp_port, "security_profile": 1,
                 "authorize": {"mode": "accept_all"}, "id_tag_salt_file": str(workdir / "ocpp-id-salt")},
        "assets": assets,
        **sections,
    }


async def start_simulators(chargers, processes: int, url: str, meter_interval_s: float, max_run_s: float,
                           workdir: Path) -> list[subprocess.Popen]:
    """Stations over `processes` processes, each with half 1.6 and half 2.0.1 (interleaved)."""
    procs = []
    for index in range(processes):
        stations = [[cp_id, version] for n, (_, cp_id, version) in enumerate(chargers) if n % processes == index]
        (workdir / f"stations-{index}.json").write_text(json.dumps(stations))
        procs.append(subprocess.Popen([
            sys.executable, str(ROOT / "bench" / "ocpp_sim_host.py"), "--url", url,
            "--stations-file", str(workdir / f"stations-{index}.json"),
            "--ready-file", str(workdir / f"sim-ready-{index}.json"),
            "--profiles-file", str(workdir / f"sim-profiles-{index}.json"),
            "--meter-interval-s", str(meter_interval_s), "--ev-max-kw", str(EV_MAX_KW),
            "--max-run-s", str(max_run_s)], stderr=open(workdir / f"sim-{index}.log", "wb")))
    return procs


async def wait_for(probe, timeout_s: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s:g} s")
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: process {proc.args[:3]} exited with {proc.returncode}")
        await asyncio.sleep(0.2)


def all_charging(telemetry: dict, count: int) -> bool:
    """Every charger online and metered drawing (almost) its EV's maximum: each has its full band."""
    assets = telemetry["assets"].values()
    return len(assets) == count and all(a["online"] and a["p_kw"] is not None and a["p_kw"] <= -0.9 * EV_MAX_KW
                                        for a in assets)


def ack_latencies(sends: list[float], end_s: float, profiles_by_cp: dict[str, list[float]], cp_ids: list[str]):
    """Per setpoint, each charger's first answer in [its send, the next send): (first, last, each) in s.

    An answer that comes after the next setpoint was sent is not counted: such a
    setpoint is reported as not fully acknowledged.
    """
    firsts, lasts, each, incomplete = [], [], {cp: [] for cp in cp_ids}, 0
    for k, sent_at in enumerate(sends):
        until = sends[k + 1] if k + 1 < len(sends) else end_s
        times = {}
        for cp in cp_ids:
            answered = next((t for t in profiles_by_cp.get(cp, ()) if sent_at <= t < until), None)
            if answered is not None:
                times[cp] = answered - sent_at
        for cp, latency in times.items():
            each[cp].append(latency)
        if len(times) == len(cp_ids):
            firsts.append(min(times.values()))
            lasts.append(max(times.values()))
        else:
            incomplete += 1
    return firsts, lasts, each, incomplete


def pct_ms(values: list[float]) -> dict[str, float]:
    return {"p50": round(1000 * percentile(values, 50), 1), "p99": round(1000 * percentile(values, 99), 1),
            "max": round(1000 * max(values, default=0.0), 1)}


async def run(count: int, cycle_s: float, setpoint_interval_s: float, meter_interval_s: float, duration_s: float,
              meter_only_s: float, warmup_s: float, sim_processes: int, log_level: str) -> dict:
    nofile_before, nofile = raise_open_files_limit(count)
    workdir = Path(tempfile.mkdtemp(prefix="flexedge-ocpp-bench-"))
    chargers = charger_ids(count)
    cp_ids = [cp_id for _, cp_id, _ in chargers]
    version_of = {cp_id: version for _, cp_id, version in chargers}
    mosquitto, broker_port = await start_mosquitto(workdir)
    ocpp_port = free_port()
    simulators: list[subprocess.Popen] = []
    daemon = None
    try:
        profile_path = workdir / "bench.yaml"
        profile_path.write_text(yaml.safe_dump(profile_for(chargers, broker_port, ocpp_port, cycle_s,
                                                           setpoint_interval_s, workdir)))
        profiler = ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") else []
        with open(os.environ.get("BENCH_DAEMON_LOG") or workdir / "daemon.log", "wb") as daemon_log:
            daemon = subprocess.Popen([sys.executable, *profiler, "-m", "edge.cli", "run", str(profile_path),
                                       "--log-level", log_level], cwd=ROOT, stderr=daemon_log)
        # Simulators stop on their own after this, even if this process dies.
        sims_max_run_s = READY_TIMEOUT_S + warmup_s + meter_only_s + duration_s + 120
        simulators = await start_simulators(chargers, sim_processes, f"ws://127.0.0.1:{ocpp_port}/ocpp",
                                            meter_interval_s, sims_max_run_s, workdir)
        readies = [workdir / f"sim-ready-{i}.json" for i in range(sim_processes)]
        async with VppSimulator("127.0.0.1", broker_port, "flexedge", "bench",
                                valid_s=max(10.0, 5 * setpoint_interval_s)) as vpp:
            started = time.monotonic()
            await wait_for(lambda: all(r.exists() and r.read_text() for r in readies), READY_TIMEOUT_S,
                           "stations connected with EVs", (daemon, *simulators))
            charging = sum(json.loads(r.read_text())["charging"] for r in readies)
            if charging != count:
                raise RuntimeError(f"only {charging} of {count} EVs charging")
            await wait_for(lambda: vpp.telemetry and all_charging(vpp.telemetry[-1], count),
                           READY_TIMEOUT_S - (time.monotonic() - started), "every charger metered charging", (daemon,))
            ready_after_s = time.monotonic() - started
            await asyncio.sleep(warmup_s)

            # Meter values only: the cost of N connections at rest.
            meter_seq = vpp.telemetry[-1]["seq"]
            cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
            await asyncio.sleep(meter_only_s)
            meter_only_cpu = 100 * (cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - t0)

            band_up_kw = vpp.telemetry[-1]["site"]["band_up_kw"]
            first_seq = vpp.telemetry[-1]["seq"]
            sim_cpu0 = sum(cpu_seconds(p.pid) for p in simulators)
            cpu0, t0, steal0 = cpu_seconds(daemon.pid), time.monotonic(), steal_s()
            sends: list[float] = []
            next_send = time.monotonic()
            while time.monotonic() - t0 < duration_s:
                activation_kw = LEVELS[len(sends) % 2] * band_up_kw
                sent_at = time.monotonic()
                await vpp.send_setpoint(activation_kw, valid_s=max(10.0, 5 * setpoint_interval_s))
                sends.append(sent_at)
                next_send += setpoint_interval_s
                await asyncio.sleep(max(0.0, next_send - time.monotonic()))
            cpu1, t1, steal1 = cpu_seconds(daemon.pid), time.monotonic(), steal_s()
            sim_cpu1 = sum(cpu_seconds(p.pid) for p in simulators)
            memory_mb = rss_mb(daemon.pid)
            daemon_files = len(os.listdir(f"/proc/{daemon.pid}/fd"))
            await asyncio.sleep(1.0)
            telemetry = [t for t in vpp.telemetry if t["seq"] > first_seq]
            meter_telemetry = [t for t in vpp.telemetry if meter_seq < t["seq"] <= first_seq]
            events = list(vpp.events)
            rejected = vpp.acks_rejected
        for proc in simulators:
            proc.send_signal(signal.SIGTERM)
        for proc in simulators:
            proc.wait(30)
        profiles_by_cp: dict[str, list[float]] = {}
        limits_by_cp: dict[str, set[float]] = {}
        for index in range(sim_processes):
            for cp_id, t_s, limit, _unit in json.loads((workdir / f"sim-profiles-{index}.json").read_text()):
                profiles_by_cp.setdefault(cp_id, []).append(t_s)
                if t_s >= sends[0]:
                    limits_by_cp.setdefault(cp_id, set()).add(limit)
        for times in profiles_by_cp.values():
            times.sort()
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
        for proc in (*simulators, mosquitto):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)

    firsts, lasts, each, incomplete = ack_latencies(sends, t1 + setpoint_interval_s, profiles_by_cp, cp_ids)
    every = [latency for values in each.values() for latency in values]
    durations = [t["gateway"]["cycle_duration_ms_last"] for t in telemetry if t["gateway"]["cycle_duration_ms_last"] is not None]
    lateness = [t["gateway"]["cycle_lateness_ms_last"] for t in telemetry if t["gateway"]["cycle_lateness_ms_last"] is not None]
    lags = [t["gateway"]["loop_lag_ms_max_since_last"] for t in telemetry]
    meter_lags = [t["gateway"]["loop_lag_ms_max_since_last"] for t in meter_telemetry]
    ms = lambda values, q: round(percentile(values, q), 2)  # noqa: E731
    return {
        "chargers": count,
        "ocpp_1_6": sum(v == "1.6" for v in version_of.values()),
        "ocpp_2_0_1": sum(v == "2.0.1" for v in version_of.values()),
        "simulator_processes": sim_processes,
        "open_files_soft_limit": nofile,
        "open_files_soft_limit_before": nofile_before,
        "daemon_open_files": daemon_files,
        "cycle_s": cycle_s,
        "setpoint_interval_s": setpoint_interval_s,
        "meter_interval_s": meter_interval_s,
        "all_charging_after_s": round(ready_after_s, 1),
        "duration_s": round(t1 - t0, 1),
        "daemon_cpu_pct_of_one_core_meter_values_only": round(meter_only_cpu, 1),
        "daemon_cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "daemon_rss_mb": round(memory_mb, 1),
        "simulators_cpu_pct_of_one_core": round(100 * (sim_cpu1 - sim_cpu0) / (t1 - t0), 1),
        # A VM's stolen time shows up as stalls no code of ours can prevent: report it beside the figures.
        "vm_steal_pct_of_machine": round(100 * (steal1 - steal0) / (t1 - t0) / (os.cpu_count() or 1), 1),
        "cycles": len(telemetry),
        "missed_cycles": telemetry[-1]["gateway"]["missed_cycles"] if telemetry else None,
        "cycle_duration_ms": {"p50": ms(durations, 50), "p99": ms(durations, 99), "max": round(max(durations, default=0), 2)},
        "cycle_lateness_ms": {"p50": ms(lateness, 50), "p99": ms(lateness, 99), "max": round(max(lateness, default=0), 2)},
        "loop_lag_ms_max_per_cycle": {"p50": ms(lags, 50), "p99": ms(lags, 99), "max": round(max(lags, default=0), 2)},
        "meter_values_only_cycles": len(meter_telemetry),
        "meter_values_only_loop_lag_ms_max_per_cycle": {"p50": ms(meter_lags, 50), "p99": ms(meter_lags, 99),
                                                        "max": round(max(meter_lags, default=0), 2)},
        "setpoints": len(sends),
        "setpoints_rejected": rejected,
        "setpoints_fully_acknowledged": len(lasts),
        "setpoints_not_fully_acknowledged_before_the_next": incomplete,
        "chargers_whose_limit_alternated": sum(len(limits) >= 2 for limits in limits_by_cp.values()),
        "command_failed_events": sum(e.get("type") == "command_failed" for e in events),
        "latency_to_first_ack_ms": pct_ms(firsts),
        "latency_per_ack_ms": pct_ms(every),
        "latency_per_ack_ms_1_6": pct_ms([x for cp, v in each.items() if version_of[cp] == "1.6" for x in v]),
        "latency_per_ack_ms_2_0_1": pct_ms([x for cp, v in each.items() if version_of[cp] == "2.0.1" for x in v]),
        "latency_to_last_ack_ms": pct_ms(lasts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chargers", type=int, default=500, help="charge points, half 1.6 and half 2.0.1")
    parser.add_argument("--cycle-s", type=float, default=2.0, help="the gateway's control cycle")
    parser.add_argument("--setpoint-interval-s", type=float, default=2.0, help="a new setpoint this often")
    parser.add_argument("--meter-interval-s", type=float, default=10.0, help="MeterValues period of each station")
    parser.add_argument("--duration-s", type=float, default=90.0, help="the measured run with setpoints")
    parser.add_argument("--meter-only-s", type=float, default=20.0, help="measured first, with meter values only")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--sim-processes", type=int, default=2, help="processes the simulated stations are spread over")
    parser.add_argument("--log-level", choices=["debug", "info", "warning"], default="info", help="the daemon's")
    args = parser.parse_args()
    if not 2 <= args.chargers <= 2000 or not 10 <= args.duration_s <= 1800 or not 1 <= args.meter_only_s <= 600:
        parser.error("--chargers 2..2000, --duration-s 10..1800, --meter-only-s 1..600")
    if not 1 <= args.sim_processes <= 8 or not 0.5 <= args.setpoint_interval_s <= 60:
        parser.error("--sim-processes 1..8, --setpoint-interval-s 0.5..60")
    result = asyncio.run(run(args.chargers, args.cycle_s, args.setpoint_interval_s, args.meter_interval_s,
                             args.duration_s, args.meter_only_s, args.warmup_s, args.sim_processes, args.log_level))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
