"""Benchmark: the gateway as OCPP local controller of N chargers proxied to a CPO backend (issue #14).

    python bench/ocpp_proxy_bench.py --chargers 200 --duration-s 60 [--gateway-cpus 0 --sim-cpus 1] [--json]

Processes, as on a site: the CPO backend (simulators.cpo_backend, in bench/ocpp_proxy_sim_host.py
backend), the gateway (`flexedge run` on a generated profile: N `driver: ocpp` chargers, half
1.6J and half 2.0.1, each with `upstream:` pointing at the backend), the stations (the same
script's `stations` mode, over --sim-processes processes), and this one, with a private
Mosquitto and the VPP.  Every EV is plugged in and charging, every station sends MeterValues
every --meter-interval-s; the VPP moves the limits every --setpoint-interval-s (each setpoint is
N SetChargingProfile from the gateway on the same links), and the backend sends a
SetChargingProfile to --backend-call-sample chargers every --backend-call-interval-s.

Latency, one clock (time.monotonic() is system-wide on Linux): charger -> backend, the backend's
receive time of each CALL minus the station's send time (matched by unique id, which the gateway
keeps); backend -> charger, the station's receive time of each backend CALL minus the backend's
send time.  The same is measured in a second, shorter run with the stations connected straight
to the backend (no gateway): the latency the gateway adds is the difference of the two
distributions (p50, p99, max).  With tshark installed (unless --no-capture), the time each CALL
spends in the gateway is also read off the wire (bench/wire_hops.py): the gateway alone, without
the simulators' own scheduling on a shared CPU.  --gateway-cpus / --sim-cpus pin the gateway and the
simulators (with this process) to CPUs of their own.  Also the gateway's CPU (% of one core), RSS, the loop lag and
cycle figures from its telemetry, and the messages it forwarded per second.  Loopback only;
every wait has a deadline; the children stop on their own (--max-run-s, the daemon on this
process's death).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import wire_hops  # noqa: E402
from bench.gateway_bench import cpu_seconds, free_port, pinned, rss_mb, start_mosquitto, steal_s  # noqa: E402
from bench.ocpp_bench import (EV_MAX_KW, site_profile, LEVELS, READY_TIMEOUT_S, all_charging, charger_ids,  # noqa: E402
                              raise_open_files_limit, wait_for)
from edge.runtime.health import percentile  # noqa: E402
from simulators.vpp import VppSimulator  # noqa: E402

HOST_SCRIPT = ROOT / "bench" / "ocpp_proxy_sim_host.py"
STOP_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1
SETPOINT_BURST_S = 0.5  # after a setpoint, the gateway sends N SetChargingProfile (about 0.4 s for 200, bench #13)


def gateway_child(cpus: set[int] | None):
    """The daemon's preexec_fn: SIGTERM when this bench dies (no gateway outlives it), pinned to `cpus`."""
    pin = pinned(cpus)

    def prepare() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if pin is not None:
            pin()
    return prepare


def profile_for(chargers, broker_port: int, ocpp_port: int, backend_url: str, cycle_s: float,
                setpoint_interval_s: float, workdir: Path) -> dict:
    # Security profile 1 toward the backend too: the bench measures forwarding, not TLS.
    return site_profile(broker_port, ocpp_port, cycle_s, setpoint_interval_s, workdir,
                        [{"id": asset_id, "kind": "ev_charger", "driver": "ocpp", "charge_point_id": cp_id,
                          "ocpp_version": version, "upstream": {"url": backend_url, "security_profile": 1}}
                         for asset_id, cp_id, version in chargers])


def start_backend(workdir: Path, tag: str, call_interval_s: float, call_sample: int,
                  max_run_s: float, cpus: set[int] | None) -> subprocess.Popen:
    return subprocess.Popen([
        sys.executable, str(HOST_SCRIPT), "backend", "--port-file", str(workdir / f"backend-{tag}.json"),
        "--records-file", str(workdir / f"backend-records-{tag}.json"), "--call-interval-s", str(call_interval_s),
        "--call-sample", str(call_sample), "--max-run-s", str(max_run_s)],
        stderr=open(workdir / f"backend-{tag}.log", "wb"), preexec_fn=pinned(cpus))


def start_stations(chargers, processes: int, url: str, tag: str, meter_interval_s: float, max_run_s: float,
                   workdir: Path, cpus: set[int] | None) -> list[subprocess.Popen]:
    """Stations over `processes` processes, 1.6 and 2.0.1 interleaved in each."""
    procs = []
    for index in range(processes):
        stations = [[cp_id, version] for n, (_, cp_id, version) in enumerate(chargers) if n % processes == index]
        (workdir / f"stations-{tag}-{index}.json").write_text(json.dumps(stations))
        procs.append(subprocess.Popen([
            sys.executable, str(HOST_SCRIPT), "stations", "--url", url,
            "--stations-file", str(workdir / f"stations-{tag}-{index}.json"),
            "--ready-file", str(workdir / f"ready-{tag}-{index}.json"),
            "--records-file", str(workdir / f"station-records-{tag}-{index}.json"),
            "--meter-interval-s", str(meter_interval_s), "--phase-s", str(index * meter_interval_s / processes / 2),
            "--ev-max-kw", str(EV_MAX_KW), "--max-run-s", str(max_run_s)],
            stderr=open(workdir / f"stations-{tag}-{index}.log", "wb"), preexec_fn=pinned(cpus)))
    return procs


async def backend_url_of(backend: subprocess.Popen, workdir: Path, tag: str) -> str:
    port_file = workdir / f"backend-{tag}.json"
    await wait_for(lambda: port_file.exists() and port_file.read_text(), 20.0, "CPO backend listening", (backend,))
    return json.loads(port_file.read_text())["url"]


async def stations_ready(stations, others, workdir: Path, tag: str, count: int) -> None:
    """Every station process reports its EVs charging; any process of the run exiting is a failure."""
    readies = [workdir / f"ready-{tag}-{i}.json" for i in range(len(stations))]
    await wait_for(lambda: all(r.exists() and r.read_text() for r in readies), READY_TIMEOUT_S,
                   f"{tag}: stations connected with EVs", (*stations, *others))
    charging = sum(json.loads(r.read_text())["charging"] for r in readies)
    if charging != count:
        raise RuntimeError(f"{tag}: only {charging} of {count} EVs charging (see the stations' logs)")


def stop_all(procs) -> None:
    """SIGTERM, then wait: each writes its records on the way out."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def latencies(workdir: Path, tag: str, processes: int, window: tuple[float, float], version_of: dict) -> dict:
    """Per direction, [(latency_s, version, action, sent_at, behind)] of the CALLs sent in the window (behind: a
    backend CALL that met a CALL of the gateway's own on the link); those never received."""
    backend = json.loads((workdir / f"backend-records-{tag}.json").read_text())
    station_sent, station_received, gateway_answered = {}, {}, {}
    for index in range(processes):
        records = json.loads((workdir / f"station-records-{tag}-{index}.json").read_text())
        station_sent.update({(cp, uid): (action, at) for cp, uid, action, at in records["sent"]})
        station_received.update({(cp, uid): at for cp, uid, _action, at in records["received"]})
        for cp, _uid, at in records["answered"]:
            gateway_answered.setdefault(cp, []).append(at)
    backend_received = {(cp, uid): at for cp, rec in backend.items() for _action, uid, at in rec["received"]}
    start, end = window
    up, up_lost, down, down_lost, round_trips = [], 0, [], 0, []
    for (cp, uid), (action, sent_at) in station_sent.items():
        if start <= sent_at < end:
            if (cp, uid) in backend_received:
                up.append((backend_received[cp, uid] - sent_at, version_of[cp], action, sent_at, False))
            else:
                up_lost += 1
    for cp, rec in backend.items():
        for action, uid, sent_at, answered_at in rec["sent"]:
            if start <= sent_at < end:
                if (cp, uid) in station_received:
                    received_at = station_received[cp, uid]
                    # OCPP's one CALL at a time: the station answered a CALL of the gateway's own while
                    # this one was on its way, so the gateway held it until that answer came.
                    behind = any(sent_at < at < received_at for at in gateway_answered.get(cp, ()))
                    down.append((received_at - sent_at, version_of[cp], action, sent_at, behind))
                else:
                    down_lost += 1
                if answered_at is not None:
                    round_trips.append(answered_at - sent_at)
    return {"up": up, "up_lost": up_lost, "down": down, "down_lost": down_lost, "round_trips": round_trips}


def pct_ms(values_s: list[float]) -> dict:
    return ms_stats([1000 * v for v in values_s])


def ms_stats(values_ms: list[float]) -> dict:
    return {"n": len(values_ms), "p50": round(percentile(values_ms, 50), 2), "p99": round(percentile(values_ms, 99), 2),
            "max": round(max(values_ms, default=0.0), 2)}


def summary(measured: dict, seconds: float) -> dict:
    up, down = measured["up"], measured["down"]
    return {
        "charger_to_backend_ms": pct_ms([x for x, *_ in up]),
        "charger_to_backend_ms_1_6": pct_ms([x for x, v, *_ in up if v == "1.6"]),
        "charger_to_backend_ms_2_0_1": pct_ms([x for x, v, *_ in up if v == "2.0.1"]),
        "charger_to_backend_ms_meter_values": pct_ms([x for x, _, a, *_ in up
                                                      if a in ("MeterValues", "TransactionEvent")]),
        "charger_calls_not_received": measured["up_lost"],
        "backend_to_charger_ms": pct_ms([x for x, *_ in down]),
        "backend_to_charger_ms_link_free": pct_ms([x for x, *_, behind in down if not behind]),
        "backend_to_charger_ms_behind_a_gateway_call": pct_ms([x for x, *_, behind in down if behind]),
        "backend_calls_not_received": measured["down_lost"],
        "backend_call_round_trip_ms": pct_ms(measured["round_trips"]),
        "calls_per_s": round((len(up) + len(down)) / seconds, 1),
    }


def burst_split(measured: dict, setpoints: list[float]) -> dict:
    """The latencies of CALLs sent within SETPOINT_BURST_S after a setpoint (while the gateway sends its N
    profiles) and of the others: where the tail comes from."""
    def in_burst(sent_at: float) -> bool:
        return any(0.0 <= sent_at - t < SETPOINT_BURST_S for t in setpoints)
    split = {}
    for direction, key in (("up", "charger_to_backend_ms"), ("down", "backend_to_charger_ms")):
        split[f"{key}_within_{SETPOINT_BURST_S:g}_s_of_a_setpoint"] = pct_ms(
            [x for x, _, _, at, _ in measured[direction] if in_burst(at)])
        split[f"{key}_between_setpoints"] = pct_ms([x for x, _, _, at, _ in measured[direction] if not in_burst(at)])
    return split


def in_gateway(hops: dict, setpoints_epoch: list[float]) -> dict:
    """The wire's figures (bench/wire_hops.py): each CALL's time in the gateway, ms; the charger's CALLs also
    split by when they came (within SETPOINT_BURST_S of a setpoint or not)."""
    up, down = hops["charger_to_backend"], hops["backend_to_charger"]
    in_burst = lambda at: any(0.0 <= at - t < SETPOINT_BURST_S for t in setpoints_epoch)  # noqa: E731
    return {
        "charger_to_backend": pct_ms([s for s, _ in up]),
        f"charger_to_backend_within_{SETPOINT_BURST_S:g}_s_of_a_setpoint": pct_ms([s for s, at in up if in_burst(at)]),
        "charger_to_backend_between_setpoints": pct_ms([s for s, at in up if not in_burst(at)]),
        "backend_to_charger": pct_ms([s for s, *_ in down]),
        "backend_to_charger_link_free": pct_ms([s for s, _, behind in down if not behind]),
        "backend_to_charger_behind_a_gateway_call": pct_ms([s for s, _, behind in down if behind]),
        "calls_not_matched": hops["unmatched"],
    }


def added(proxied: dict, direct: dict) -> dict:
    """Proxied minus direct, quantile by quantile; a backend CALL on a free link (none of the gateway's own
    in flight) against the direct run too, where every link is free."""
    pairs = (("charger_to_backend_ms", "charger_to_backend_ms"), ("backend_to_charger_ms", "backend_to_charger_ms"),
             ("backend_to_charger_ms_link_free", "backend_to_charger_ms"))
    return {key: {q: round(proxied[key][q] - direct[base][q], 2) for q in ("p50", "p99", "max")}
            for key, base in pairs}


async def direct_run(chargers, args, workdir: Path) -> dict:
    """Stations straight to the backend: the same path without the gateway."""
    count, tag = len(chargers), "direct"
    max_run_s = READY_TIMEOUT_S + args.warmup_s + args.direct_duration_s + 120
    backend = start_backend(workdir, tag, args.backend_call_interval_s, args.backend_call_sample, max_run_s,
                            args.sim_cpus)
    stations = []
    try:
        url = await backend_url_of(backend, workdir, tag)
        stations = start_stations(chargers, args.sim_processes, url, tag, args.meter_interval_s, max_run_s, workdir,
                                  args.sim_cpus)
        started = time.monotonic()
        await stations_ready(stations, (backend,), workdir, tag, count)
        ready_after_s = time.monotonic() - started
        await asyncio.sleep(args.warmup_s)
        cpu0, t0 = cpu_seconds(backend.pid), time.monotonic()
        await asyncio.sleep(args.direct_duration_s)
        cpu1, t1 = cpu_seconds(backend.pid), time.monotonic()
        await asyncio.sleep(1.0)  # the last CALLs of the window arrive
    finally:
        stop_all((*stations, backend))
    version_of = {cp_id: version for _, cp_id, version in chargers}
    result = summary(latencies(workdir, tag, args.sim_processes, (t0, t1), version_of), t1 - t0)
    result.update(all_charging_after_s=round(ready_after_s, 1), duration_s=round(t1 - t0, 1),
                  backend_cpu_pct_of_one_core=round(100 * (cpu1 - cpu0) / (t1 - t0), 1))
    return result


async def proxied_run(chargers, args, workdir: Path) -> dict:
    count, tag = len(chargers), "proxied"
    max_run_s = READY_TIMEOUT_S + args.warmup_s + args.duration_s + 120
    mosquitto, broker_port = await start_mosquitto(workdir)
    backend = start_backend(workdir, tag, args.backend_call_interval_s, args.backend_call_sample, max_run_s,
                            args.sim_cpus)
    stations, daemon, capture = [], None, None
    try:
        backend_url = await backend_url_of(backend, workdir, tag)
        ocpp_port = free_port()
        if args.capture:  # before the first connection: the dissector needs the websocket handshakes
            capture = wire_hops.Capture(workdir / "proxied.pcap", (ocpp_port, urlsplit(backend_url).port))
            await capture.start()
        profile_path = workdir / "bench.yaml"
        profile_path.write_text(yaml.safe_dump(profile_for(chargers, broker_port, ocpp_port, backend_url,
                                                           args.cycle_s, args.setpoint_interval_s, workdir)))
        with open(workdir / "daemon.log", "wb") as daemon_log:
            daemon = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(profile_path), "--log-level",
                                       "warning"], cwd=ROOT, stderr=daemon_log, preexec_fn=gateway_child(args.gateway_cpus))
        stations = start_stations(chargers, args.sim_processes, f"ws://127.0.0.1:{ocpp_port}/ocpp", tag,
                                  args.meter_interval_s, max_run_s, workdir, args.sim_cpus)
        valid_s = max(10.0, 5 * args.setpoint_interval_s)
        async with VppSimulator("127.0.0.1", broker_port, "flexedge", "bench", valid_s=valid_s) as vpp:
            started = time.monotonic()
            await stations_ready(stations, (backend, daemon), workdir, tag, count)
            await wait_for(lambda: vpp.telemetry and all_charging(vpp.telemetry[-1], count),
                           READY_TIMEOUT_S - (time.monotonic() - started), "every charger metered charging", (daemon,))
            ready_after_s = time.monotonic() - started
            await asyncio.sleep(args.warmup_s)
            band_up_kw = vpp.telemetry[-1]["site"]["band_up_kw"]
            first_seq = vpp.telemetry[-1]["seq"]
            cpu0, t0, steal0 = cpu_seconds(daemon.pid), time.monotonic(), steal_s()
            backend_cpu0 = cpu_seconds(backend.pid)
            sends: list[float] = []
            next_send = t0
            while time.monotonic() - t0 < args.duration_s:
                sends.append(time.monotonic())
                await vpp.send_setpoint(LEVELS[len(sends) % 2] * band_up_kw, valid_s=valid_s)
                next_send += args.setpoint_interval_s
                await asyncio.sleep(max(0.0, next_send - time.monotonic()))
            cpu1, t1, steal1 = cpu_seconds(daemon.pid), time.monotonic(), steal_s()
            backend_cpu1 = cpu_seconds(backend.pid)
            memory_mb = rss_mb(daemon.pid)
            await asyncio.sleep(1.0)
            telemetry = [t for t in vpp.telemetry if t["seq"] > first_seq]
            events = list(vpp.events)
            rejected = vpp.acks_rejected
        stop_all((*stations, backend))
    finally:
        if daemon is not None:
            stop_all((daemon,))
        stop_all((*stations, backend, mosquitto))
        if capture is not None:
            capture.stop()
    version_of = {cp_id: version for _, cp_id, version in chargers}
    measured = latencies(workdir, tag, args.sim_processes, (t0, t1), version_of)
    result = summary(measured, t1 - t0)
    result.update(burst_split(measured, sends))
    if capture is not None:
        epoch_offset_s = time.time() - time.monotonic()
        result["in_gateway_ms"] = in_gateway(wire_hops.hops(capture.path, ocpp_port, urlsplit(backend_url).port,
                                                            (t0 + epoch_offset_s, t1 + epoch_offset_s)),
                                             [t + epoch_offset_s for t in sends])
    gateway = [t["gateway"] for t in telemetry]
    durations = [g["cycle_duration_ms_last"] for g in gateway if g["cycle_duration_ms_last"] is not None]
    lateness = [g["cycle_lateness_ms_last"] for g in gateway if g["cycle_lateness_ms_last"] is not None]
    lags = [g["loop_lag_ms_max_since_last"] for g in gateway]
    result.update({
        "all_charging_after_s": round(ready_after_s, 1),
        "duration_s": round(t1 - t0, 1),
        "setpoints": len(sends),
        "setpoints_rejected": rejected,
        "gateway_cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "gateway_rss_mb": round(memory_mb, 1),
        "backend_cpu_pct_of_one_core": round(100 * (backend_cpu1 - backend_cpu0) / (t1 - t0), 1),
        "vm_steal_pct_of_machine": round(100 * (steal1 - steal0) / (t1 - t0) / (os.cpu_count() or 1), 1),
        "cycles": len(telemetry),
        "missed_cycles": gateway[-1]["missed_cycles"] if gateway else None,
        "cycle_duration_ms": ms_stats(durations),
        "cycle_lateness_ms": ms_stats(lateness),
        "loop_lag_ms_max_per_cycle": ms_stats(lags),
        "upstream_events": {kind: sum(e.get("type") == kind for e in events)
                            for kind in ("upstream_disconnected", "upstream_queue_dropped", "upstream_request_refused",
                                         "command_failed")},
    })
    return result


async def run(args: argparse.Namespace) -> dict:
    # The gateway holds two sockets per charger (the charger's and its backend link).
    nofile_before, nofile = raise_open_files_limit(2 * args.chargers)
    if args.sim_cpus:  # this process plays the VPP: off the gateway's CPUs too
        os.sched_setaffinity(0, args.sim_cpus)
    chargers = charger_ids(args.chargers)
    workdir = Path(tempfile.mkdtemp(prefix="flexedge-ocpp-proxy-bench-"))
    try:
        proxied = await proxied_run(chargers, args, workdir)
        direct = await direct_run(chargers, args, workdir)
    except Exception:
        kept = Path(tempfile.mkdtemp(prefix="flexedge-ocpp-proxy-bench-failed-"))
        shutil.copytree(workdir, kept, dirs_exist_ok=True)
        print(f"failed: logs kept in {kept}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "chargers": args.chargers,
        "ocpp_1_6": sum(v == "1.6" for _, _, v in chargers),
        "ocpp_2_0_1": sum(v == "2.0.1" for _, _, v in chargers),
        "simulator_processes": args.sim_processes,
        "gateway_cpus": sorted(args.gateway_cpus) if args.gateway_cpus else "any",
        "simulator_cpus": sorted(args.sim_cpus) if args.sim_cpus else "any",
        "open_files_soft_limit": [nofile_before, nofile],
        "meter_interval_s": args.meter_interval_s,
        "setpoint_interval_s": args.setpoint_interval_s,
        "backend_calls": f"{args.backend_call_sample} chargers every {args.backend_call_interval_s:g} s",
        "added_by_gateway_ms": added(proxied, direct),
        "proxied": proxied,
        "direct": direct,
    }


def split_line(proxied: dict, name: str, key: str) -> str:
    burst, calm = proxied[f"{key}_within_{SETPOINT_BURST_S:g}_s_of_a_setpoint"], proxied[f"{key}_between_setpoints"]
    return (f"  {name:<22} proxied, sent within {SETPOINT_BURST_S:g} s of a setpoint p50 {burst['p50']:6.2f}  "
            f"p99 {burst['p99']:6.2f} (n={burst['n']}) | between setpoints p50 {calm['p50']:6.2f}  "
            f"p99 {calm['p99']:6.2f} ms (n={calm['n']})")


def in_gateway_line(wire: dict) -> str:
    stats = lambda s: f"p50 {s['p50']:5.2f}  p99 {s['p99']:5.2f}  max {s['max']:6.2f} (n={s['n']})"  # noqa: E731
    burst, calm = (wire[f"charger_to_backend_within_{SETPOINT_BURST_S:g}_s_of_a_setpoint"],
                   wire["charger_to_backend_between_setpoints"])
    return (f"  in the gateway (wire): charger -> backend {stats(wire['charger_to_backend'])} (within "
            f"{SETPOINT_BURST_S:g} s of a setpoint {stats(burst)}, between {stats(calm)}) | backend -> charger "
            f"{stats(wire['backend_to_charger'])}; link free {stats(wire['backend_to_charger_link_free'])}, behind a "
            f"gateway CALL {stats(wire['backend_to_charger_behind_a_gateway_call'])} ms; unmatched "
            f"{wire['calls_not_matched']}")


def report(result: dict) -> str:
    p, d, a = result["proxied"], result["direct"], result["added_by_gateway_ms"]
    line = lambda name, key: (f"  {name:<22} proxied p50 {p[key]['p50']:6.2f}  p99 {p[key]['p99']:6.2f}  "  # noqa: E731
                              f"max {p[key]['max']:7.2f} | direct p50 {d[key]['p50']:6.2f}  p99 {d[key]['p99']:6.2f}  "
                              f"max {d[key]['max']:7.2f} | added p50 {a[key]['p50']:5.2f}  p99 {a[key]['p99']:5.2f} ms"
                              f"  (n={p[key]['n']}/{d[key]['n']})")
    return "\n".join([
        f"{result['chargers']} chargers proxied ({result['ocpp_1_6']} x 1.6, {result['ocpp_2_0_1']} x 2.0.1), "
        f"{p['duration_s']:g} s proxied, {d['duration_s']:g} s direct; gateway on CPUs {result['gateway_cpus']}, "
        f"stations and backend on CPUs {result['simulator_cpus']}",
        line("charger -> backend", "charger_to_backend_ms"),
        line("backend -> charger", "backend_to_charger_ms"),
        *(split_line(p, name, key) for name, key in (("charger -> backend", "charger_to_backend_ms"),
                                                      ("backend -> charger", "backend_to_charger_ms"))),
        f"  backend -> charger     link free p50 {p['backend_to_charger_ms_link_free']['p50']:6.2f}  p99 "
        f"{p['backend_to_charger_ms_link_free']['p99']:6.2f} (n={p['backend_to_charger_ms_link_free']['n']}, added "
        f"p50 {a['backend_to_charger_ms_link_free']['p50']:.2f}  p99 {a['backend_to_charger_ms_link_free']['p99']:.2f})"
        f" | behind a gateway CALL p50 {p['backend_to_charger_ms_behind_a_gateway_call']['p50']:6.2f}  p99 "
        f"{p['backend_to_charger_ms_behind_a_gateway_call']['p99']:6.2f} ms "
        f"(n={p['backend_to_charger_ms_behind_a_gateway_call']['n']})",
        *([in_gateway_line(p["in_gateway_ms"])] if "in_gateway_ms" in p else []),
        f"  not received: charger CALLs {p['charger_calls_not_received']}, backend CALLs "
        f"{p['backend_calls_not_received']}",
        f"  gateway: CPU {p['gateway_cpu_pct_of_one_core']:g} % of one core, RSS {p['gateway_rss_mb']:g} MB, "
        f"{p['calls_per_s']:g} CALLs/s forwarded, {p['setpoints']} setpoints ({p['setpoints_rejected']} rejected)",
        f"  loop lag max per cycle p99 {p['loop_lag_ms_max_per_cycle']['p99']:g} ms, cycle lateness p99 "
        f"{p['cycle_lateness_ms']['p99']:g} ms, missed cycles {p['missed_cycles']}, "
        f"VM steal {p['vm_steal_pct_of_machine']:g} %",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chargers", type=int, default=200, help="chargers, half 1.6 and half 2.0.1")
    parser.add_argument("--duration-s", type=float, default=60.0, help="the measured proxied run")
    parser.add_argument("--direct-duration-s", type=float, default=30.0, help="the measured run without the gateway")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--cycle-s", type=float, default=2.0, help="the gateway's control cycle")
    parser.add_argument("--setpoint-interval-s", type=float, default=2.0, help="a VPP setpoint this often")
    parser.add_argument("--meter-interval-s", type=float, default=5.0, help="MeterValues period of each station")
    parser.add_argument("--backend-call-interval-s", type=float, default=2.3,
                        help="not a multiple of the setpoint interval: the calls meet every phase of the setpoints")
    parser.add_argument("--backend-call-sample", type=int, default=5, help="chargers the backend calls each interval")
    parser.add_argument("--sim-processes", type=int, default=2, help="processes the stations are spread over")
    parser.add_argument("--gateway-cpus", default="", help="pin the gateway to these CPUs, e.g. 0 (default: not pinned)")
    parser.add_argument("--sim-cpus", default="",
                        help="pin the stations and the backend to these CPUs, e.g. 1 (default: not pinned)")
    parser.add_argument("--no-capture", dest="capture", action="store_false",
                        help="no tshark capture on lo (the time in the gateway off the wire); default: capture "
                             "when tshark is installed")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    args = parser.parse_args()
    try:
        args.gateway_cpus, args.sim_cpus = (
            {int(c) for c in text.split(",") if c.strip()} or None for text in (args.gateway_cpus, args.sim_cpus))
    except ValueError:
        parser.error("--gateway-cpus / --sim-cpus: CPU numbers separated by commas, e.g. 0 or 1,2")
    if not 2 <= args.chargers <= 1000 or not 10 <= args.duration_s <= 1800 or not 10 <= args.direct_duration_s <= 1800:
        parser.error("--chargers 2..1000, --duration-s 10..1800, --direct-duration-s 10..1800")
    if not 1 <= args.sim_processes <= 4 or not 0.5 <= args.setpoint_interval_s <= 60:
        parser.error("--sim-processes 1..4, --setpoint-interval-s 0.5..60")
    if not 0.5 <= args.meter_interval_s <= 60 or not 0.5 <= args.backend_call_interval_s <= 60:
        parser.error("--meter-interval-s 0.5..60, --backend-call-interval-s 0.5..60")
    if not 1 <= args.backend_call_sample <= args.chargers:
        parser.error("--backend-call-sample 1..--chargers")
    args.capture = args.capture and wire_hops.available()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
