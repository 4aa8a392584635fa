"""`flexedge diagnostics PROFILE`: one archive for a support ticket (docs/cli.md).

Gathers, each part on its own and bounded in time and size: the profile (redacted) and the
`flexedge check` of it, the point-list templates it names, versions, what the running daemon
serves on its local endpoint (health, state, metrics), the spool's statistics, and the logs.
A part that cannot be had is listed in MANIFEST.json with the reason; the archive is
written anyway.  Nothing is written but the archive, and no secret goes into it
(edge/commission/redact.py).

Exit status: 0 when the archive is written, even with parts missing or a broken profile
(that is when support needs it most); 1 only when the archive cannot be written.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import io
import os
import re
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from edge import __version__
from edge.commission import collect
from edge.commission.collect import Part
from edge.commission.redact import REDACTED, Scrubber, basic_auth_entries, redact_profile, secret_values

EXIT_WRITTEN = 0
EXIT_NOT_WRITTEN = 1

PROFILE_CAP_BYTES = 1 << 20
CAPS = {"daemon/health.json": 64 << 10, "daemon/state.json": 8 << 20, "daemon/metrics.txt": 4 << 20}
LOG_CAP_BYTES = 16 << 20
CHECK_TIMEOUT_S = 20.0
HTTP_TIMEOUT_S = 5.0
SPOOL_TIME_LIMIT_S = 10.0
SUBPROCESS_TIMEOUT_S = 20.0
ORDER = ("profile.yaml", "check.txt", "templates.json", "versions.json", "daemon/", "spool.json", "logs")
WRITE_RESERVE_S = 5.0  # of the overall bound, kept for writing the archive (a quarter of a short bound)
_SITE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SITE_ID_LINE = re.compile(r"(?m)^site:[ \t]*\n(?:[ \t]+.*\n)*?[ \t]+id:[ \t]*[\"']?([A-Za-z0-9_.-]{1,64})")


def _duration_s(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration such as 30m, 24h or 7d, got {text!r}")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _positive_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 1.0 <= value <= 3600.0:
        raise argparse.ArgumentTypeError(f"expected seconds between 1 and 3600, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", help="site profile (YAML); read even when it is broken")
    parser.add_argument("--output", "-o", type=Path,
                        help="archive to write (default ./flexedge-diagnostics-<site id>-<UTC time>.tar.gz)")
    parser.add_argument("--since", type=_duration_s, default=_duration_s("24h"), metavar="DURATION",
                        help="how far back the journal goes: 30m, 24h, 7d (default 24h)")
    parser.add_argument("--log-file", type=Path, help="also take the end of this log file")
    parser.add_argument("--no-journal", action="store_true", help="do not read the systemd journal")
    parser.add_argument("--url", help="the daemon's local endpoint, if not the profile's local_http "
                                      "(http://[USER:PASSWORD@]HOST:PORT)")
    parser.add_argument("--timeout-s", type=_positive_s, default=60.0,
                        help="bound on the whole command, archive written included (default 60)")


# ------------------------------------------------------------------ the profile


class ProfileRead:
    """The profile as far as it could be read: raw text, parsed data, validated model."""

    def __init__(self, path: str):
        self.path = path
        self.raw: bytes | None = None
        self.truncated = False
        self.error: str | None = None
        self.data: Any = None
        self.profile: Any = None  # edge.config.profile.Profile when valid
        self.redacted: Part | None = None
        self.secrets_in_text: set[str] = set()  # the values redaction took out of the text

    def read(self) -> "ProfileRead":
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read(PROFILE_CAP_BYTES + 1)
        except OSError as error:
            self.error = f"cannot read {self.path}: {(error.strerror or str(error)).lower()}"
            return self
        self.truncated = len(raw) > PROFILE_CAP_BYTES
        self.raw = raw[:PROFILE_CAP_BYTES]
        try:
            self.data = yaml.safe_load(self.raw.decode("utf-8", "replace"))
        except yaml.YAMLError:
            return self  # the check says where; the text is still redacted line by line
        try:
            from edge.config.profile import Profile

            self.profile = Profile.model_validate(self.data)
        except Exception:  # noqa: BLE001 -- an invalid profile: the check names its problems
            self.profile = None
        return self

    def section(self, *keys: str) -> dict | None:
        node = self.data
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else None

    @property
    def site_id(self) -> str:
        site = self.section("site")
        value = str(site.get("id", "")) if site else ""
        if site is None and self.raw is not None:  # YAML too broken to parse: the site's `id:` line
            found = _SITE_ID_LINE.search(self.raw.decode("utf-8", "replace"))
            value = found[1] if found else ""
        return value if _SITE_ID.match(value) else "unknown"

    @property
    def spool_path(self) -> Path:
        if self.profile is not None:
            return Path(self.profile.uplink.spool.path)
        from edge.config.profile import Spool

        spool = self.section("uplink", "spool") or {}
        return Path(spool["path"]) if isinstance(spool.get("path"), str) else Path(Spool.model_fields["path"].default)

    def redact(self) -> None:
        if self.raw is None:
            self.redacted = Part.missing("profile.yaml", self.error or "not read")
            return
        text, how, self.secrets_in_text = redact_profile(self.raw.decode("utf-8", "replace"))
        self.redacted = Part("profile.yaml", "truncated" if self.truncated else "ok", text.encode())
        self.redacted.notes.append(f"secrets redacted ({how})")
        if self.truncated:
            self.redacted.notes.append(f"first {PROFILE_CAP_BYTES} bytes kept")


# ------------------------------------------------------------------ running the parts


async def _in_thread(function: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
    """``function(*args)`` in a daemon thread, given up after ``timeout_s``.

    Not asyncio.to_thread: a part stuck in the kernel (a hung NFS read, a wedged journal)
    must not keep the command from finishing, and the default executor's threads are
    joined at exit.  A daemon thread is simply left behind.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def target() -> None:
        try:
            outcome = functools.partial(future.set_result, function(*args))
        except BaseException as error:  # noqa: BLE001 -- handed over to the caller
            outcome = functools.partial(future.set_exception, error)
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop is closed: the command is done with this part
            pass

    threading.Thread(target=target, name=f"diagnostics-{getattr(function, '__name__', 'part')}", daemon=True).start()
    return await asyncio.wait_for(future, max(0.0, timeout_s))


async def _part(names: list[str], deadline: float, timeout_s: float, function: Callable[..., Any], *args: Any) -> list[Part]:
    """Run one collector; whatever goes wrong becomes a missing part naming the cause."""
    bound = min(timeout_s, deadline - time.monotonic())
    try:
        result = await _in_thread(function, *args, timeout_s=bound)
    except asyncio.TimeoutError:
        return [Part.missing(name, f"not gathered within {max(bound, 0):.1f} s") for name in names]
    except Exception as error:  # noqa: BLE001 -- a failing part never fails the archive
        return [Part.missing(name, f"failed: {type(error).__name__}: {error}") for name in names]
    return result if isinstance(result, list) else [result]


async def _gather(args: argparse.Namespace, read: ProfileRead, deadline: float) -> list[Part]:
    local_http = read.section("local_http")
    if read.profile is not None:
        local_http = None if read.profile.local_http is None else read.profile.local_http.model_dump(mode="json")

    async def spool_then_check() -> list[Part]:
        # The check opens the spool too (edge/config/preflight.py); the spool's statistics come
        # first, so that they show the files as the daemon left them.
        spool = await _part(["spool.json"], deadline, SPOOL_TIME_LIMIT_S + 5, collect.spool_part, read.spool_path,
                            SPOOL_TIME_LIMIT_S)
        return await _part(["check.txt"], deadline, CHECK_TIMEOUT_S, collect.check_part, args.profile) + spool

    jobs = [
        spool_then_check(),
        _part(["templates.json"], deadline, 5.0, collect.templates_part, read.data),
        _part(["versions.json"], deadline, SUBPROCESS_TIMEOUT_S, collect.versions_part, SUBPROCESS_TIMEOUT_S / 2),
        _part([name for name, _ in collect.DAEMON_PATHS], deadline, 3 * HTTP_TIMEOUT_S + 1,
              _ask_daemon, args.url, local_http),
    ]
    if not args.no_journal:
        jobs.append(_part(["logs/journal.txt"], deadline, SUBPROCESS_TIMEOUT_S + 1, collect.journal_part,
                          time.time() - args.since, SUBPROCESS_TIMEOUT_S, LOG_CAP_BYTES))
    if args.log_file is not None:
        jobs.append(_part([f"logs/{args.log_file.name}"], deadline, SUBPROCESS_TIMEOUT_S, collect.log_file_part,
                          args.log_file, LOG_CAP_BYTES))
    parts = [read.redacted]
    for found in await asyncio.gather(*jobs):
        parts.extend(found)
    parts.sort(key=lambda part: next((rank for rank, prefix in enumerate(ORDER) if part.name.startswith(prefix)),
                                     len(ORDER)))
    logs = [part for part in parts if part.name.startswith("logs/")]
    if not any(part.status != "missing" for part in logs):
        reasons = "; ".join(f"{part.name}: {part.error}" for part in logs) or "the journal was not read (--no-journal)"
        parts = [part for part in parts if not part.name.startswith("logs/")]
        parts.append(Part.missing("logs", f"no log lines: {reasons}; and no --log-file given"
                                  if args.log_file is None else f"no log lines: {reasons}"))
    return parts


def _ask_daemon(url: str | None, local_http: dict | None) -> list[Part]:
    auth_file = (local_http or {}).get("basic_auth_file")
    auth_entries = basic_auth_entries(Path(auth_file)) if auth_file else None
    return collect.daemon_parts(collect.endpoint_from(url, local_http, auth_entries), HTTP_TIMEOUT_S, CAPS)


# ------------------------------------------------------------------ the archive


def _manifest(args: argparse.Namespace, read: ProfileRead, parts: list[Part], scrubber: Scrubber,
              notes: list[str], started: float, created: str) -> dict[str, Any]:
    return {
        "format": 1,
        "flexedge": __version__,
        "created": created,
        "profile": str(Path(args.profile).absolute()),
        "profile_sha256": hashlib.sha256(read.raw).hexdigest() if read.raw is not None else None,
        "profile_valid": read.profile is not None,
        "since_s": args.since,
        "duration_s": round(time.monotonic() - started, 3),
        "redaction": {
            "profile": "secret values (passwords, tokens, salts, OCPP id_tags) replaced by <redacted>",
            "everywhere": "the secret values themselves, private keys, values given to password, token or idTag "
                          "keys, Basic credentials and passwords in URLs",
            "secrets_shorter_than_4_chars_redacted_in_profile_only": scrubber.short_secrets,
            "notes": notes,
        },
        "parts": [{"name": part.name, "status": part.status, "error": part.error, "notes": part.notes,
                   "size": len(part.data), "sha256": hashlib.sha256(part.data).hexdigest() if part.data else None}
                  for part in parts],
    }


def _write_archive(output: Path, folder: str, members: list[tuple[str, bytes]]) -> int:
    """Write the tar.gz beside its final name, mode 0600, then rename; its size."""
    output = output.absolute()
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask: the archive describes the site
        with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as archive:
            now = time.time()
            for name, data in members:
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size, info.mtime, info.mode = len(data), now, 0o600
                archive.addfile(info, io.BytesIO(data))
        os.replace(temporary, output)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    return output.stat().st_size


def _size_text(size: int) -> str:
    return f"{size} bytes" if size < 10_000 else f"{size / 1000:.0f} kB" if size < 10_000_000 else f"{size / 1e6:.1f} MB"


async def _diagnose(args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.timeout_s - min(WRITE_RESERVE_S, args.timeout_s / 4)
    read = ProfileRead(args.profile)
    try:
        await _in_thread(read.read, timeout_s=min(10.0, deadline - started))
    except asyncio.TimeoutError:
        read.error = f"cannot read {args.profile}: no answer within 10 s"
    read.redact()
    text = read.raw.decode("utf-8", "replace") if read.raw is not None else ""
    try:
        secrets, notes = await _in_thread(secret_values, read.data, text, timeout_s=5.0)
    except asyncio.TimeoutError:  # a password file on a hung mount: say so, scrub what the rules catch
        secrets, notes = set(), ["the secret files named by the profile could not be read within 5 s"]
    secrets |= {value for value in read.secrets_in_text if value and value != REDACTED}
    if args.url:
        from urllib.parse import urlsplit

        if urlsplit(args.url).password:
            secrets.add(urlsplit(args.url).password)
    scrubber = Scrubber(secrets)
    parts = await _gather(args, read, deadline)

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder = f"flexedge-diagnostics-{read.site_id}-{stamp}"
    output = args.output or Path(f"{folder}.tar.gz")
    members = []
    for part in parts:
        part.data = scrubber.data(part.data)
        part.error = scrubber.text(part.error) if part.error else None
        part.notes = [scrubber.text(note) for note in part.notes]
        if part.status != "missing" or part.data:
            members.append((part.name, part.data))
    manifest = _manifest(args, read, parts, scrubber, notes, started,
                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    members.insert(0, ("MANIFEST.json", scrubber.data(collect.as_json(manifest))))
    try:
        size = await _in_thread(_write_archive, output, folder, members,
                                timeout_s=max(WRITE_RESERVE_S, started + args.timeout_s - time.monotonic()))
    except asyncio.TimeoutError:
        print(f"flexedge diagnostics: cannot write {output}: not written within the time bound", file=sys.stderr)
        return EXIT_NOT_WRITTEN
    except OSError as error:
        print(f"flexedge diagnostics: cannot write {output}: {(error.strerror or str(error)).lower()}", file=sys.stderr)
        return EXIT_NOT_WRITTEN

    width = max(len(part.name) for part in parts)
    for part in parts:
        detail = part.error if part.status == "missing" else ", ".join(part.notes)
        print(f"  {part.name:<{width}}  {part.status:<9} {detail or ''}".rstrip())
    if read.raw is not None and read.profile is None:
        print("  the profile is not valid: check.txt has its problems")
    print(f"wrote {output} ({_size_text(size)}); attach it to the support ticket")
    return EXIT_WRITTEN


def run(args: argparse.Namespace) -> int:
    # `flexedge check` runs in-process on a thread and prints: route its output to its buffer
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = collect.ThreadRoutedStream(sys.stdout), collect.ThreadRoutedStream(sys.stderr)
    try:
        return asyncio.run(_diagnose(args))
    finally:
        sys.stdout, sys.stderr = streams
