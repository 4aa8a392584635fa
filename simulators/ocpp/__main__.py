"""CLI of the OCPP charge-point simulator; see ``simulators.ocpp`` for the API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import time

from simulators.ocpp import EvSpec, OcppSimulator, StationSpec


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.ocpp",
        description="Simulated OCPP 1.6J / 2.0.1 / 2.1 charge points with EVs, connecting to a central system.")
    parser.add_argument("--url", default="ws://127.0.0.1:9000/ocpp",
                        help="central system base URL; each station appends /<id> (default %(default)s)")
    parser.add_argument("--count", type=int, default=1, help="number of stations (default %(default)s)")
    parser.add_argument("--id-prefix", default="CP", help="station ids are <prefix><n> from 1 (default %(default)s)")
    parser.add_argument("--version", choices=["1.6", "2.0.1", "2.1"], default="1.6",
                        help="OCPP version (default %(default)s)")
    parser.add_argument("--password", help="HTTP Basic password (user = station id); none by default")
    parser.add_argument("--max-current-a", type=float, default=32.0, help="station rating per phase")
    parser.add_argument("--phases", type=int, choices=[1, 3], default=3)
    parser.add_argument("--meter-interval-s", type=float, default=5.0, help="MeterValues period")
    parser.add_argument("--ev", action="store_true", help="plug an EV in at start")
    parser.add_argument("--ev-max-kw", type=float, default=11.0, help="EV charging power limit")
    parser.add_argument("--ev-capacity-kwh", type=float, default=40.0, help="EV battery (default %(default)s)")
    parser.add_argument("--ev-soc-pct", type=float, default=30.0, help="EV state of charge at plug-in")
    parser.add_argument("--bidirectional", action="store_true",
                        help="2.1: stations and EVs that can discharge (V2X), discharging up to --ev-max-kw")
    parser.add_argument("--afrr-signal", action="store_true", help="2.1: stations follow AFRRSignal")
    parser.add_argument("--ev-min-soc-pct", type=float, default=20.0,
                        help="the EV's own floor for discharging, stated in its charging needs")
    parser.add_argument("--departure-in-s", type=float,
                        help="the EV announces its departure this long after plug-in (none by default)")
    parser.add_argument("--id-tag", default="SIMTAG01", help="ID tag the EVs present")
    parser.add_argument("--arrivals", action="store_true",
                        help="EVs come and go at random (mean stay 60 s) instead of staying plugged in")
    parser.add_argument("--reject-profiles", action="store_true", help="answer Rejected to SetChargingProfile")
    parser.add_argument("--ca-file", help="CA to verify a wss:// server")
    parser.add_argument("--cert-file", help="client certificate (security profile 3)")
    parser.add_argument("--key-file", help="client certificate key")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    for flag in ("bidirectional", "afrr_signal"):
        if getattr(args, flag) and args.version != "2.1":
            parser.error(f"--{flag.replace('_', '-')} needs --version 2.1")
    return args


async def _ev_life(station, args) -> None:
    await station.wait_connected(timeout_s=3600)
    while True:
        departure_s = None if args.departure_in_s is None else time.time() + args.departure_in_s
        await station.plug_in(EvSpec(id_tag=args.id_tag, max_power_kw=args.ev_max_kw, capacity_kwh=args.ev_capacity_kwh,
                                     soc_pct=args.ev_soc_pct, bidirectional=args.bidirectional,
                                     min_soc_pct=args.ev_min_soc_pct, departure_s=departure_s))
        if not args.arrivals:
            return
        await asyncio.sleep(random.expovariate(1 / 60.0))
        await station.unplug()
        await asyncio.sleep(random.expovariate(1 / 30.0))


async def main(args: argparse.Namespace) -> None:
    specs = [StationSpec(f"{args.id_prefix}{n}", ocpp_version=args.version, password=args.password,
                         max_current_a=args.max_current_a, phases=args.phases,
                         meter_interval_s=args.meter_interval_s, accept_profiles=not args.reject_profiles,
                         bidirectional=args.bidirectional, afrr_signal=args.afrr_signal)
             for n in range(1, args.count + 1)]
    async with OcppSimulator(args.url, specs, ca_file=args.ca_file, cert_file=args.cert_file,
                             key_file=args.key_file) as sim:
        logging.info("%d station(s) -> %s", len(specs), args.url)
        lives = [asyncio.create_task(_ev_life(s, args)) for s in sim.stations] if args.ev or args.arrivals else []
        try:
            await asyncio.Future()
        finally:
            for task in lives:
                task.cancel()


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=arguments.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(main(arguments))
    except KeyboardInterrupt:
        pass
