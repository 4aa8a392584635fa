"""The two peers of bench/ocpp_proxy_bench.py, each in its own process: a CPO backend, or simulated stations.

    python bench/ocpp_proxy_sim_host.py backend --port-file p.json --records-file b.json --max-run-s 300
    python bench/ocpp_proxy_sim_host.py stations --url ws://127.0.0.1:9000/ocpp --stations-file s.json \
        --ready-file r.json --records-file w.json --max-run-s 300

``backend`` runs simulators.cpo_backend on a free loopback port (written to --port-file) and,
every --call-interval-s, sends SetChargingProfile (TxDefaultProfile at the station's 32 A, so it
never lowers the gateway's limit) to the next --call-sample connected chargers, round robin.
``stations`` runs the stations as bench/ocpp_sim_host.py does (each EV plugged in and charging),
started one by one over --meter-interval-s after --phase-s so that their MeterValues come spread
over the interval as on a real site rather than in one burst per process, and time-stamps every
CALL frame each way by unique id: sent just before the websocket send, received as the first
thing the receive loop does with the frame.

Both stop on SIGTERM, or after --max-run-s at the latest, and then write --records-file:
backend {cp_id: {"received": [[action, unique_id, received_mono]], "sent": [[action, unique_id,
sent_mono, answered_mono | null]]}}, stations {"sent": [[cp_id, unique_id, action, mono]],
"received": [[cp_id, unique_id, action, mono]], "answered": [[cp_id, unique_id, mono]]} (the
answers to the gateway's own CALLs).  Every time is time.monotonic(), one clock for
all processes on Linux.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from ocpp.charge_point import ChargePoint as LibraryChargePoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ocpp_sim_host import CONNECT_TIMEOUT_S, on_sigterm, plug_in_when_connected, until_stopped  # noqa: E402
from simulators.cpo_backend import BackendCallError, CpoBackend  # noqa: E402
from simulators.ocpp import OcppSimulator, StationSpec  # noqa: E402
from simulators.ocpp import points as station_points  # noqa: E402

BACKEND_LIMIT_A = 32.0  # the simulated station's maximum: the backend's profile never binds
BACKEND_CALL_TIMEOUT_S = 10.0


# ------------------------------------------------------------------ backend


async def backend_calls(backend: CpoBackend, interval_s: float, sample: int) -> None:
    """Every interval, SetChargingProfile to the next `sample` connected chargers (together), round robin."""
    turn = 0
    next_round = time.monotonic()
    while True:
        connected = sorted(cp for cp in backend.charge_point_ids() if backend.connected(cp))
        if connected:
            chosen = [connected[(turn + k) % len(connected)] for k in range(min(sample, len(connected)))]
            turn += len(chosen)
            results = await asyncio.gather(
                *(backend.set_charging_profile(cp, BACKEND_LIMIT_A, timeout_s=BACKEND_CALL_TIMEOUT_S) for cp in chosen),
                return_exceptions=True)
            for cp, result in zip(chosen, results):
                if isinstance(result, (BackendCallError, ValueError)):
                    logging.warning("%s: backend SetChargingProfile failed: %s", cp, result)
        next_round += interval_s
        await asyncio.sleep(max(0.0, next_round - time.monotonic()))


async def run_backend(args: argparse.Namespace) -> None:
    stop = on_sigterm()
    async with CpoBackend("127.0.0.1", 0, record_limit=1_000_000) as backend:
        args.port_file.write_text(json.dumps({"port": backend.bound_port, "url": backend.url}))
        caller = asyncio.create_task(backend_calls(backend, args.call_interval_s, args.call_sample))
        try:
            await until_stopped(stop, args.max_run_s)
        finally:
            caller.cancel()
        records = {cp: {"received": [[m.action, m.unique_id, m.received_mono] for m in backend.messages(cp)],
                        "sent": [[s.action, s.unique_id, s.sent_mono, s.answered_mono] for s in backend.sent(cp)]}
                   for cp in backend.charge_point_ids()}
    args.records_file.write_text(json.dumps(records))


# ------------------------------------------------------------------ stations


def is_call(frame: str) -> bool:
    return frame[:6].replace(" ", "").startswith("[2,")


def time_stamp_call_frames(sent: list, received: list, answered: list) -> None:
    """Record every CALL frame of every station, each way, by unique id, and when each station answered
    the gateway's own CALLs (ids fx-...: the link is busy until then); wraps the classes, this process only."""
    library_send = LibraryChargePoint._send
    station_route = station_points._StrictCalls.route_message

    async def send(point, message):
        at = time.monotonic()
        await library_send(point, message)
        if is_call(message):
            frame = json.loads(message)
            sent.append([point.id, frame[1], frame[2], at])
        elif '"fx-' in message[:16]:
            answered.append([point.id, json.loads(message)[1], at])

    async def route(point, raw):
        at = time.monotonic()
        if is_call(raw):
            frame = json.loads(raw)
            received.append([point.id, frame[1], frame[2], at])
        await station_route(point, raw)

    LibraryChargePoint._send = send
    station_points._StrictCalls.route_message = route


async def start_staggered(url: str, specs: list[StationSpec], spread_s: float, phase_s: float) -> list[OcppSimulator]:
    """One simulator per station, started evenly over spread_s after phase_s: their meter values (and physics
    ticks) come spread over the interval, as real chargers' do, not in one burst per process."""
    await asyncio.sleep(phase_s)
    sims = []
    for spec in specs:
        sim = OcppSimulator(url, [spec])
        await sim.start()
        sims.append(sim)
        await asyncio.sleep(spread_s / len(specs))
    return sims


async def run_stations(args: argparse.Namespace) -> None:
    sent, received, answered = [], [], []
    time_stamp_call_frames(sent, received, answered)
    stop = on_sigterm()
    stations = json.loads(args.stations_file.read_text())
    # Physics tick 1 s, as bench/ocpp_sim_host.py: a hundred stations at 10 ticks/s would load this process.
    specs = [StationSpec(cp_id, ocpp_version=version, meter_interval_s=args.meter_interval_s, tick_s=1.0,
                         reconnect_cap_s=5.0) for cp_id, version in stations]
    loop = asyncio.get_running_loop()
    sims = await start_staggered(args.url, specs, args.meter_interval_s, args.phase_s)
    try:
        deadline_s = loop.time() + CONNECT_TIMEOUT_S
        plugged = await asyncio.gather(*(plug_in_when_connected(sim.stations[0], args.ev_max_kw, deadline_s)
                                         for sim in sims))
        args.ready_file.write_text(json.dumps({"stations": len(specs), "charging": sum(plugged)}))
        await until_stopped(stop, args.max_run_s)
    finally:
        await asyncio.gather(*(sim.stop() for sim in sims), return_exceptions=True)
    args.records_file.write_text(json.dumps({"sent": sent, "received": received, "answered": answered}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    modes = parser.add_subparsers(dest="mode", required=True)
    backend_args = modes.add_parser("backend")
    backend_args.add_argument("--port-file", type=Path, required=True)
    backend_args.add_argument("--call-interval-s", type=float, default=2.0)
    backend_args.add_argument("--call-sample", type=int, default=5, help="chargers called each interval")
    station_args = modes.add_parser("stations")
    station_args.add_argument("--url", required=True, help="central system base URL (ws://127.0.0.1:<port>/ocpp)")
    station_args.add_argument("--stations-file", type=Path, required=True)
    station_args.add_argument("--ready-file", type=Path, required=True)
    station_args.add_argument("--meter-interval-s", type=float, default=5.0)
    station_args.add_argument("--ev-max-kw", type=float, default=11.0)
    station_args.add_argument("--phase-s", type=float, default=0.0, help="wait this long before the first station")
    for mode in (backend_args, station_args):
        mode.add_argument("--records-file", type=Path, required=True)
        mode.add_argument("--max-run-s", type=float, default=600.0)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_backend(arguments) if arguments.mode == "backend" else run_stations(arguments))
