"""The `flexedge` command: run, check, schema, demo, probe, diagnostics (docs/cli.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from edge import __version__

EXIT_OK = 0
EXIT_PROFILE_INVALID = 2
EXIT_FILES_UNUSABLE = 3  # the profile is valid, but a file or folder it names cannot be used here


def _print_problem(problem, prefix: str = "  ") -> None:
    print(f"{prefix}{problem}", file=sys.stderr)
    for line in problem.excerpt.splitlines():  # the line of a syntax error, a caret under the spot
        print(f"      {line}", file=sys.stderr)


def _report_errors(path: str, problems) -> None:
    if len(problems) == 1 and problems[0].line <= 0:  # the file itself (missing, a folder ...): one line
        print(problems[0], file=sys.stderr)
        return
    count = len(problems)
    print(f"{path}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
    for problem in problems:
        _print_problem(problem)


def _load_or_report(path: str):
    from edge.config.profile import ProfileError, load_profile

    try:
        return load_profile(path)
    except ProfileError as error:
        _report_errors(path, error.problems)
        return None


def summary(profile) -> str:
    from drivers import registry  # each driver describes its own assets

    mqtt = profile.uplink.mqtt
    spool = profile.uplink.spool
    auth = "user " + mqtt.username if mqtt.username else "none"
    tls = "no"
    if mqtt.tls:
        tls = "mutual" if mqtt.tls.cert_file else "yes"
    grid = profile.grid
    lines = [
        f"site     {profile.site.id}" + (f" ({profile.site.name})" if profile.site.name else "") + f", {profile.site.timezone}",
        f"profile  sha256 {profile.source_sha256 or 'none'}, version {profile.version or 'none'}",
        f"control  cycle {profile.control.cycle_s:g} s, setpoint timeout {profile.control.setpoint_timeout_s:g} s, "
        f"fallback ramp {profile.control.fallback.ramp_kw_per_s:g} kW/s, allocation {profile.control.allocation}"
        + (f", committed band +{_kw(profile.control.committed_band_up_kw)}/-{_kw(profile.control.committed_band_down_kw)}"
           if profile.control.committed_band_up_kw or profile.control.committed_band_down_kw else ""),
        f"uplink   mqtt {mqtt.host}:{mqtt.port} (MQTT {mqtt.protocol}, tls {tls}, auth {auth}), "
        f"topics {mqtt.topic_prefix}/{profile.site.id}/..., client id {profile.client_id}",
        f"spool    {spool.path} (cap {spool.max_mb:g} MB, backlog {spool.backlog_msgs_per_s:g} msg/s)",
        f"grid     export limit {_kw(grid.export_limit_kw)}, import limit {_kw(grid.import_limit_kw)}",
    ]
    if grid.deie is not None:
        deie = grid.deie
        lines.append(f"deie     {deie.role} {deie.host}:{deie.port} CA {deie.common_address}, template {deie.template}, "
                     f"installed {deie.installed_kw:g} kW, limits in {deie.limit_unit}, on link loss {deie.on_link_loss}")
    if profile.ocpp is not None:
        ocpp = profile.ocpp
        scheme = "ws" if ocpp.security_profile == 1 else "wss"
        tags = f" ({len(ocpp.authorize.id_tags)} tags)" if ocpp.authorize.mode == "local_list" else ""
        lines.append(f"ocpp     {scheme}://{ocpp.host}:{ocpp.port}{ocpp.path}/<charge point id>, security profile "
                     f"{ocpp.security_profile}, authorize {ocpp.authorize.mode}{tags}")
    functions = profile.functions
    if functions is not None and functions.fcr is not None:
        fcr = functions.fcr
        lines.append(f"fcr      {fcr.capacity_kw:g} kW, deadband {fcr.deadband_mhz:g} mHz, full at {fcr.full_deviation_mhz:g} mHz "
                     f"in {fcr.full_activation_s:g} s, frequency from {fcr.frequency_source}")
    if functions is not None and functions.q_u is not None:
        q_u = functions.q_u
        lines.append(f"q(u)     {len(q_u.curve)}-point curve, up to {q_u.q_max_kvar:g} kvar, every {q_u.update_interval_s:g} s, "
                     f"voltage from {q_u.voltage_source}")
    if profile.ev_charging is not None:
        ev = profile.ev_charging
        lines.append(f"ev       smart charging, defaults: departure after {ev.default_departure_after_h:g} h, "
                     f"{ev.default_energy_kwh:g} kWh")
    lines.append(f"assets   {len(profile.assets)}")
    for asset in profile.assets:
        flags = []
        if asset.priority != 100 and profile.control.allocation == "merit_order":
            flags.append(f"priority {asset.priority}")
        if asset.ramp_kw_per_s:
            flags.append(f"ramp {asset.ramp_kw_per_s:g} kW/s")
        if not asset.controllable:
            flags.append("not controllable")
        if getattr(asset, "connection_point", False):
            flags.append("connection-point meter")
        rating = f" {asset.rated_kw:g} kW" if getattr(asset, "rated_kw", None) else ""
        lines.append(
            f"  {asset.id:<12} {asset.kind:<10} {asset.driver:<8} {registry.describe(asset)}{rating}"
            + (f" ({', '.join(flags)})" if flags else "")
        )
    return "\n".join(lines)


def _kw(value) -> str:
    return "none" if value is None else f"{value:g} kW"


def machine_warnings(profile) -> list[tuple[str, str]]:
    """What the profile names that is missing on this machine, beyond edge.config.preflight's
    checks, as (key path, message): warnings, since a profile is often checked on a laptop
    before it reaches the site."""
    warnings = []
    if profile.ocpp is not None and not Path(profile.ocpp.id_tag_salt_file).parent.is_dir():
        warnings.append(("ocpp.id_tag_salt_file", f"folder {Path(profile.ocpp.id_tag_salt_file).parent} does not exist "
                                                  "(systemd creates /var/lib/flexedge)"))
    for index, asset in enumerate(profile.assets):
        serial = getattr(asset, "serial", None)
        if serial is not None and not Path(serial.port).exists():
            warnings.append((f"assets[{index}].serial.port", f"{serial.port} does not exist on this machine"))
    return warnings + _upstream_warnings(profile)


def _upstream_warnings(profile) -> list[tuple[str, str]]:
    """The files and variables of the chargers' CPO backend links (``upstream``) that cannot be had here.
    Warnings only, for `check`: `run` starts without them (the chargers charge on and the grid limits
    hold; only the backend link fails, with an upstream_disconnected event)."""
    from edge.config.preflight import FileProblemError, read_password

    site = getattr(profile.ocpp, "upstream", None) if profile.ocpp is not None else None
    warnings, seen_site = [], False
    for index, asset in enumerate(profile.assets):
        upstream = getattr(asset, "upstream", None)
        if upstream is None:
            continue
        if upstream == site:  # the site's, taken by this charger: said once, at the site's key
            if seen_site:
                continue
            seen_site, key = True, "ocpp.upstream"
        else:
            key = f"assets[{index}].upstream"
        if upstream.password_file is not None:
            try:
                read_password(upstream.password_file, f"{key}.password_file")
            except FileProblemError as error:
                warnings.append((error.problem.key, error.problem.text))
        if upstream.password_env and upstream.password_env not in os.environ:
            warnings.append((f"{key}.password_env", f"environment variable {upstream.password_env} is not set"))
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(upstream, name)
            if path is not None and not Path(path).is_file():
                warnings.append((f"{key}.{name}", f"{path} does not exist on this machine"))
    return warnings


def _at_key(document, key: str, message: str, severity: str):
    """A finding about the key ``key`` (``assets[2].password_file (cp-1)``), at that key's line."""
    from edge.config.yamlsource import ProfileProblem, path_loc

    loc = path_loc(key.split(" (")[0])
    return ProfileProblem(document.name, document.line_of(loc), key, message, severity)


def cmd_check(args) -> int:
    from edge.config.preflight import check_files
    from edge.config.profile import read_profile

    profile, problems, document = read_profile(args.profile)
    warnings = [problem for problem in problems if problem.is_warning]
    if profile is None:
        _report_errors(args.profile, [problem for problem in problems if not problem.is_warning])
        for warning in warnings:
            _print_problem(warning, "warning: ")
        return EXIT_PROFILE_INVALID
    # The checks `run` makes at start-up, all at once.  What is missing altogether only
    # warns (the folder or file may be put there on site); what is there but unusable fails.
    found = check_files(profile)
    errors = [_at_key(document, f.key, f.text, "error") for f in found if not f.missing]
    warnings += [_at_key(document, f.key, f.text, "warning") for f in found if f.missing]
    warnings += [_at_key(document, key, message, "warning") for key, message in machine_warnings(profile)]
    if errors:
        count = len(errors)
        print(f"{args.profile}: valid, but {count} problem{'s' if count != 1 else ''} on this machine", file=sys.stderr)
        for problem in errors:
            _print_problem(problem)
    else:
        print(f"{args.profile}: OK")
    for warning in sorted(warnings, key=lambda w: w.line):
        _print_problem(warning, "warning: ")
    print(summary(profile))
    return EXIT_FILES_UNUSABLE if errors else EXIT_OK


def cmd_schema(args) -> int:
    from edge.config.profile import json_schema

    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def cmd_run(args) -> int:
    from edge.runtime.logs import setup_logging

    setup_logging(args.log_format, args.log_level)
    profile = _load_or_report(args.profile)
    if profile is None:
        return EXIT_PROFILE_INVALID
    import logging

    from edge.config.preflight import check_files
    from edge.uplink.spool import SpoolError

    log = logging.getLogger("flexedge.cli")
    # Before anything starts (no loop yet): one record naming the path and the cause,
    # rather than a traceback from deep inside SQLite or paho, or a reconnect loop.
    problems = check_files(profile)
    if problems:
        log.error("cannot start: %s", "; ".join(str(problem) for problem in problems))
        return EXIT_FILES_UNUSABLE
    from edge.runtime.daemon import run_gateway

    try:
        asyncio.run(run_gateway(profile, profile_path=args.profile))
    except SpoolError as error:  # the spool changed since the check: still one line
        log.error("cannot start: uplink.spool.path: %s", error)
        return EXIT_FILES_UNUSABLE
    return EXIT_OK


def cmd_demo(args) -> int:
    # The demo lives with the simulators (simulators/demo/), outside the daemon's import
    # graph: imported here only, when the command runs.  It parses its own options.
    from simulators.demo import main as demo_main

    return demo_main(args.demo_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexedge", description="Field-edge gateway for virtual power plants.")
    parser.add_argument("--version", action="version", version=f"flexedge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def logging_options(p):
        p.add_argument("--log-format", choices=["text", "json"], default="text", help="stderr log format (default text)")
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")

    run = sub.add_parser("run", help="run the gateway in the foreground")
    run.add_argument("profile", help="site profile (YAML)")
    logging_options(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a site profile and print a summary")
    check.add_argument("profile", help="site profile (YAML)")
    check.set_defaults(func=cmd_check)

    schema = sub.add_parser("schema", help="print the profile's JSON Schema")
    schema.set_defaults(func=cmd_schema)

    from edge.commission import diagnostics, probe

    probe_parser = sub.add_parser("probe", help="look at a device: identity, points, live values (commissioning)")
    probe.add_arguments(probe_parser)
    probe_parser.set_defaults(func=probe.run)

    diagnostics_parser = sub.add_parser("diagnostics", help="write one archive for a support ticket")
    diagnostics.add_arguments(diagnostics_parser)
    diagnostics_parser.set_defaults(func=diagnostics.run)

    # `flexedge demo --help` is the demo's own (simulators/demo/__init__.py)
    demo = sub.add_parser("demo", help="run the demo site on bundled simulators", add_help=False)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        args.demo_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
