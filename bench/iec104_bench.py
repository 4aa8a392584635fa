"""Benchmark: one gateway commanding N simulated IEC 104 battery units at a given cycle (issue #3).

    python bench/iec104_bench.py --units 50 --cycle-s 2 --duration-s 90
    python bench/iec104_bench.py --units 50 --cycle-s 1 --duration-s 90

Three kinds of process, as on a site: the gateway (`flexedge run` on a
generated profile with N `driver: iec104` BESS assets, so its CPU and memory
are its own, c104's threads included), the simulated units
(bench/iec104_sim_host.py, one c104 server per unit, spread over
--sim-processes processes), and this one, which runs a private Mosquitto and
the VPP.

Every unit sends its active and reactive power spontaneously on every
simulator tick (--update-s, 0.1 s by default: a +-0.5 kW transducer ripple
makes them change every time) and its state of charge as it moves.  The VPP
publishes a setpoint every cycle, alternating between +25 % and -25 % of the
site's band (discharge, then charge), so that every setpoint changes every
unit's target: each setpoint is N setpoint commands (C_SE_NC_1, direct,
confirmed by ACT_CON).

Prints: the daemon's CPU (% of one core) and memory (RSS) at steady state;
the command round trip as the driver measures it (from handing the command
to c104 to its positive ACT_CON arriving on the event loop, logged by the
driver's `flexedge.drivers.iec104.commands` logger, which the bench switches
on); the time from a setpoint's publication to the command's arrival at each
unit, to the first and to the last of the N (both read time.monotonic(),
one clock for every process on Linux); the event-loop lag and the cycle
figures from the telemetry's `gateway` block; the simulators' spontaneous
frame rate and CPU; the CPU everything else on the machine used meanwhile;
and the VM's steal time.  --gateway-cpus / --sim-cpus pin the gateway and the
simulators to CPUs (e.g. 0 and 1), so that the simulated units, which stand in
for separate devices, do not take the gateway's core.  Loopback only; bounded in time: every
wait has a deadline and the simulators stop on their own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import CLOCK_TICKS, cpu_seconds, pinned, rss_mb, start_mosquitto, steal_s  # noqa: E402
from edge.runtime.health import percentile  # noqa: E402
from simulators.vpp import VppSimulator  # noqa: E402

UNIT_KW = 100.0  # each simulated battery: 100 kW charge and discharge, 200 kWh
ACTIVATION_SHARE = 0.25  # of the site's band, alternately up and down
READY_TIMEOUT_S = 60.0
COMMAND_LOGGER = "flexedge.drivers.iec104.commands"
COMMAND_LINE = re.compile(r"^(?P<asset>\S+): \S+ kW confirmed in (?P<ms>[0-9.]+) ms$")
# `flexedge run`, with the one driver logger that reports command round trips switched on.
GATEWAY = ("import logging, sys; from edge.cli import main; "
           f"logging.getLogger({COMMAND_LOGGER!r}).setLevel(logging.DEBUG); sys.exit(main(sys.argv[1:]))")


def machine_busy_s() -> float:
    """CPU time all cores spent on anything but idle and I/O wait, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def profile_for(units: list[dict], broker_port: int, cycle_s: float, spool: Path) -> dict:
    return {
        "site": {"id": "bench"},
        "control": {"cycle_s": cycle_s, "setpoint_timeout_s": max(10.0, 5 * cycle_s)},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": broker_port}, "spool": {"path": str(spool), "max_mb": 256}},
        "assets": [
            {"id": f"bess{i:03d}", "kind": "bess", "driver": "iec104", "host": "127.0.0.1", "port": unit["port"],
             "common_address": unit["common_address"], "template": "bess-generic",
             "max_charge_kw": UNIT_KW, "max_discharge_kw": UNIT_KW}
            for i, unit in enumerate(units)
        ],
    }


async def start_simulators(count: int, processes: int, update_s: float, max_s: float,
                           workdir: Path, cpus: set[int] | None = None) -> tuple[list[subprocess.Popen], list[dict]]:
    """Units in `processes` processes: real units answer in parallel, one Python process would not."""
    procs, readies = [], []
    sizes = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    for index, size in enumerate(sizes):
        ready = workdir / f"sim-ready-{index}.json"
        readies.append(ready)
        procs.append(subprocess.Popen([
            sys.executable, str(ROOT / "bench" / "iec104_sim_host.py"), "--bess", str(size), "--update-s", str(update_s),
            "--max-s", str(max_s), "--ready-file", str(ready), "--commands-file", str(workdir / f"sim-commands-{index}.json")],
            preexec_fn=pinned(cpus)))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(r.exists() and r.read_text() for r in readies):
            return procs, [unit for r in readies for unit in json.loads(r.read_text())["units"]]
        if any(p.poll() is not None for p in procs):
            break
        await asyncio.sleep(0.05)
    for proc in procs:
        proc.kill()
    raise RuntimeError("simulators did not start")


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def round_trips_ms(log_path: Path, from_epoch_s: float, to_epoch_s: float) -> list[float]:
    """The driver's command round trips logged between the two wall times (the daemon's JSON log)."""
    trips = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") != COMMAND_LOGGER:
            continue
        logged_at = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
        match = COMMAND_LINE.match(entry["msg"])
        if match and from_epoch_s <= logged_at <= to_epoch_s:
            trips.append(float(match["ms"]))
    return trips


async def run(units: int, cycle_s: float, duration_s: float, warmup_s: float, sim_processes: int, update_s: float,
              gateway_cpus: set[int] | None = None, sim_cpus: set[int] | None = None) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="flexedge-iec104-bench-"))
    simulators: list[subprocess.Popen] = []
    mosquitto, port = await start_mosquitto(workdir)
    try:
        simulators, sim_units = await start_simulators(
            units, sim_processes, update_s, READY_TIMEOUT_S + warmup_s + duration_s + 60, workdir, sim_cpus)
        profile_path = workdir / "bench.yaml"
        profile_path.write_text(yaml.safe_dump(profile_for(sim_units, port, cycle_s, workdir / "spool.sqlite")))
        daemon_log = workdir / "daemon.log"
        with open(daemon_log, "wb") as log_file:
            daemon = subprocess.Popen([sys.executable, "-c", GATEWAY, "run", str(profile_path),
                                       "--log-level", "warning", "--log-format", "json"], stderr=log_file, cwd=ROOT,
                                      preexec_fn=pinned(gateway_cpus))
        valid_s = max(10.0, 5 * cycle_s)
        try:
            async with VppSimulator("127.0.0.1", port, "flexedge", "bench", valid_s=valid_s) as vpp:
                deadline = time.monotonic() + READY_TIMEOUT_S
                while time.monotonic() < deadline:
                    if vpp.telemetry and all(a["online"] for a in vpp.telemetry[-1]["assets"].values()):
                        break
                    if daemon.poll() is not None:
                        raise RuntimeError(f"the daemon exited: {daemon_log.read_text()[-2000:]}")
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError("units did not come online")
                await asyncio.sleep(warmup_s)
                first_seq = vpp.telemetry[-1]["seq"]
                events_before = len(vpp.events)
                sims_cpu0, busy0 = sum(cpu_seconds(p.pid) for p in simulators), machine_busy_s()
                cpu0, t0, steal0, wall0 = cpu_seconds(daemon.pid), time.monotonic(), steal_s(), time.time()
                sends: list[float] = []
                activation_kw = ACTIVATION_SHARE * UNIT_KW * units
                next_send = time.monotonic()
                while time.monotonic() - t0 < duration_s:
                    sent_at = time.monotonic()
                    # Discharge, then charge: every unit's target changes, and the SoC stays put on average.
                    await vpp.send_setpoint(activation_kw if len(sends) % 2 == 0 else -activation_kw, valid_s=valid_s)
                    sends.append(sent_at)
                    next_send += cycle_s
                    await asyncio.sleep(max(0.0, next_send - time.monotonic()))
                cpu1, t1, steal1, wall1 = cpu_seconds(daemon.pid), time.monotonic(), steal_s(), time.time()
                sims_cpu1, busy1 = sum(cpu_seconds(p.pid) for p in simulators), machine_busy_s()
                memory_mb = rss_mb(daemon.pid)
                await asyncio.sleep(min(1.0, cycle_s))
                telemetry = [t for t in vpp.telemetry if t["seq"] > first_seq]
                failures = [e for e in list(vpp.events)[events_before:] if e.get("type") == "command_failed"]
        finally:
            stop_process(daemon)
        for proc in simulators:
            stop_process(proc)
        commands_by_port: dict[int, list[float]] = {}
        spontaneous_frames, unit_seconds = 0, 0.0
        for index in range(len(simulators)):
            record = json.loads((workdir / f"sim-commands-{index}.json").read_text())
            spontaneous_frames += record["spontaneous_frames"]
            unit_seconds += record["unit_seconds"]
            for command_port, received_at, _value, _accepted in record["commands"]:
                commands_by_port.setdefault(command_port, []).append(received_at)
        trips = round_trips_ms(daemon_log, wall0, wall1)
    finally:
        for proc in (*simulators, mosquitto):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)

    # A setpoint counts as delivered when every unit got its command before the next setpoint went out.
    first_latencies, last_latencies, all_latencies = [], [], []
    for sent_at, next_sent_at in zip(sends, [*sends[1:], float("inf")]):
        arrivals = [next((t for t in sorted(ts) if sent_at <= t < next_sent_at), None) for ts in commands_by_port.values()]
        if len(arrivals) == units and None not in arrivals:
            first_latencies.append(min(arrivals) - sent_at)
            last_latencies.append(max(arrivals) - sent_at)
            all_latencies.extend(t - sent_at for t in arrivals)

    lags = [t["gateway"]["loop_lag_ms_max_since_last"] for t in telemetry]
    durations = [t["gateway"]["cycle_duration_ms_last"] for t in telemetry if t["gateway"]["cycle_duration_ms_last"] is not None]
    lateness = [t["gateway"]["cycle_lateness_ms_last"] for t in telemetry if t["gateway"]["cycle_lateness_ms_last"] is not None]
    ms = lambda values, q: round(percentile(values, q), 2)  # noqa: E731
    to_ms = lambda values, q: round(1000 * percentile(values, q), 1)  # noqa: E731
    return {
        "units": units,
        "simulator_processes": sim_processes,
        "update_s": update_s,
        "gateway_cpus": sorted(gateway_cpus) if gateway_cpus else "any",
        "simulator_cpus": sorted(sim_cpus) if sim_cpus else "any",
        "cycle_s": cycle_s,
        "duration_s": round(t1 - t0, 1),
        "spontaneous_frames_per_s_per_unit": round(spontaneous_frames / unit_seconds, 1) if unit_seconds else None,
        "spontaneous_frames_per_s_all_units": round(spontaneous_frames / unit_seconds * units, 0) if unit_seconds else None,
        "daemon_cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        # A VM's stolen time shows up as stalls no code of ours can prevent: report it beside the figures.
        "vm_steal_pct_of_machine": round(100 * (steal1 - steal0) / (t1 - t0) / (os.cpu_count() or 1), 1),
        "daemon_rss_mb": round(memory_mb, 1),
        # The simulators share the machine's two cores with the daemon.
        "simulators_cpu_pct_of_one_core": round(100 * (sims_cpu1 - sims_cpu0) / (t1 - t0), 1),
        # This bench, Mosquitto and whatever else ran on the machine meanwhile (other engineers' jobs).
        "rest_of_machine_cpu_pct_of_one_core": round(
            100 * ((busy1 - busy0) - (cpu1 - cpu0) - (sims_cpu1 - sims_cpu0)) / (t1 - t0), 1),
        "setpoints": len(sends),
        "commands_confirmed": len(trips),
        "commands_failed": len(failures),
        "command_round_trip_ms": {"p50": ms(trips, 50), "p99": ms(trips, 99), "max": round(max(trips, default=0), 2)},
        "loop_lag_ms_max_per_cycle": {"p50": ms(lags, 50), "p99": ms(lags, 99), "max": round(max(lags, default=0), 2)},
        # The daemon's own p99 over its 100 ms lag samples, start-up included (its window is the last 5 min).
        "loop_lag_ms_p99_daemon_window": telemetry[-1]["gateway"]["loop_lag_ms_p99"] if telemetry else None,
        "cycles": len(telemetry),
        "missed_cycles": telemetry[-1]["gateway"]["missed_cycles"] if telemetry else None,
        "cycle_duration_ms": {"p50": ms(durations, 50), "p99": ms(durations, 99), "max": round(max(durations, default=0), 2)},
        "cycle_lateness_ms": {"p50": ms(lateness, 50), "p99": ms(lateness, 99), "max": round(max(lateness, default=0), 2)},
        "setpoints_fully_commanded": len(last_latencies),
        "setpoint_to_first_command_ms": {"p50": to_ms(first_latencies, 50), "p99": to_ms(first_latencies, 99)},
        "setpoint_to_each_command_ms": {"p50": to_ms(all_latencies, 50), "p99": to_ms(all_latencies, 99)},
        "setpoint_to_last_command_ms": {"p50": to_ms(last_latencies, 50), "p99": to_ms(last_latencies, 99),
                                        "max": round(1000 * max(last_latencies, default=0), 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=50)
    parser.add_argument("--cycle-s", type=float, default=2.0)
    parser.add_argument("--duration-s", type=float, default=90.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--sim-processes", type=int, default=2, help="processes the simulated units are spread over")
    parser.add_argument("--update-s", type=float, default=0.1, help="simulator tick: each unit sends P and Q this often")
    parser.add_argument("--gateway-cpus", default="", help="pin the gateway to these CPUs, e.g. 0 (default: not pinned)")
    parser.add_argument("--sim-cpus", default="", help="pin the simulators to these CPUs, e.g. 1 (default: not pinned)")
    args = parser.parse_args()
    if not 1 <= args.units <= 200 or not 10 <= args.duration_s <= 1800 or not 0.5 <= args.cycle_s <= 10:
        parser.error("--units 1..200, --duration-s 10..1800, --cycle-s 0.5..10")
    if not 1 <= args.sim_processes <= args.units or not 0.01 <= args.update_s <= 10:
        parser.error("--sim-processes 1..units, --update-s 0.01..10")
    cpus = lambda text: {int(c) for c in text.split(",") if c.strip()} or None  # noqa: E731
    result = asyncio.run(run(args.units, args.cycle_s, args.duration_s, args.warmup_s, args.sim_processes, args.update_s,
                             cpus(args.gateway_cpus), cpus(args.sim_cpus)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
