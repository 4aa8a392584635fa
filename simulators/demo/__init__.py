"""`flexedge demo`: the demo site on the bundled simulators (docs/cli.md).

It lives here, with the simulators, so that the daemon never imports them: the
`flexedge` command (edge/cli.py) imports this package only when the demo runs,
and hands it its options.  ``run.py`` runs the demo, ``sites.py`` builds the
simulated site from a profile.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from edge.resources import demo_profile_path


def build_parser() -> argparse.ArgumentParser:
    from simulators.demo.sites import DEFAULT_DEIE_SCRIPT

    demo = argparse.ArgumentParser(prog="flexedge demo", description="Run the demo site on bundled simulators.")
    demo.add_argument("--profile", default=str(demo_profile_path()),
                      help="the site profile to simulate (default: the shipped demo.yaml)")
    demo.add_argument("--duration-s", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    demo.add_argument("--workdir", default=None, help="where the demo keeps its spool (default: a temporary folder)")
    demo.add_argument("--broker", choices=["auto", "mosquitto", "embedded"], default="auto",
                      help="MQTT broker: a private Mosquitto if installed (auto), or the embedded one")
    demo.add_argument("--deie-script", default=None, metavar="SCRIPT",
                      help="the grid operator's DEIE orders, simulators.deie script format, seconds from the VPP's "
                           f"start (default: {DEFAULT_DEIE_SCRIPT}; \"\" sends none)")
    demo.add_argument("--log-format", choices=["text", "json"], default="text", help="stderr log format (default text)")
    demo.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    return demo


def main(argv: list[str] | None = None) -> int:
    from edge.runtime.logs import setup_logging
    from simulators.demo.run import run_demo

    args = build_parser().parse_args(argv)
    setup_logging(args.log_format, args.log_level if args.log_level != "info" else "warning")
    return asyncio.run(run_demo(Path(args.profile), duration_s=args.duration_s, workdir=args.workdir,
                                broker_choice=args.broker, deie_script=args.deie_script))
