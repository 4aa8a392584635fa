"""`flexedge diagnostics`: one archive for a support ticket.

To be built (#12.3).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", help="site profile (YAML)")


def run(args: argparse.Namespace) -> int:
    print("flexedge diagnostics: not built yet")
    return 1
