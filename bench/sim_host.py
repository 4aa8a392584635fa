"""Runs N simulated SunSpec PV inverters in their own process, for benchmarks.

Writes {"ports": [...]} to --ready-file once listening; on SIGTERM writes every
limit write received as [port, t_s, point, value] to --writes-file.  t_s is
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


async def main(count: int, ready_file: Path, writes_file: Path) -> None:
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0, ramp_pct_per_s=0) for _ in range(count)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with SunSpecSimulator(specs) as sim:
        ready_file.write_text(json.dumps({"ports": [d.port for d in sim.devices]}))
        await stop.wait()
        writes = [[d.port, w.t_s, w.point, w.value] for d in sim.devices for w in d.writes if w.point == "WMaxLimPct"]
    writes_file.write_text(json.dumps(writes))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--writes-file", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(main(args.count, args.ready_file, args.writes_file))
