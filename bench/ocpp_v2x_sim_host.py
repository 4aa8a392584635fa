"""Runs simulated OCPP charge points, unidirectional and bidirectional, for the V2X benchmark.

    python bench/ocpp_v2x_sim_host.py --url ws://127.0.0.1:9000/ocpp --stations-file s.json \
        --ready-file r.json --out-file o.json --max-run-s 400

--stations-file holds [{"station": {StationSpec keywords}, "ev": {EvSpec keywords}}, ...]
(bench/ocpp_v2x_bench.py writes it).  Every station connects and has its EV
plugged in; then {"stations": n, "charging": n} goes to --ready-file (the name
is bench/ocpp_sim_host.py's: "charging" counts the EVs whose session started).

From then on, every --sample-s, the process samples what its stations do:
the sum of their power (W, charging positive, discharging negative), and
for the bidirectional ones the sums of their charging and of their discharging
power, and each one's lowest state of charge.  On SIGTERM, or after --max-run-s
at the latest (so a lost bench cannot leave it running), it writes to
--out-file: every SetChargingProfile answered ([charge_point_id, t_s, limit,
unit, purpose, stack_level, periods, setpoint, operation_mode, accepted]), the samples ([t_s, total_w, v2x_charge_w,
v2x_discharge_w]) and, per bidirectional station, its EV's state of charge at
plug-in, lowest and last, and its minimum.  Every t_s is time.monotonic(),
which on Linux is one clock for every process, so the bench can compare it
with its own send times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ocpp_sim_host import CONNECT_TIMEOUT_S, on_sigterm, plug_in_when_connected, until_stopped  # noqa: E402
from simulators.ocpp import EvSpec, OcppSimulator, StationSpec  # noqa: E402


def is_bidirectional(station) -> bool:
    return bool(getattr(station.spec, "bidirectional", False))


def profile_rows(stations) -> list[list]:
    """[charge_point_id, t_s, limit, unit, purpose, stack_level, periods, setpoint, operation_mode, accepted]: the
    figures of the period in force when the profile arrived (limit None for a 2.1 period without one)."""
    return [[station.spec.charge_point_id, p.received_mono, p.limit, p.unit, p.purpose, p.stack_level,
             len(getattr(p, "periods", ())) or 1, getattr(p, "setpoint", None), getattr(p, "operation_mode", None),
             p.accepted]
            for station in stations for p in station.profiles]


class Sampler:
    """What the stations do, every ``period_s``: one sum per kind of power, the lowest SoC per V2X EV."""

    def __init__(self, stations, period_s: float):
        self.stations = stations
        self.bidirectional = [s for s in stations if is_bidirectional(s)]
        self.period_s = period_s
        self.samples: list[list[float]] = []
        self.soc: dict[str, dict[str, float | None]] = {}
        for station in self.bidirectional:
            ev = station.ev
            self.soc[station.spec.charge_point_id] = {
                "soc_at_plug_in_pct": ev.soc_pct if ev else None, "soc_min_seen_pct": ev.soc_pct if ev else None,
                "soc_last_pct": ev.soc_pct if ev else None,
                "ev_min_soc_pct": getattr(ev, "min_soc_pct", None) if ev else None,
                "capacity_kwh": ev.capacity_kwh if ev else None}

    def sample(self) -> None:
        charge_w = discharge_w = 0.0
        for station in self.bidirectional:
            power_w = station.power_w
            if power_w >= 0:
                charge_w += power_w
            else:
                discharge_w -= power_w
            ev = station.ev
            if ev is not None:
                seen = self.soc[station.spec.charge_point_id]
                seen["soc_last_pct"] = ev.soc_pct
                if seen["soc_min_seen_pct"] is None or ev.soc_pct < seen["soc_min_seen_pct"]:
                    seen["soc_min_seen_pct"] = ev.soc_pct
        total_w = sum(s.power_w for s in self.stations)
        self.samples.append([round(time.monotonic(), 4), round(total_w, 1), round(charge_w, 1), round(discharge_w, 1)])

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            self.sample()
            next_at += self.period_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))


async def main(args: argparse.Namespace) -> None:
    entries = json.loads(args.stations_file.read_text())
    specs = [StationSpec(**entry["station"]) for entry in entries]
    evs = [EvSpec(**entry["ev"]) for entry in entries]
    stop = on_sigterm()
    loop = asyncio.get_running_loop()
    async with OcppSimulator(args.url, specs) as sim:
        deadline_s = loop.time() + CONNECT_TIMEOUT_S
        plugged = await asyncio.gather(*(plug_in_when_connected(s, ev.max_power_kw, deadline_s, ev)
                                         for s, ev in zip(sim.stations, evs)))
        sampler = Sampler(sim.stations, args.sample_s)
        sampling = asyncio.create_task(sampler.run())
        args.ready_file.write_text(json.dumps({"stations": len(specs), "charging": sum(plugged)}))
        await until_stopped(stop, args.max_run_s)
        sampling.cancel()
        sampler.sample()
        out = {"profiles": profile_rows(sim.stations), "samples": sampler.samples, "v2x": sampler.soc}
    args.out_file.write_text(json.dumps(out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="central system base URL (ws://127.0.0.1:<port>/ocpp)")
    parser.add_argument("--stations-file", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--out-file", type=Path, required=True)
    parser.add_argument("--sample-s", type=float, default=0.1, help="how often the stations' power is sampled")
    parser.add_argument("--max-run-s", type=float, default=600.0)
    arguments = parser.parse_args()
    if not 0.01 <= arguments.sample_s <= 10:
        parser.error(f"--sample-s must be 0.01..10, got {arguments.sample_s:g}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main(arguments))
