"""Benchmark: one gateway driving N simulated SunSpec inverters at a given cycle.

    python bench/gateway_bench.py --inverters 100 --cycle-s 2 --duration-s 90
    python bench/gateway_bench.py --inverters 100 --cycle-s 1 --duration-s 90

Three processes, as on a real site: the gateway (`flexedge run`, so its CPU and
memory are its own), the simulated inverters (bench/sim_host.py), and this one,
which runs a private Mosquitto and the VPP.
The VPP publishes a new setpoint every cycle, alternating between two
curtailment levels so that every setpoint changes every inverter's limit.

Prints: the daemon's CPU (% of one core) and memory (RSS) at steady state;
cycle duration and lateness (p50, p99, max) from the telemetry's `gateway`
block; the latency from a setpoint's publication to the register write seen
by the simulator, to the first and to the last of the N inverters (p50, p99);
and the event-loop lag the daemon reports.  Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

from edge.runtime.health import percentile  # noqa: E402
from simulators.vpp import VppSimulator  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pinned(cpus: set[int] | None):
    """A preexec_fn that pins the child process to `cpus` (None: any CPU, as scheduled)."""
    return None if not cpus else (lambda: os.sched_setaffinity(0, cpus))


def steal_s() -> float:
    """CPU time the hypervisor took from this VM (all cores), from /proc/stat."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8]) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return proc, port
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def profile_for(devices, broker_port: int, cycle_s: float, spool: Path) -> dict:
    return {
        "site": {"id": "bench"},
        "control": {"cycle_s": cycle_s, "setpoint_timeout_s": max(10.0, 5 * cycle_s)},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": broker_port}, "spool": {"path": str(spool), "max_mb": 256}},
        "assets": [
            {"id": f"inv{i:03d}", "kind": "pv", "driver": "sunspec", "host": "127.0.0.1", "port": d.port,
             "unit_id": d.unit_id, "timeout_s": 0.5}
            for i, d in enumerate(devices)
        ],
    }


class DeviceAt:
    def __init__(self, port: int):
        self.port, self.unit_id = port, 1


async def start_simulators(count: int, processes: int, workdir: Path) -> tuple[list[subprocess.Popen], list[DeviceAt]]:
    """Simulators in `processes` processes: real inverters answer in parallel, one Python process would not."""
    procs, readies = [], []
    sizes = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    for index, size in enumerate(sizes):
        ready = workdir / f"sim-ready-{index}.json"
        readies.append(ready)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "sim_host.py"), "--count", str(size),
                                       "--ready-file", str(ready), "--writes-file", str(workdir / f"sim-writes-{index}.json")]))
    for _ in range(300):
        if all(r.exists() and r.read_text() for r in readies):
            return procs, [DeviceAt(port) for r in readies for port in json.loads(r.read_text())["ports"]]
        await asyncio.sleep(0.05)
    raise RuntimeError("simulators did not start")


async def run(inverters: int, cycle_s: float, duration_s: float, warmup_s: float, sim_processes: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="flexedge-bench-"))
    mosquitto, port = await start_mosquitto(workdir)
    simulators, devices = await start_simulators(inverters, sim_processes, workdir)
    try:
        profile_path = workdir / "bench.yaml"
        profile_path.write_text(yaml.safe_dump(profile_for(devices, port, cycle_s, workdir / "spool.sqlite")))
        profiler = ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") else []
        daemon = subprocess.Popen([sys.executable, *profiler, "-m", "edge.cli", "run", str(profile_path), "--log-level", "warning"],
                                  stderr=open(workdir / "daemon.log", "wb"))
        try:
            async with VppSimulator("127.0.0.1", port, "flexedge", "bench", valid_s=max(10.0, 5 * cycle_s)) as vpp:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if vpp.telemetry and all(a["online"] for a in vpp.telemetry[-1]["assets"].values()):
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError("assets did not come online")
                await asyncio.sleep(warmup_s)
                first_seq = vpp.telemetry[-1]["seq"]
                cpu0, t0, steal0 = cpu_seconds(daemon.pid), time.monotonic(), steal_s()
                sends: list[float] = []
                level = 0
                next_send = time.monotonic()
                while time.monotonic() - t0 < duration_s:
                    # alternate between two curtailment levels so every inverter's limit changes
                    activation = -0.25 * 8.0 * inverters if level % 2 == 0 else -0.5 * 8.0 * inverters
                    level += 1
                    sent_at = time.monotonic()
                    await vpp.send_setpoint(activation, valid_s=max(10.0, 5 * cycle_s))
                    sends.append(sent_at)
                    next_send += cycle_s
                    await asyncio.sleep(max(0.0, next_send - time.monotonic()))
                cpu1, t1, steal1 = cpu_seconds(daemon.pid), time.monotonic(), steal_s()
                memory_mb = rss_mb(daemon.pid)
                await asyncio.sleep(1.0)
                telemetry = [t for t in vpp.telemetry if t["seq"] > first_seq]
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(15)
        for proc in simulators:
            proc.send_signal(signal.SIGTERM)
        for proc in simulators:
            proc.wait(15)
        writes_by_port: dict[int, list[float]] = {}
        for index in range(len(simulators)):
            for write_port, t_s, _point, _value in json.loads((workdir / f"sim-writes-{index}.json").read_text()):
                writes_by_port.setdefault(write_port, []).append(t_s)
        first_latencies, last_latencies, all_latencies = [], [], []
        for sent_at in sends:
            times = [next((t for t in sorted(ts) if t >= sent_at), None) for ts in writes_by_port.values()]
            if len(times) == inverters and None not in times:
                first_latencies.append(min(times) - sent_at)
                last_latencies.append(max(times) - sent_at)
                all_latencies.extend(t - sent_at for t in times)
    finally:
        for proc in (*simulators, mosquitto):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)

    durations = [t["gateway"]["cycle_duration_ms_last"] for t in telemetry if t["gateway"]["cycle_duration_ms_last"] is not None]
    lateness = [t["gateway"]["cycle_lateness_ms_last"] for t in telemetry if t["gateway"]["cycle_lateness_ms_last"] is not None]
    lags = [t["gateway"]["loop_lag_ms_max_since_last"] for t in telemetry]
    ms = lambda values, q: round(percentile(values, q), 2)  # noqa: E731
    return {
        "inverters": inverters,
        "simulator_processes": sim_processes,
        "cycle_s": cycle_s,
        "duration_s": round(t1 - t0, 1),
        "daemon_cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        # A VM's stolen time shows up as stalls no code of ours can prevent: report it beside the figures.
        "vm_steal_pct_of_machine": round(100 * (steal1 - steal0) / (t1 - t0) / (os.cpu_count() or 1), 1),
        "daemon_rss_mb": round(memory_mb, 1),
        "cycles": len(telemetry),
        "missed_cycles": telemetry[-1]["gateway"]["missed_cycles"] if telemetry else None,
        "cycle_duration_ms": {"p50": ms(durations, 50), "p99": ms(durations, 99), "max": round(max(durations, default=0), 2)},
        "cycle_lateness_ms": {"p50": ms(lateness, 50), "p99": ms(lateness, 99), "max": round(max(lateness, default=0), 2)},
        "loop_lag_ms_max_per_cycle": {"p50": ms(lags, 50), "p99": ms(lags, 99), "max": round(max(lags, default=0), 2)},
        **({"loop_lag_trace_ms": lags} if os.environ.get("BENCH_TRACE") else {}),
        "setpoints": len(sends),
        "setpoints_fully_written": len(last_latencies),
        "latency_to_first_write_ms": {"p50": round(1000 * percentile(first_latencies, 50), 1),
                                      "p99": round(1000 * percentile(first_latencies, 99), 1)},
        "latency_per_write_ms": {"p50": round(1000 * percentile(all_latencies, 50), 1),
                                 "p99": round(1000 * percentile(all_latencies, 99), 1)},
        "latency_to_last_write_ms": {"p50": round(1000 * percentile(last_latencies, 50), 1),
                                     "p99": round(1000 * percentile(last_latencies, 99), 1),
                                     "max": round(1000 * max(last_latencies, default=0), 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inverters", type=int, default=100)
    parser.add_argument("--cycle-s", type=float, default=2.0)
    parser.add_argument("--duration-s", type=float, default=90.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--sim-processes", type=int, default=2, help="processes the simulated inverters are spread over")
    args = parser.parse_args()
    if not 1 <= args.inverters <= 500 or not 10 <= args.duration_s <= 1800:
        parser.error("--inverters 1..500 and --duration-s 10..1800")
    result = asyncio.run(run(args.inverters, args.cycle_s, args.duration_s, args.warmup_s, args.sim_processes))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
