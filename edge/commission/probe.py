"""`flexedge probe PROTOCOL ...`: look at one device (or a bounded range) before it goes in a profile.

Each driver that can be probed names its probe module in the registry (``DriverSpec.probe``,
drivers/registry.py); the module is imported only when ``flexedge probe`` runs, so the other
commands never load a protocol stack for it.  A probe module has:

``HELP``
    One line for ``flexedge probe PROTOCOL --help``.
``add_arguments(parser)``
    Its options, on the ``argparse`` parser of ``flexedge probe PROTOCOL`` (``--fragment``
    is added here, for every protocol).
``async probe(args, report) -> int``
    Looks, bounded by timeouts, and returns how many devices it found.  It writes through
    ``report`` (a ``Report``): ``report.line(text)`` for what it found (stdout),
    ``report.fail(text)`` for the one line that says why nothing was found (stderr), and
    ``await report.tcp_unreachable(host, port, timeout_s)`` for a first look at a TCP endpoint,
    and ``report.fragment(partial_profile, check_with=None)`` for the profile fragment of what it
    found (``{"assets": [...]}``, with ``ocpp:`` for a charger).  ``check_with`` holds stand-in
    values for keys the device cannot tell (a rating): the fragment is checked with them, and
    printed without them.  Expected failures (refused, silent, not the protocol) never raise.

Exit status (docs/cli.md): 0 found, 1 nothing found or unreachable, 2 bad arguments, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import importlib
import logging
import os
import sys
from typing import Any

EXIT_FOUND = 0
EXIT_NOTHING_FOUND = 1
EXIT_BAD_ARGUMENTS = 2
EXIT_INTERRUPTED = 130
# The site the fragment is checked in: the smallest a profile can be.
CHECK_SITE = {"site": {"id": "probe-check"}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The protocols and their options come from the registry, read only when the command runs.
    parser.add_argument("protocol", metavar="PROTOCOL",
                        help="sunspec, iec104 or ocpp (`flexedge probe PROTOCOL --help` for its options)")
    rest = parser.add_argument("probe_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    rest.required = False  # the protocol's own parser says what is missing


def probe_modules() -> dict[str, str]:
    """Driver name -> probe module, for the drivers that have one."""
    from drivers import registry

    return {name: spec.probe for name, spec in registry.drivers().items() if spec.probe}


class Report:
    """What a probe writes: results on stdout, the failure line on stderr, the fragment kept for the end."""

    def __init__(self) -> None:
        self.fragments: list[tuple[dict[str, Any], dict[str, Any] | None]] = []

    def line(self, text: str = "") -> None:
        print(text, flush=True)

    def fail(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def fragment(self, partial_profile: dict[str, Any], check_with: dict[str, Any] | None = None) -> None:
        self.fragments.append((partial_profile, check_with))

    async def tcp_unreachable(self, host: str, port: int, timeout_s: float) -> str | None:
        """None when a TCP connection to ``host:port`` opens (it is closed at once); else one line why not.

        Before a protocol stack tries: their own errors rarely tell refused from silent."""
        where = f"{host}:{port}"
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            return f"no TCP connection to {where} within {timeout_s:g} s (host down, or a firewall drops the packets)"
        except ConnectionRefusedError:
            return f"{where}: connection refused (nothing listens on port {port})"
        except OSError as error:
            return f"{where}: {error.strerror or error}"
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                await writer.wait_closed()
        return None


def fragment_problem(partial_profile: dict[str, Any], check_with: dict[str, Any] | None = None) -> str | None:
    """None when the fragment, with ``check_with`` laid over its asset, loads into a profile; else why not."""
    from pydantic import ValidationError

    from edge.config.profile import Profile

    document = copy.deepcopy(CHECK_SITE) | copy.deepcopy(partial_profile)
    if check_with:
        document["assets"][0] = {**document["assets"][0], **check_with}
    try:
        Profile.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"
    return None


def fragment_text(partial_profile: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(partial_profile, sort_keys=False, default_flow_style=False).rstrip("\n")


def run(args: argparse.Namespace) -> int:
    modules = probe_modules()
    if args.protocol not in modules:
        print(f"flexedge probe: unknown protocol {args.protocol!r} (one of: {', '.join(modules)})", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    module = importlib.import_module(modules[args.protocol])
    parser = argparse.ArgumentParser(prog=f"flexedge probe {args.protocol}", description=module.HELP)
    module.add_arguments(parser)
    parser.add_argument("--fragment", action="store_true",
                        help="also print a profile fragment for what was found (checked against the profile schema)")
    try:
        options = parser.parse_args(args.probe_args)
    except SystemExit as done:  # --help (0) or a bad argument (2, the message is printed)
        return EXIT_BAD_ARGUMENTS if done.code else EXIT_FOUND
    # The libraries' own log records (pymodbus prints frames it cannot parse) would bury the
    # one line that says what went wrong: the probe says it itself.
    logging.basicConfig(handlers=[logging.NullHandler()], force=True)
    report = Report()
    try:
        found = asyncio.run(module.probe(options, report))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `flexedge probe ... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FOUND
    if options.fragment and found:
        for partial_profile, check_with in report.fragments:
            problem = fragment_problem(partial_profile, check_with)
            if problem is not None:
                print(f"the fragment does not load into a profile ({problem}): please report this", file=sys.stderr)
                return EXIT_NOTHING_FOUND
            report.line("")
            report.line("# profile fragment (checked: it loads into a profile)")
            report.line(fragment_text(partial_profile))
            for key in (check_with or {}):
                if key not in partial_profile["assets"][0]:
                    report.line(f"  # {key}: ?   required; the device does not tell it: fill it in")
    return EXIT_FOUND if found else EXIT_NOTHING_FOUND
