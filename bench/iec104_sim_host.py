"""Runs N simulated IEC 104 units (BESS, optionally P2H) in their own process, for benchmarks.

    python bench/iec104_sim_host.py --bess 25 --ready-file ready.json --commands-file commands.json

Each unit is its own c104 server (own port, common address 1), as each unit on a
site is its own device.  Every ``--update-s`` the simulator's physics thread
ticks and sends every measured value that changed as a spontaneous frame
(COT 3); a measurement ripple of +-``--ripple-kw`` on the active and reactive
power (a real transducer's noise) makes both change on practically every tick,
and the state of charge follows the commanded power.

Writes {"units": [{"port", "common_address", "kind"}, ...]} to --ready-file
once listening.  Stops on SIGTERM, or after --max-s at the latest, and then
writes to --commands-file {"commands": [[port, received_monotonic_s, value,
accepted], ...], "spontaneous_frames": n, "unit_seconds": s} (unit_seconds:
the time each unit was sending, summed); received_monotonic_s is
time.monotonic() at the command callback, which on Linux is one clock for
every process, so the bench can compare it with its own send times.
"""

# No "from __future__ import annotations": c104 checks callback annotations as objects, not strings.
import argparse
import asyncio
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import c104

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulators.iec104_unit import Iec104UnitSimulator, SimulatedUnit, UnitSpec  # noqa: E402


class BenchUnit(SimulatedUnit):
    """A simulated unit with transducer noise, which records when commands arrive and what it sent."""

    def __init__(self, spec: UnitSpec, ripple_kw: float):
        super().__init__(spec)
        self.ripple_kw = ripple_kw
        self.command_received_at: list[float] = []  # time.monotonic(), one per entry of self.commands
        self.spontaneous_frames = 0
        self.first_frame_at: float | None = None  # time.monotonic() of the first spontaneous frame
        self._noise = random.Random(spec.port)

    def signal_values(self) -> dict[str, Any]:
        values = super().signal_values()
        for name in ("p_measured", "q_measured"):
            if name in values:  # a boiler has no reactive power
                values[name] += self._noise.uniform(-self.ripple_kw, self.ripple_kw)
        return values

    def publish(self, transmit: bool = True) -> None:
        sent_before = dict(self._sent)
        super().publish(transmit)
        if transmit:
            self.spontaneous_frames += sum(1 for name, raw in self._sent.items() if sent_before.get(name) != raw)
            if self.first_frame_at is None and self.spontaneous_frames:
                self.first_frame_at = time.monotonic()

    def _command_callback(self, signal: str, spec):
        handle = super()._command_callback(signal, spec)

        def on_receive(point: c104.Point, previous_info: c104.Information, message: c104.IncomingMessage) -> c104.ResponseState:
            received_at = time.monotonic()
            response = handle(point, previous_info, message)
            self.command_received_at.append(received_at)
            return response

        return on_receive


async def start_units(specs: list[UnitSpec], args: argparse.Namespace, attempts: int = 5) -> Iec104UnitSimulator:
    for attempt in range(1, attempts + 1):
        sim = Iec104UnitSimulator([], tick_s=args.update_s)
        sim.units = [BenchUnit(spec, args.ripple_kw) for spec in specs]
        try:
            await asyncio.to_thread(sim.start)
            return sim
        except RuntimeError:
            # A free port is picked, released, then bound: another process can take it in between.
            await asyncio.to_thread(sim.stop)
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


async def main(args: argparse.Namespace) -> None:
    specs = [UnitSpec(kind="bess", max_charge_kw=args.bess_kw, max_discharge_kw=args.bess_kw,
                      capacity_kwh=2 * args.bess_kw, soc_pct=50)
             for _ in range(args.bess)]
    specs += [UnitSpec(kind="p2h", min_load_kw=args.p2h_min_load_kw, max_load_kw=args.p2h_max_load_kw)
              for _ in range(args.p2h)]
    sim = await start_units(specs, args)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        args.ready_file.write_text(json.dumps({"units": [
            {"port": u.port, "common_address": u.common_address, "kind": u.spec.kind} for u in sim.units]}))
        try:
            # Stops by itself too, should the bench die without sending SIGTERM.
            await asyncio.wait_for(stop.wait(), args.max_s)
        except TimeoutError:
            pass
        stopped_at = time.monotonic()
    finally:
        await asyncio.to_thread(sim.stop)
    # The physics thread has stopped: the counters are final.
    commands = [[u.port, at, record.value, record.accepted]
                for u in sim.units for at, record in zip(u.command_received_at, u.commands)]
    # Frames per unit-second while connected: each unit from its first spontaneous frame on.
    unit_seconds = sum(stopped_at - u.first_frame_at for u in sim.units if u.first_frame_at is not None)
    args.commands_file.write_text(json.dumps({"commands": commands, "unit_seconds": unit_seconds,
                                              "spontaneous_frames": sum(u.spontaneous_frames for u in sim.units)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bess", type=int, default=25, help="battery units")
    parser.add_argument("--p2h", type=int, default=0, help="electric boilers")
    parser.add_argument("--bess-kw", type=float, default=100.0, help="each battery's charge and discharge rating (2 h)")
    parser.add_argument("--p2h-min-load-kw", type=float, default=50.0)
    parser.add_argument("--p2h-max-load-kw", type=float, default=500.0)
    parser.add_argument("--update-s", type=float, default=0.1, help="physics tick: changed values are sent this often")
    parser.add_argument("--ripple-kw", type=float, default=0.5, help="measurement noise on P and Q, +- kW")
    parser.add_argument("--max-s", type=float, default=600.0, help="stop after this long even without SIGTERM")
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--commands-file", type=Path, required=True)
    arguments = parser.parse_args()
    if not 0 <= arguments.bess + arguments.p2h <= 200 or not 0.01 <= arguments.update_s <= 10:
        parser.error("--bess + --p2h 0..200, --update-s 0.01..10")
    asyncio.run(main(arguments))
