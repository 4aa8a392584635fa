"""`flexedge probe`: look at one device (or a bounded range) before it goes in a profile.

To be built (#12.2): sunspec, iec104, ocpp.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("protocol", choices=["sunspec", "iec104", "ocpp"])


def run(args: argparse.Namespace) -> int:
    print("flexedge probe: not built yet")
    return 1
