"""CLI of the CPO backend simulator: listen, log every message each way; see ``simulators.cpo_backend``."""

from __future__ import annotations

import argparse
import asyncio
import logging

from simulators.cpo_backend import CpoBackend

log = logging.getLogger("flexedge.simulators.cpo_backend")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.cpo_backend",
        description="A simulated CPO backend (OCPP 1.6J / 2.0.1 / 2.1 central system) that logs every message: "
                    "point a charger, or the gateway's upstream link, at ws://HOST:PORT/ocpp/<charge point id>.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=9100, help="port (default %(default)s)")
    parser.add_argument("--path", default="/ocpp", help="URL path before the charge point id (default %(default)s)")
    parser.add_argument("--id-tag", action="append", dest="id_tags", metavar="TAG",
                        help="an ID tag to accept (repeat); without any, every tag is accepted")
    parser.add_argument("--version", action="append", dest="versions", choices=["1.6", "2.0.1", "2.1"],
                        help="an OCPP version to offer (repeat; default all)")
    parser.add_argument("--password", action="append", default=[], metavar="CP_ID:PASSWORD",
                        help="require HTTP Basic for this charger (repeat)")
    parser.add_argument("--only-known", action="store_true", help="refuse chargers without a --password (HTTP 404)")
    parser.add_argument("--security-profile", type=int, choices=[1, 2, 3], default=1)
    parser.add_argument("--cert-file", help="server certificate (profiles 2, 3)")
    parser.add_argument("--key-file", help="server certificate key")
    parser.add_argument("--ca-file", help="CA of the chargers' client certificates (profile 3)")
    parser.add_argument("--profile-limit-a", type=float,
                        help="send each charger a TxDefaultProfile at this limit (A) once it has booted")
    parser.add_argument("--log-level", default="INFO", help="DEBUG also shows every raw frame")
    args = parser.parse_args(argv)
    passwords = {}
    for item in args.password:
        cp_id, sep, password = item.partition(":")
        if not sep or not cp_id or not password:
            parser.error(f"--password wants CP_ID:PASSWORD, got {item!r}")
        passwords[cp_id] = password
    args.passwords = passwords
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0..65535, got {args.port}")
    return args


async def _send_profiles(backend: CpoBackend, limit_a: float) -> None:
    """A TxDefaultProfile to every charger after each of its boots, as a CPO's smart charging would."""
    done: dict[str, int] = {}
    while True:
        for cp_id in backend.charge_point_ids():
            boots = len(backend.boots(cp_id))
            if boots > done.get(cp_id, 0) and backend.connected(cp_id):
                done[cp_id] = boots
                try:
                    answer = await backend.set_charging_profile(cp_id, limit_a, unit="A")
                    log.info("%s: TxDefaultProfile %g A: %s", cp_id, limit_a, answer.get("status"))
                except Exception as error:  # a CLI keeps going: the log says what failed
                    log.warning("%s: TxDefaultProfile not set: %s", cp_id, error)
        await asyncio.sleep(0.5)


async def main(args: argparse.Namespace) -> None:
    backend = CpoBackend(args.host, args.port, path=args.path, id_tags=args.id_tags,
                         security_profile=args.security_profile, passwords=args.passwords, cert_file=args.cert_file,
                         key_file=args.key_file, ca_file=args.ca_file, accept_unknown=not args.only_known,
                         versions=args.versions or ("1.6", "2.0.1", "2.1"))
    async with backend:
        tasks = [asyncio.create_task(_send_profiles(backend, args.profile_limit_a))] if args.profile_limit_a else []
        try:
            await asyncio.Future()
        finally:
            for task in tasks:
                task.cancel()


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=arguments.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().level > logging.DEBUG:
        # The ocpp library's own lines (every frame, tracebacks for refused payloads): DEBUG only.
        # The backend logs each message and each CALLERROR it answers on one line.
        logging.getLogger("flexedge.simulators.cpo_backend.wire").setLevel(logging.CRITICAL)
    try:
        asyncio.run(main(arguments))
    except KeyboardInterrupt:
        pass
    except ValueError as error:  # bad TLS files or arguments: say so without a traceback
        raise SystemExit(f"error: {error}") from None
