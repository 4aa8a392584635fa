"""Runs N simulated SunSpec PV inverters in their own process, for benchmarks.

Writes {"ports": [...]} to --ready-file once listening; on SIGTERM writes every
limit write received as [port, t_s, point, value] to --writes-file (the points
in --points, WMaxLimPct by default).  --kind storage runs storage units
(--rated-kw, --capacity-kwh) instead, whose command is WSet.  t_s is
time.monotonic(), which on Linux is one clock for every process, so the bench
can compare it with its own send times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulators.sunspec import DeviceSpec, SunSpecSimulator  # noqa: E402


async def main(count: int, ready_file: Path, writes_file: Path, kind: str = "pv", rated_kw: float = 10.0,
               capacity_kwh: float = 10.0, points: frozenset[str] = frozenset({"WMaxLimPct"})) -> None:
    if kind == "pv":
        specs = [DeviceSpec(kind="pv", rated_kw=rated_kw, sun_kw=0.8 * rated_kw, ramp_pct_per_s=0) for _ in range(count)]
    else:
        specs = [DeviceSpec(kind="storage", rated_kw=rated_kw, capacity_kwh=capacity_kwh, ramp_pct_per_s=0)
                 for _ in range(count)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with SunSpecSimulator(specs) as sim:
        ready_file.write_text(json.dumps({"ports": [d.port for d in sim.devices]}))
        await stop.wait()
        writes = [[d.port, w.t_s, w.point, w.value] for d in sim.devices for w in d.writes if w.point in points]
    writes_file.write_text(json.dumps(writes))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--writes-file", type=Path, required=True)
    parser.add_argument("--kind", choices=["pv", "storage"], default="pv", help="pv: sun at 80 %% of the rating")
    parser.add_argument("--rated-kw", type=float, default=10.0)
    parser.add_argument("--capacity-kwh", type=float, default=10.0, help="storage only")
    parser.add_argument("--points", default="WMaxLimPct", help="comma-separated points whose writes are recorded")
    args = parser.parse_args()
    asyncio.run(main(args.count, args.ready_file, args.writes_file, args.kind, args.rated_kw, args.capacity_kwh,
                     frozenset(args.points.split(","))))
