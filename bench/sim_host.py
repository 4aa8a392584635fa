"""Runs N simulated SunSpec PV inverters in their own process, for benchmarks.

Writes {"ports": [...]} to --ready-file once listening; on SIGTERM writes every
limit write received as [port, t_s, point, value] to --writes-file (the points
in --points, WMaxLimPct by default).  --kind storage runs storage units
(--rated-kw, --capacity-kwh) instead, whose command is WSet.  t_s is
time.monotonic(), which on Linux is one clock for every process, so the bench
can compare it with its own send times.

For bench/freshness_bench.py (all opt-in): --sun-changes-file makes the PV
sun change at random moments between SIGUSR1 (start) and SIGUSR2 (stop;
SIGHUP then puts every device back to its initial sun): every 0.3-0.7 s
(--sun-change-every-s) a random --sun-change-share of the devices, each at most once per
--sun-change-quiet-s, gets a new sun_kw that it has not had before, on 10 W
steps; the physics is ticked at once, so the W register shows it from that
moment.  Each change is written to the file on SIGTERM as [port, t_s,
expected W register value].  --tick-on-write ticks a device's physics right
after each accepted write, so W follows a new limit at once (with
ramp_pct_per_s=0) instead of at the next 0.1 s tick.  --max-s stops the
process on its own after that long.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulators.sunspec import DeviceSpec, SunSpecSimulator  # noqa: E402


class SunChanger:
    """Random sun changes between start() and stop() (see the module docstring)."""

    def __init__(self, devices, every_s: tuple[float, float], share: float, quiet_s: float, seed: int | None):
        self.devices = [d for d in devices if d.has_pv]
        self.every_s, self.share, self.quiet_s = every_s, share, quiet_s
        self.rng = random.Random(seed)
        self.initial = {id(d): d.sun_kw for d in self.devices}
        self.count = {id(d): 0 for d in self.devices}
        self.last = {id(d): -1e9 for d in self.devices}
        self.changes: list[list] = []  # [port, t_s, expected W]
        self.running = asyncio.Event()

    def start(self) -> None:
        self.running.set()

    def stop(self) -> None:
        self.running.clear()

    def restore(self) -> None:
        for device in self.devices:
            device.set_sun(self.initial[id(device)])
            device.tick(time.monotonic(), 0.0)

    def next_sun_kw(self, index: int, device) -> float:
        # 10 W steps between 30 % and 90 % of the rating, walked with a stride prime to their number,
        # so that a device meets a value again only after all the others (hundreds of changes)
        steps = max(2, int(round(device.rated_kw * 60)))
        while True:
            k = self.count[id(device)]
            self.count[id(device)] += 1
            value = round(0.3 * device.rated_kw + ((index * 97 + k * 53) % steps) / 100.0, 2)
            if device.sun_kw is None or abs(value - device.sun_kw) > 0.005:
                return value

    async def run(self) -> None:
        while True:
            await self.running.wait()
            await asyncio.sleep(self.rng.uniform(*self.every_s))
            if not self.running.is_set():
                continue
            now = time.monotonic()
            eligible = [(i, d) for i, d in enumerate(self.devices) if now - self.last[id(d)] >= self.quiet_s]
            wanted = max(1, round(self.share * len(self.devices)))
            for index, device in self.rng.sample(eligible, min(wanted, len(eligible))):
                device.set_sun(self.next_sun_kw(index, device))
                device.tick(time.monotonic(), 0.0)  # W shows it from now on, not at the next 0.1 s tick
                t_s = time.monotonic()
                self.last[id(device)] = t_s
                model = next(m for m in (103, 102, 101, 113, 112, 111, 701) if m in device.models)
                self.changes.append([device.port, t_s, device.read_point(model, "W")])


def tick_on_write(device) -> None:
    """Tick the device's physics right after each accepted write (W follows a new limit at once)."""
    handle_write = device.handle_write

    def handle_and_tick(offset, values):
        result = handle_write(offset, values)
        if result is None:
            device.tick(time.monotonic(), 0.0)
        return result

    device.handle_write = handle_and_tick


async def main(count: int, ready_file: Path, writes_file: Path, kind: str = "pv", rated_kw: float = 10.0,
               capacity_kwh: float = 10.0, points: frozenset[str] = frozenset({"WMaxLimPct"}),
               sun_changes_file: Path | None = None, sun_change_every_s: tuple[float, float] = (0.3, 0.7),
               sun_change_share: float = 0.05, sun_change_quiet_s: float = 3.0, seed: int | None = None,
               tick_writes: bool = False, max_s: float | None = None) -> None:
    if kind == "pv":
        specs = [DeviceSpec(kind="pv", rated_kw=rated_kw, sun_kw=0.8 * rated_kw, ramp_pct_per_s=0) for _ in range(count)]
    else:
        specs = [DeviceSpec(kind="storage", rated_kw=rated_kw, capacity_kwh=capacity_kwh, ramp_pct_per_s=0)
                 for _ in range(count)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if max_s is not None:
        loop.call_later(max_s, stop.set)
    async with SunSpecSimulator(specs) as sim:
        changer = None
        if sun_changes_file is not None:
            changer = SunChanger(sim.devices, sun_change_every_s, sun_change_share, sun_change_quiet_s, seed)
            loop.add_signal_handler(signal.SIGUSR1, changer.start)
            loop.add_signal_handler(signal.SIGUSR2, changer.stop)
            loop.add_signal_handler(signal.SIGHUP, changer.restore)
            changer_task = asyncio.create_task(changer.run())
        if tick_writes:
            for device in sim.devices:
                tick_on_write(device)
        ready_file.write_text(json.dumps({"ports": [d.port for d in sim.devices]}))
        await stop.wait()
        if changer is not None:
            changer_task.cancel()
        writes = [[d.port, w.t_s, w.point, w.value] for d in sim.devices for w in d.writes if w.point in points]
    writes_file.write_text(json.dumps(writes))
    if changer is not None:
        sun_changes_file.write_text(json.dumps(changer.changes))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--writes-file", type=Path, required=True)
    parser.add_argument("--kind", choices=["pv", "storage"], default="pv", help="pv: sun at 80 %% of the rating")
    parser.add_argument("--rated-kw", type=float, default=10.0)
    parser.add_argument("--capacity-kwh", type=float, default=10.0, help="storage only")
    parser.add_argument("--points", default="WMaxLimPct", help="comma-separated points whose writes are recorded")
    parser.add_argument("--sun-changes-file", type=Path, default=None,
                        help="pv: change the sun at random between SIGUSR1 and SIGUSR2 (SIGHUP restores it), "
                        "record the changes here")
    parser.add_argument("--sun-change-every-s", default="0.3,0.7", help="min,max seconds between two rounds of changes")
    parser.add_argument("--sun-change-share", type=float, default=0.05, help="share of the devices changed per round")
    parser.add_argument("--sun-change-quiet-s", type=float, default=3.0, help="a device changes at most this often")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tick-on-write", action="store_true", help="W follows an accepted write at once")
    parser.add_argument("--max-s", type=float, default=None, help="stop on its own after this many seconds")
    args = parser.parse_args()
    every = tuple(float(v) for v in args.sun_change_every_s.split(","))
    if len(every) != 2 or not 0 < every[0] <= every[1]:
        parser.error("--sun-change-every-s MIN,MAX with 0 < MIN <= MAX")
    asyncio.run(main(args.count, args.ready_file, args.writes_file, args.kind, args.rated_kw, args.capacity_kwh,
                     frozenset(args.points.split(",")), args.sun_changes_file, every, args.sun_change_share,
                     args.sun_change_quiet_s, args.seed, args.tick_on_write, args.max_s))
