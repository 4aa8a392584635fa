"""Runs simulated OCPP charge points, each with an EV charging, in their own process, for benchmarks.

    python bench/ocpp_sim_host.py --url ws://127.0.0.1:9000/ocpp --stations-file s.json \
        --ready-file r.json --profiles-file p.json --max-run-s 300

--stations-file holds [[charge_point_id, "1.6" | "2.0.1"], ...].  Once every
station is connected and its EV is charging (transaction accepted), writes
{"stations": n, "charging": n} to --ready-file.  On SIGTERM, or after
--max-run-s at the latest (so a lost bench cannot leave it running), writes
every SetChargingProfile answered as [charge_point_id, t_s, limit, unit] to
--profiles-file.  t_s is the station's time.monotonic() when it answered,
which on Linux is one clock for every process, so the bench can compare it
with its own send times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulators.ocpp import EvSpec, OcppSimulator, StationSpec  # noqa: E402

CONNECT_TIMEOUT_S = 120.0


async def plug_in_when_connected(station, ev_max_kw: float, deadline_s: float, ev: EvSpec | None = None) -> bool:
    """Connect, then plug an EV in (``ev``, default a large battery drawing ``ev_max_kw``); retried until the
    deadline (a call can time out under a connection storm)."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline_s:
        try:
            await station.wait_connected(timeout_s=max(0.1, deadline_s - loop.time()))
        except asyncio.TimeoutError:
            return False
        # A large battery, so that no EV is full during the run and each keeps drawing its maximum.
        if await station.plug_in(ev or EvSpec(id_tag="BENCHTAG", capacity_kwh=500.0, soc_pct=20.0,
                                              max_power_kw=ev_max_kw)):
            return True
        await asyncio.sleep(1.0)
    return False


def on_sigterm() -> asyncio.Event:
    """Set when the bench sends SIGTERM (each host then writes its records and stops)."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    return stop


async def until_stopped(stop: asyncio.Event, max_run_s: float) -> None:
    """Until SIGTERM (``on_sigterm``), or ``max_run_s`` at the latest: no host outlives a lost bench."""
    try:
        await asyncio.wait_for(stop.wait(), max_run_s)
    except asyncio.TimeoutError:
        logging.warning("no SIGTERM within %g s: stopping on my own", max_run_s)


async def main(args: argparse.Namespace) -> None:
    stations = json.loads(args.stations_file.read_text())
    # The physics tick is 1 s (default 0.1 s): 250 stations ticking ten times a
    # second would cost this process more than the charging it simulates.
    specs = [StationSpec(cp_id, ocpp_version=version, meter_interval_s=args.meter_interval_s, tick_s=1.0,
                         reconnect_cap_s=5.0)
             for cp_id, version in stations]
    stop = on_sigterm()
    loop = asyncio.get_running_loop()
    async with OcppSimulator(args.url, specs) as sim:
        deadline_s = loop.time() + CONNECT_TIMEOUT_S
        plugged = await asyncio.gather(*(plug_in_when_connected(s, args.ev_max_kw, deadline_s) for s in sim.stations))
        args.ready_file.write_text(json.dumps({"stations": len(specs), "charging": sum(plugged)}))
        await until_stopped(stop, args.max_run_s)
        profiles = [[s.spec.charge_point_id, p.received_mono, p.limit, p.unit] for s in sim.stations for p in s.profiles]
    args.profiles_file.write_text(json.dumps(profiles))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="central system base URL (ws://127.0.0.1:<port>/ocpp)")
    parser.add_argument("--stations-file", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--profiles-file", type=Path, required=True)
    parser.add_argument("--meter-interval-s", type=float, default=10.0)
    parser.add_argument("--ev-max-kw", type=float, default=11.0)
    parser.add_argument("--max-run-s", type=float, default=600.0)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main(arguments))
