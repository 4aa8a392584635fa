"""Command line: ``python -m simulators.sunspec --kind pv --rated-kw 10 --port 1502 --count 3``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .device import DEFAULT_MODELS, DeviceSpec
from .server import SunSpecSimulator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.sunspec",
        description="Serve simulated SunSpec devices over Modbus TCP (or RTU) and log every write received.",
    )
    parser.add_argument("--kind", choices=sorted(DEFAULT_MODELS), default="pv", help="device type (default pv)")
    parser.add_argument("--rated-kw", type=float, default=10.0, help="AC rating in kW (default 10)")
    parser.add_argument("--host", default="127.0.0.1", help="TCP address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1502, help="TCP port of the first device (default 1502)")
    parser.add_argument("--count", type=int, default=1, help="number of devices, on consecutive ports (default 1)")
    parser.add_argument("--base-address", type=int, default=40000, help="SunSpec base register (40000, 0, 50000)")
    parser.add_argument("--unit-id", type=int, default=1, help="Modbus unit id (default 1)")
    parser.add_argument("--models", help="comma-separated model ids instead of the kind's default, e.g. 1,103,120,123 "
                        "(append 705 for volt-var)")
    parser.add_argument("--no-704", action="store_true", help="drop model 704 (controls via 123/124)")
    parser.add_argument("--sun-kw", type=float, help="fixed available PV power in kW (default: daylight curve)")
    parser.add_argument("--capacity-kwh", type=float, default=10.0, help="battery capacity (default 10)")
    parser.add_argument("--soc-pct", type=float, default=50.0, help="initial state of charge (default 50)")
    parser.add_argument("--ramp-pct-per-s", type=float, default=100.0, help="output ramp, %% of rating per s")
    parser.add_argument("--load-kw", type=float, default=0.0, help="meter: site consumption in kW")
    parser.add_argument("--voltage-v", type=float, default=230.0, help="reported line-to-neutral voltage (default 230)")
    parser.add_argument("--frequency-hz", type=float, default=50.0, help="reported grid frequency (default 50)")
    parser.add_argument("--serial", help="serve Modbus RTU on this serial device instead of TCP (all devices share it)")
    parser.add_argument("--baudrate", type=int, default=19200, help="RTU baud rate (default 19200)")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not log each write")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    return args


def build_specs(args: argparse.Namespace) -> list[DeviceSpec]:
    models = [int(m) for m in args.models.split(",")] if args.models else list(DEFAULT_MODELS[args.kind])
    if args.no_704:
        models = [m for m in models if m != 704]
    specs = []
    for index in range(args.count):
        specs.append(
            DeviceSpec(
                kind=args.kind,
                rated_kw=args.rated_kw,
                unit_id=args.unit_id + index if args.serial else args.unit_id,
                base_address=args.base_address,
                models=models,
                sun_kw=args.sun_kw,
                capacity_kwh=args.capacity_kwh,
                soc_pct=args.soc_pct,
                ramp_pct_per_s=args.ramp_pct_per_s,
                load_kw=args.load_kw,
                voltage_v=args.voltage_v,
                frequency_hz=args.frequency_hz,
                port=0 if args.serial else args.port + index,
                serial_port=args.serial,
                baudrate=args.baudrate,
            )
        )
    return specs


async def serve(specs: list[DeviceSpec], host: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with SunSpecSimulator(specs, host=host) as sim:
        for device in sim.devices:
            where = device.serial_port or f"{host}:{device.port}"
            print(f"{device.kind} unit {device.unit_id} on {where}, base {device.base_address}, models {device.models}",
                  flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("simulators.sunspec").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        specs = build_specs(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(specs, args.host))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
