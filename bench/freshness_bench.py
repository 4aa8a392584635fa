"""Benchmark: how fresh the daemon's values are, and what it costs, next to the floor (issue #11).

    python bench/freshness_bench.py --cycle-s 1 --duration-s 60 --json /tmp/fresh-1s.json
    python bench/freshness_bench.py --cycle-s 2 --duration-s 60 --json /tmp/fresh-2s.json

Processes, all on loopback: a private Mosquitto; N simulated SunSpec PV
inverters (bench/sim_host.py, --sim-processes of them, 10 kW each, sun 8 kW,
ramp 0, --tick-on-write); the daemon (`flexedge run` on a generated profile,
its own process); the floor (bench/floor_poller.py, its own process: every
cycle it reads the same register spans of the same N inverters as the daemon,
decodes W and publishes ONE MQTT message, QoS 1: the lower bound of any
gateway); and this process, which subscribes to both (paho-mqtt, receive time
= time.monotonic() in the callback) and plays the VPP and the grid operator.

Phases, one after the other:

1. Value age and CPU (--duration-s).  No setpoint, no grid limit: the
   inverters are released and W follows sun_kw at once.  The simulators change
   the sun of a random subset of inverters every 0.3-0.7 s to a value that
   device never had (10 W steps, W = sun exactly), each device at most once per
   2.5 cycles + 1.5 s, and record (port, time.monotonic(), the new W register
   value).  For each change: the first daemon telemetry message whose asset
   p_kw (x 1000) equals it, and the first floor message whose W equals it; the
   age is its arrival minus the change (time.monotonic() is one clock for
   every process on Linux).  A change not seen before the device's next change
   counts as missed (the sun stays put for 2 cycles + 2 s after the window, then
   goes back to 8 kW).  CPU % of one core of the daemon and of the floor over the
   same window, from /proc/<pid>/stat (utime + stime, all threads).  The floor
   is stopped after this phase.
2. Setpoints (--setpoint-duration-s), as bench/gateway_bench.py: one setpoint
   per cycle alternating between two curtailment levels (25 % and 50 % of the
   site's 8 kW x N); latency from the publish call to each inverter's first
   WMaxLimPct write after it, to the first and to the last of the N.
3. DEIE (--deie-orders, 0 skips it).  The daemon is restarted on the same
   profile plus `grid.deie` (server role on loopback, installed_kw = N x 10,
   limits in kW); simulators/deie.py's DeieOperator connects as the grid
   operator.  Each order: at a random phase of the cycle, an export limit of
   40-75 % of the site's power in the latest telemetry; then, a cycle or two
   later, at a random phase again, the lift (p_limit_end).  "Obeyed" is the
   last of the N inverters' first WMaxLimPct write after the order (simulator
   time.monotonic(), W follows at once with --tick-on-write).  Checked: the
   FIRST daemon telemetry received after that moment - does its site.p_kw show
   the site at or under the limit (+ --tolerance-kw)?  Also: ms from the order
   to the first telemetry that complies, to the positive ACT_CON, to
   "obeyed", and to the first p_measured report to the station that complies
   (DeieOperator records each report's arrival, time.monotonic()).  Lifts: ms
   to the last release write and to the first telemetry back at the power
   before the order.

Prints a summary table (and the figures as JSON with --json FILE).  The
machine is shared and noisy: the daemon/floor ratios, measured in the same
window, are the figures that count; the load average and the VM's steal are
printed beside them.  Bounded in time (every wait has a deadline, the helper
processes stop on their own); every process and the work directory are
cleaned up on exit, error, Ctrl-C or SIGTERM (--keep keeps the directory).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import ctypes
import getpass
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import cpu_seconds, free_port, rss_mb, steal_s  # noqa: E402
from bench.iec104_bench import machine_busy_s, stop_process  # noqa: E402
from edge.runtime.health import percentile  # noqa: E402
from simulators.vpp import VppSimulator  # noqa: E402

PV_KW, SUN_KW = 10.0, 8.0
SITE, PREFIX = "bench", "flexedge"
FLOOR_TOPIC = "flexedge-floor/bench/values"
LIMIT_POINTS = "WMaxLimPct,WMaxLimPctEna"
READY_TIMEOUT_S = 60.0
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: a killed bench leaves nothing behind


class Procs:
    """The helper processes: own session (Ctrl-C reaches only the bench, which stops them), killed with it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.running: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        log.close()
        self.running[name] = proc
        return proc

    def stop(self, name: str, timeout_s: float = 15.0) -> None:
        proc = self.running.pop(name, None)
        if proc is not None:
            stop_process(proc, timeout_s)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name, 10.0)

    def check(self, *names: str) -> None:
        for name in names:
            proc = self.running.get(name)
            if proc is not None and proc.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")


class Monitor:
    """Subscribes to the daemon's telemetry and events and to the floor's topic; notes each arrival."""

    def __init__(self, broker_port: int):
        self.broker_port = broker_port
        self.telemetry: list[tuple[float, dict]] = []
        self.events: list[tuple[float, dict]] = []
        self.floor: list[tuple[float, dict]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"freshness-monitor-{os.getpid()}")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self._lists = {f"{PREFIX}/{SITE}/telemetry": self.telemetry, f"{PREFIX}/{SITE}/events": self.events,
                       FLOOR_TOPIC: self.floor}

    def _on_connect(self, client, _userdata, _flags, _reason, _properties) -> None:
        client.subscribe([(topic, 1) for topic in self._lists])

    def _on_message(self, _client, _userdata, message) -> None:
        t = time.monotonic()
        try:
            self._lists[message.topic].append((t, json.loads(message.payload)))
        except (KeyError, ValueError):
            pass

    async def start(self) -> None:
        self.client.connect("127.0.0.1", self.broker_port, keepalive=30)
        self.client.loop_start()
        if not await asyncio.to_thread(self._subscribed.wait, 10):
            raise RuntimeError("monitor: not subscribed within 10 s")

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def latest(self, since: float = 0.0) -> dict | None:
        return self.telemetry[-1][1] if self.telemetry and self.telemetry[-1][0] >= since else None


async def wait_for(probe, timeout_s: float, what: str, procs: Procs, *names: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        procs.check(*names)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s:g} s")
        await asyncio.sleep(0.1)


def profile_for(ports: list[int], broker_port: int, cycle_s: float, spool: Path, deie_port: int | None = None) -> dict:
    profile = {
        "site": {"id": SITE},
        "control": {"cycle_s": cycle_s, "setpoint_timeout_s": max(10.0, 5 * cycle_s)},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": broker_port, "topic_prefix": PREFIX},
                   "spool": {"path": str(spool), "max_mb": 256}},
        "assets": [{"id": f"inv{i:03d}", "kind": "pv", "driver": "sunspec", "host": "127.0.0.1", "port": port,
                    "unit_id": 1, "timeout_s": 0.5} for i, port in enumerate(ports)],
    }
    if deie_port is not None:
        profile["grid"] = {"deie": {"role": "server", "host": "127.0.0.1", "port": deie_port,
                                    "installed_kw": PV_KW * len(ports), "limit_unit": "kw"}}
    return profile


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def stats_ms(values_s: list[float]) -> dict:
    if not values_s:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    return {"n": len(values_s), **{f"p{q}": round(1000 * percentile(values_s, q), 1) for q in (50, 90, 99)},
            "max": round(1000 * max(values_s), 1)}


def ratio(a, b) -> float | None:
    return round(a / b, 2) if a is not None and b else None


# -- analysis -----------------------------------------------------------------------


def value_ages(changes: list[list], series: list[tuple[float, dict[int, float]]], horizon_s: float) -> dict:
    """Per change (port, t, W): the first message of `series` after t that shows W for that port."""
    times = [t for t, _ in series]
    next_change: dict[tuple[int, float], float] = {}
    by_port: dict[int, list[float]] = {}
    for port, t, _ in changes:
        by_port.setdefault(port, []).append(t)
    for port, ts in by_port.items():
        ts.sort()
        for a, b in zip(ts, ts[1:] + [float("inf")]):
            next_change[(port, a)] = b
    ages, missed, superseded, examples = [], 0, 0, []
    for port, t_change, watts in changes:
        until = min(next_change[(port, t_change)], t_change + horizon_s)
        found = None
        for i in range(bisect.bisect_right(times, t_change), len(series)):
            t_msg, values = series[i]
            if t_msg > until + horizon_s:
                break
            value = values.get(port)
            if value is not None and abs(value - watts) < 0.5:
                found = t_msg
                break
        if found is None:
            missed += 1
            superseded += next_change[(port, t_change)] < t_change + horizon_s
            if len(examples) < 5:  # what the next messages showed instead
                start = bisect.bisect_left(times, t_change - 2 * horizon_s / 3)
                examples.append({"port": port, "w": watts, "shown": [
                    [round(1000 * (t - t_change), 1), v.get(port)] for t, v in series[start:start + 8]]})
        else:
            ages.append(found - t_change)
    return {**stats_ms(ages), "changes": len(changes), "missed": missed, "missed_superseded": superseded,
            "missed_examples": examples}


def first_writes(writes: list[list], point: str, start: float, end: float, value=None) -> dict[int, float]:
    """Each port's first write of `point` (with `value` if given) in [start, end)."""
    firsts: dict[int, float] = {}
    for port, t, name, written in writes:
        if name == point and written is not None and start <= t < end and (value is None or written == value):
            if port not in firsts or t < firsts[port]:
                firsts[port] = t
    return firsts


def setpoint_latencies(sends: list[float], writes: list[list], count: int, end: float) -> dict:
    first, each, last = [], [], []
    for sent_at, next_at in zip(sends, sends[1:] + [end]):
        arrivals = first_writes(writes, "WMaxLimPct", sent_at, next_at)
        if len(arrivals) == count:
            delays = [t - sent_at for t in arrivals.values()]
            first.append(min(delays))
            last.append(max(delays))
            each.extend(delays)
    return {"setpoints": len(sends), "fully_written": len(last), "to_first_write_ms": stats_ms(first),
            "to_each_write_ms": stats_ms(each), "to_last_write_ms": stats_ms(last)}


def deie_figures(orders: list[dict], writes: list[list], telemetry: list[tuple[float, dict]], station: list,
                 count: int, tolerance_kw: float) -> list[dict]:
    times = [t for t, _ in telemetry]
    rows = []
    for order in orders:
        limit, t_order, t_lift = order["limit_kw"], order["t_order"], order["t_lift"]
        ceiling = limit + tolerance_kw
        row = {"limit_kw": limit, "p_before_kw": order["p_before_kw"], "confirmation": order["confirmation"],
               "act_con_ms": round(1000 * (order["t_confirmed"] - t_order), 1)}
        firsts = first_writes(writes, "WMaxLimPct", t_order, t_lift)
        row["inverters_written"] = len(firsts)
        obeyed = max(firsts.values()) if firsts else None
        row["obeyed_ms"] = round(1000 * (obeyed - t_order), 1) if obeyed is not None else None
        row["first_telemetry_after_obeyed"] = None
        if obeyed is not None:
            i = bisect.bisect_right(times, obeyed)
            if i < len(telemetry):
                t_msg, message = telemetry[i]
                p = message["site"]["p_kw"]
                row["first_telemetry_after_obeyed"] = {
                    "after_obeyed_ms": round(1000 * (t_msg - obeyed), 1), "site_p_kw": p,
                    "compliant": p is not None and p <= ceiling,
                    "grid_orders_export_limit_kw": message.get("grid_orders", {}).get("export_limit_kw")}
        compliant = next((t for t, m in telemetry[bisect.bisect_right(times, t_order):]
                          if t < t_lift and m["site"]["p_kw"] is not None and m["site"]["p_kw"] <= ceiling), None)
        row["first_compliant_telemetry_ms"] = round(1000 * (compliant - t_order), 1) if compliant else None
        row["telemetry_before_compliant"] = sum(1 for t in times if t_order < t < (compliant or t_lift))
        reports = [m for m in station if m.signal == "p_measured" and t_order <= m.received_at < t_lift]
        station_ok = next((m for m in reports if m.value <= ceiling), None)
        row["station_p_compliant_ms"] = round(1000 * (station_ok.received_at - t_order), 1) if station_ok else None
        row["station_p_reports"] = [[round(1000 * (m.received_at - t_order), 1), round(m.value, 2), m.cot]
                                    for m in reports]
        # the lift: release writes, then the power before the order again
        t_next = order["t_next"]
        releases = first_writes(writes, "WMaxLimPctEna", t_lift, t_next, value=0)
        released = max(releases.values()) if len(releases) else None
        row["lift"] = {"confirmation": order["lift_confirmation"], "inverters_released": len(releases),
                       "released_ms": round(1000 * (released - t_lift), 1) if released else None}
        back = next((t for t, m in telemetry[bisect.bisect_right(times, t_lift):]
                     if t < t_next and m["site"]["p_kw"] is not None
                     and m["site"]["p_kw"] >= order["p_before_kw"] - tolerance_kw), None)
        row["lift"]["first_telemetry_back_ms"] = round(1000 * (back - t_lift), 1) if back else None
        if released is not None:
            i = bisect.bisect_right(times, released)
            if i < len(telemetry) and telemetry[i][0] < t_next:
                p = telemetry[i][1]["site"]["p_kw"]
                row["lift"]["first_telemetry_after_released_shows_it"] = (
                    p is not None and p >= order["p_before_kw"] - tolerance_kw)
        rows.append(row)
    return rows


# -- the run ------------------------------------------------------------------------


async def start_mosquitto(procs: Procs, workdir: Path) -> int:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # `user`: as root, mosquitto would switch to its own user, which clears PR_SET_PDEATHSIG
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
                    f"user {getpass.getuser()}\n")
    procs.spawn("mosquitto", [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)])

    def listening() -> bool:
        import socket
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    await wait_for(listening, 10, "mosquitto", procs, "mosquitto")
    return port


def telemetry_between(monitor: Monitor, start: float, end: float) -> list[tuple[float, dict]]:
    return [(t, m) for t, m in list(monitor.telemetry) if start <= t < end]


def all_online(message: dict | None, count: int) -> bool:
    return (message is not None and len(message["assets"]) == count
            and all(a["online"] and a["p_kw"] is not None for a in message["assets"].values()))


async def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="flexedge-freshness-"))
    print(f"work directory {workdir}", file=sys.stderr)
    procs = Procs(workdir)
    monitor: Monitor | None = None
    rng = random.Random(args.seed)
    n, cycle = args.inverters, args.cycle_s
    expected_s = 3 * READY_TIMEOUT_S + args.warmup_s + args.duration_s + args.setpoint_duration_s \
        + args.deie_orders * (6 * cycle + 10) + 120
    result: dict = {"command": " ".join(sys.argv), "inverters": n, "cycle_s": cycle,
                    "simulator_processes": args.sim_processes,
                    "load_avg_at_start": load_avg(), "uptime_at_start": uptime()}
    try:
        broker_port = await start_mosquitto(procs, workdir)
        monitor = Monitor(broker_port)
        await monitor.start()

        # -- simulators
        sizes = [n // args.sim_processes + (1 if i < n % args.sim_processes else 0) for i in range(args.sim_processes)]
        quiet_s = 2.5 * cycle + 1.5
        sims = [f"sim{i}" for i in range(len(sizes))]
        for i, size in enumerate(sizes):
            procs.spawn(sims[i], [sys.executable, str(ROOT / "bench/sim_host.py"), "--count", str(size),
                                  "--rated-kw", str(PV_KW), "--points", LIMIT_POINTS,
                                  "--ready-file", str(workdir / f"{sims[i]}-ready.json"),
                                  "--writes-file", str(workdir / f"{sims[i]}-writes.json"),
                                  "--sun-changes-file", str(workdir / f"{sims[i]}-sun.json"),
                                  "--sun-change-every-s", "0.3,0.7", "--sun-change-share", str(args.change_share),
                                  "--sun-change-quiet-s", str(quiet_s), "--seed", str(args.seed * 100 + i),
                                  "--tick-on-write", "--max-s", str(expected_s)])

        def sims_ready() -> bool:
            return all((workdir / f"{s}-ready.json").exists() and (workdir / f"{s}-ready.json").read_text()
                       for s in sims)

        await wait_for(sims_ready, READY_TIMEOUT_S, "simulators", procs, *sims)
        ports = [p for s in sims for p in json.loads((workdir / f"{s}-ready.json").read_text())["ports"]]
        port_of = {f"inv{i:03d}": port for i, port in enumerate(ports)}

        # -- the daemon
        profile_a = workdir / "site.yaml"
        profile_a.write_text(yaml.safe_dump(profile_for(ports, broker_port, cycle, workdir / "spool.sqlite")))
        daemon_cmd = [sys.executable, "-m", "edge.cli", "run"]
        started = time.monotonic()
        daemon = procs.spawn("daemon", [*daemon_cmd, str(profile_a), "--log-level", "warning"])
        await wait_for(lambda: all_online(monitor.latest(started), n), READY_TIMEOUT_S, "every inverter online",
                       procs, "daemon", *sims)
        discovered = [e["detail"] for _, e in monitor.events if e.get("type") == "models_discovered"]
        polled = sorted({m for d in discovered for m in d.get("polled_model_ids", [])})
        daemon_requests = sorted({d.get("requests_per_cycle") for d in discovered})
        result["daemon_discovery"] = {"events": len(discovered), "polled_model_ids": polled,
                                      "requests_per_cycle": daemon_requests}

        # -- the floor
        floor_ready = workdir / "floor-ready.json"
        floor = procs.spawn("floor", [sys.executable, str(ROOT / "bench/floor_poller.py"),
                                      "--ports", ",".join(map(str, ports)), "--broker-port", str(broker_port),
                                      "--topic", FLOOR_TOPIC, "--cycle-s", str(cycle), "--ready-file", str(floor_ready),
                                      *(["--models", ",".join(map(str, polled))] if polled else []),
                                      "--max-s", str(expected_s)])
        await wait_for(lambda: floor_ready.exists() and floor_ready.read_text() and monitor.floor, READY_TIMEOUT_S,
                       "the floor", procs, "floor")
        floor_plan = json.loads(floor_ready.read_text())
        result["floor_plan"] = floor_plan
        if daemon_requests and daemon_requests != [floor_plan["requests_per_cycle"]]:
            print(f"WARNING: the daemon reads in {daemon_requests} request(s) per cycle, the floor in "
                  f"{floor_plan['requests_per_cycle']}", file=sys.stderr)
        await asyncio.sleep(args.warmup_s)

        # -- phase 1: value age and CPU
        print(f"phase 1: value age and CPU, {args.duration_s:g} s", file=sys.stderr)
        others = {"mosquitto": procs.running["mosquitto"].pid, **{s: procs.running[s].pid for s in sims}}
        for s in sims:
            procs.running[s].send_signal(signal.SIGUSR1)
        t0, steal0, busy0 = time.monotonic(), steal_s(), machine_busy_s()
        cpu0 = {"daemon": cpu_seconds(daemon.pid), "floor": cpu_seconds(floor.pid),
                **{k: cpu_seconds(pid) for k, pid in others.items()}}
        await asyncio.sleep(args.duration_s)
        cpu1 = {"daemon": cpu_seconds(daemon.pid), "floor": cpu_seconds(floor.pid),
                **{k: cpu_seconds(pid) for k, pid in others.items()}}
        t1, steal1, busy1 = time.monotonic(), steal_s(), machine_busy_s()
        for s in sims:
            procs.running[s].send_signal(signal.SIGUSR2)
        result["daemon_rss_mb"] = round(rss_mb(daemon.pid), 1)
        result["load_avg_after_age_phase"] = load_avg()
        await asyncio.sleep(2 * cycle + 2)  # the last changes reach both
        t_age_end = time.monotonic()
        procs.check("daemon", "floor")
        procs.stop("floor")
        for s in sims:
            procs.running[s].send_signal(signal.SIGHUP)  # every inverter back at 8 kW
        window = t1 - t0
        cpu = {k: round(100 * (cpu1[k] - cpu0[k]) / window, 1) for k in cpu0}
        result["age_window_s"] = round(window, 1)
        result["cpu_pct_of_one_core"] = cpu
        result["cpu_ratio_daemon_floor"] = ratio(cpu["daemon"], cpu["floor"])
        result["vm_steal_pct_of_machine"] = round(100 * (steal1 - steal0) / window / (os.cpu_count() or 1), 1)
        result["machine_busy_pct_of_machine"] = round(100 * (busy1 - busy0) / window / (os.cpu_count() or 1), 1)
        age_telemetry = telemetry_between(monitor, t0, t_age_end)
        result["age_phase_telemetry"] = {
            "messages": len(age_telemetry),
            "curtailed": sum(1 for _, m in age_telemetry if m["mode"] != "idle"
                             or any(a.get("setpoint_kw") is not None for a in m["assets"].values())),
            "floor_messages": sum(1 for t, _ in monitor.floor if t0 <= t < t_age_end),
            "floor_read_ms": stats_ms([m["read_ms"] / 1000 for t, m in monitor.floor if t0 <= t < t_age_end]),
            "floor_read_errors": sum(m["errors"] for t, m in monitor.floor if t0 <= t < t_age_end)}

        # -- phase 2: setpoints
        sends: list[float] = []
        if args.setpoint_duration_s > 0:
            print(f"phase 2: setpoints, {args.setpoint_duration_s:g} s", file=sys.stderr)
            await asyncio.sleep(2 * cycle)  # every inverter polled at 8 kW again
            async with VppSimulator("127.0.0.1", broker_port, PREFIX, SITE, valid_s=max(10.0, 5 * cycle)) as vpp:
                t_sp = next_send = time.monotonic()
                level = 0
                while time.monotonic() - t_sp < args.setpoint_duration_s:
                    activation = -(0.25 if level % 2 == 0 else 0.5) * SUN_KW * n
                    level += 1
                    sent_at = time.monotonic()
                    await vpp.send_setpoint(activation, valid_s=max(10.0, 5 * cycle))
                    sends.append(sent_at)
                    next_send += cycle
                    await asyncio.sleep(max(0.0, next_send - time.monotonic()))
                t_sp_end = time.monotonic() + 0.5
                await asyncio.sleep(0.5)
                result["setpoint_acks"] = {"accepted": vpp.acks_accepted, "rejected": vpp.acks_rejected}
        procs.check("daemon")
        procs.stop("daemon")  # releases every inverter

        # -- phase 3: DEIE
        orders: list[dict] = []
        station: list = []
        deie_window = (0.0, 0.0)
        if args.deie_orders > 0:
            print(f"phase 3: DEIE, {args.deie_orders} limit orders", file=sys.stderr)
            from drivers.deie.config import load_template
            from simulators.deie import DeieOperator

            deie_port = free_port()
            profile_b = workdir / "site-deie.yaml"
            profile_b.write_text(yaml.safe_dump(profile_for(ports, broker_port, cycle, workdir / "spool-deie.sqlite",
                                                            deie_port)))
            started = time.monotonic()
            daemon = procs.spawn("daemon-deie", [*daemon_cmd, str(profile_b), "--log-level", "warning"])
            full_kw = 0.99 * SUN_KW * n

            def released() -> bool:
                latest = monitor.latest(started)
                return all_online(latest, n) and latest["site"]["p_kw"] >= full_kw

            # a device whose release was lost returns on its own when its revert timer (60 s) runs out
            await wait_for(released, READY_TIMEOUT_S + 20, "every inverter online and released", procs, "daemon-deie")
            async with DeieOperator(port=deie_port, points=load_template("deie"), command_timeout_s=2.0) as operator:
                await asyncio.sleep(cycle)
                deie_window = (time.monotonic(), 0.0)
                for _ in range(args.deie_orders):
                    await asyncio.sleep(rng.uniform(0.5, 0.5 + cycle))
                    p_before = monitor.latest()["site"]["p_kw"]
                    limit = round(p_before * rng.uniform(0.40, 0.75), 1)
                    t_order = time.monotonic()
                    confirmation = await operator.send_limit_kw(limit)
                    t_confirmed = time.monotonic()
                    ceiling = limit + args.tolerance_kw

                    def complied() -> bool:
                        return any(t > t_order and m["site"]["p_kw"] is not None and m["site"]["p_kw"] <= ceiling
                                   for t, m in monitor.telemetry[-5:])

                    try:
                        await wait_for(complied, 4 * cycle + 3, "compliant telemetry", procs, "daemon-deie")
                    except RuntimeError as error:
                        print(f"WARNING: limit {limit} kW: {error}", file=sys.stderr)
                    await asyncio.sleep(rng.uniform(cycle, 2 * cycle))
                    t_lift = time.monotonic()
                    lift_confirmation = await operator.send_limit(None)

                    def back() -> bool:
                        return any(t > t_lift and m["site"]["p_kw"] is not None
                                   and m["site"]["p_kw"] >= p_before - args.tolerance_kw
                                   for t, m in monitor.telemetry[-5:])

                    try:
                        await wait_for(back, 4 * cycle + 3, "telemetry back at full power", procs, "daemon-deie")
                    except RuntimeError as error:
                        print(f"WARNING: lift after {limit} kW: {error}", file=sys.stderr)
                    await asyncio.sleep(cycle)
                    orders.append({"limit_kw": limit, "p_before_kw": p_before, "t_order": t_order,
                                   "t_confirmed": t_confirmed, "confirmation": confirmation.value, "t_lift": t_lift,
                                   "lift_confirmation": lift_confirmation.value})
                for order, following in zip(orders, orders[1:] + [None]):
                    order["t_next"] = following["t_order"] if following else time.monotonic()
                deie_window = (deie_window[0], time.monotonic())
                station = list(operator.history)
            procs.check("daemon-deie")
            procs.stop("daemon-deie")

        # -- the simulators' records
        for s in sims:
            procs.stop(s, 30)
        changes = [c for s in sims for c in json.loads((workdir / f"{s}-sun.json").read_text())]
        writes = [w for s in sims for w in json.loads((workdir / f"{s}-writes.json").read_text())]
        result["load_avg_at_end"] = load_avg()
        result["uptime_at_end"] = uptime()
    finally:
        if monitor is not None:
            monitor.stop()
        procs.stop_all()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    # -- figures
    horizon_s = 3 * cycle + 3
    changes = sorted((c for c in changes if t0 <= c[1] <= t1), key=lambda c: c[1])
    daemon_series = [(t, {port_of[a]: v["p_kw"] * 1000 for a, v in m["assets"].items() if v["p_kw"] is not None})
                     for t, m in age_telemetry]
    floor_series = [(t, {int(p): w for p, w in m["w"].items() if w is not None})
                    for t, m in monitor.floor if t0 <= t < t_age_end]
    daemon_age, floor_age = value_ages(changes, daemon_series, horizon_s), value_ages(changes, floor_series, horizon_s)
    result["value_age_ms"] = {"daemon": daemon_age, "floor": floor_age,
                              "ratio_daemon_floor": {q: ratio(daemon_age[q], floor_age[q]) for q in ("p50", "p90", "p99")}}
    if sends:
        result["setpoint_to_write"] = setpoint_latencies(sends, writes, n, t_sp_end)
    if orders:
        rows = deie_figures(orders, writes, telemetry_between(monitor, *deie_window), station, n, args.tolerance_kw)
        after = [r["first_telemetry_after_obeyed"] for r in rows if r["first_telemetry_after_obeyed"]]
        result["deie"] = {
            "tolerance_kw": args.tolerance_kw, "orders": rows,
            "first_telemetry_after_obeyed_compliant": f"{sum(a['compliant'] for a in after)}/{len(rows)}",
            "first_compliant_telemetry_ms": stats_ms([r["first_compliant_telemetry_ms"] / 1000 for r in rows
                                                      if r["first_compliant_telemetry_ms"] is not None]),
            "station_p_compliant_ms": stats_ms([r["station_p_compliant_ms"] / 1000 for r in rows
                                                if r["station_p_compliant_ms"] is not None])}
    return result


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return load_avg()


def summary(r: dict) -> str:
    def f(value, unit="") -> str:
        return "-" if value is None else f"{value:g}{unit}"

    age, cpu = r["value_age_ms"], r["cpu_pct_of_one_core"]
    lines = [
        f"freshness bench: {r['inverters']} SunSpec inverters, cycle {r['cycle_s']:g} s, "
        f"age/CPU window {r['age_window_s']:g} s, {r['simulator_processes']} simulator processes",
        f"machine: {r['uptime_at_start']} (start); load avg after the age phase {r['load_avg_after_age_phase']}; "
        f"VM steal {r['vm_steal_pct_of_machine']:g} %, machine busy {r['machine_busy_pct_of_machine']:g} % of 2 cores",
        f"reads per cycle per inverter: daemon {r['daemon_discovery']['requests_per_cycle']} request(s), models "
        f"{r['daemon_discovery']['polled_model_ids']}; floor {r['floor_plan']['requests_per_cycle']} "
        f"({r['floor_plan']['spans']})",
        "",
        f"{'':34} {'daemon':>10} {'floor':>10} {'daemon/floor':>13}  target",
    ]
    for q in ("p50", "p90", "p99"):
        target = "<= 1.3" if q == "p50" else ""
        lines.append(f"{'value age ' + q + ' (ms)':34} {f(age['daemon'][q]):>10} {f(age['floor'][q]):>10} "
                     f"{f(age['ratio_daemon_floor'][q], 'x'):>13}  {target}")
    seen = [f"{age[k]['n']}/{age[k]['missed']}" for k in ("daemon", "floor")]
    lines.append(f"{'changes seen/missed':34} {seen[0]:>10} {seen[1]:>10}")
    lines.append(f"{'CPU, % of one core':34} {f(cpu['daemon']):>10} {f(cpu['floor']):>10} "
                 f"{f(r['cpu_ratio_daemon_floor'], 'x'):>13}  <= 2")
    lines.append(f"{'  (simulators, mosquitto)':34} " + ", ".join(f"{k} {v:g}" for k, v in cpu.items()
                                                                  if k not in ("daemon", "floor")))
    tel = r["age_phase_telemetry"]
    lines.append(f"{'  floor read of all, p50 / p99 ms':34} {f(tel['floor_read_ms']['p50'])} / "
                 f"{f(tel['floor_read_ms']['p99'])}; read errors {tel['floor_read_errors']}; "
                 f"daemon telemetry with a setpoint during the window: {tel['curtailed']}")
    if "setpoint_to_write" in r:
        sp = r["setpoint_to_write"]
        lines += ["", f"setpoint -> last of {r['inverters']} writes: p50 {f(sp['to_last_write_ms']['p50'])} ms, "
                      f"p99 {f(sp['to_last_write_ms']['p99'])} ms (target p99 < 50), max {f(sp['to_last_write_ms']['max'])}"
                      f"; -> first p50/p99 {f(sp['to_first_write_ms']['p50'])} / {f(sp['to_first_write_ms']['p99'])} ms"
                      f"; {sp['fully_written']}/{sp['setpoints']} setpoints fully written"]
    if "deie" in r:
        d = r["deie"]
        lines += ["", f"DEIE export-limit orders (tolerance {d['tolerance_kw']:g} kW); times in ms after the order:",
                  f"{'limit kW':>9} {'P before':>9} {'ACT_CON':>8} {'obeyed':>7} {'written':>7} "
                  f"{'1st telemetry after obeyed':>27} {'1st compliant':>13} {'station P ok':>12} "
                  f"{'lift: released / back':>22}"]
        for row in d["orders"]:
            first = row["first_telemetry_after_obeyed"]
            shown = (f"{first['site_p_kw']:g} kW {'yes' if first['compliant'] else 'NO'} (+{first['after_obeyed_ms']:g})"
                     if first else "-")
            lift = row["lift"]
            lines.append(f"{row['limit_kw']:>9g} {row['p_before_kw']:>9g} {f(row['act_con_ms']):>8} "
                         f"{f(row['obeyed_ms']):>7} {row['inverters_written']:>7} {shown:>27} "
                         f"{f(row['first_compliant_telemetry_ms']):>13} {f(row['station_p_compliant_ms']):>12} "
                         f"{f(lift['released_ms']) + ' / ' + f(lift['first_telemetry_back_ms']):>22}")
        lines.append(f"first telemetry after the inverters obeyed showed compliance: "
                     f"{d['first_telemetry_after_obeyed_compliant']}; first compliant telemetry p50 "
                     f"{f(d['first_compliant_telemetry_ms']['p50'])} ms, max {f(d['first_compliant_telemetry_ms']['max'])}"
                     f" ms; station P compliant p50 {f(d['station_p_compliant_ms']['p50'])} ms")
    lines.append(f"machine at the end: {r.get('uptime_at_end', '-')}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inverters", type=int, default=100)
    parser.add_argument("--cycle-s", type=float, default=2.0)
    parser.add_argument("--duration-s", type=float, default=60.0, help="the value-age and CPU window")
    parser.add_argument("--setpoint-duration-s", type=float, default=30.0, help="the setpoint phase (0 skips it)")
    parser.add_argument("--deie-orders", type=int, default=5, help="DEIE limit orders, each lifted again (0 skips)")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--sim-processes", type=int, default=2, choices=(1, 2))
    parser.add_argument("--change-share", type=float, default=0.06,
                        help="share of a simulator's inverters whose sun changes every 0.3-0.7 s")
    parser.add_argument("--tolerance-kw", type=float, default=1.0, help="site power this much above the limit complies")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, profiles, records)")
    args = parser.parse_args()
    if not 1 <= args.inverters <= 500 or not 10 <= args.duration_s <= 1800 or not 0.5 <= args.cycle_s <= 10:
        parser.error("--inverters 1..500, --duration-s 10..1800, --cycle-s 0.5..10")
    if not 0 <= args.setpoint_duration_s <= 1800 or not 0 <= args.deie_orders <= 50:
        parser.error("--setpoint-duration-s 0..1800, --deie-orders 0..50")

    async def main_task() -> dict:
        # SIGTERM ends the run like Ctrl-C: cancelled, cleaned up
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        return await run(args)

    try:
        result = asyncio.run(main_task())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; helper processes stopped, work directory removed", file=sys.stderr)
        return 130
    print(summary(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
