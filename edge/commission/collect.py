"""The parts of a diagnostics archive, each gathered on its own: one that fails says why and the rest go on.

Every function here blocks (files, subprocesses, HTTP, SQLite) and bounds itself (a timeout,
a byte or line limit); `edge/commission/diagnostics.py` runs each in a thread under an
overall deadline.  Nothing here writes anywhere: the spool is read-only, the daemon is only
asked over its local endpoint, and the journal is only read.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import io
import json
import platform
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import edge
from edge import __version__
from edge.local.auth import HASH_PREFIX
from edge.resources import template_path

DISTRIBUTIONS = ("flexedge", "pymodbus", "c104", "ocpp", "websockets", "pysunspec2", "paho-mqtt", "aiomqtt",
                 "pydantic", "PyYAML", "prometheus-client")
SYSTEMD_UNIT = "flexedge.service"
SYSTEMD_PROPERTIES = ("LoadState", "ActiveState", "SubState", "Result", "NRestarts", "MainPID", "ExecMainStatus",
                      "ExecMainStartTimestamp", "ExecMainExitTimestamp", "ActiveEnterTimestamp", "UnitFileState",
                      "FragmentPath")
JOURNAL_MAX_LINES = 20_000


@dataclass
class Part:
    """One member of the archive: what it holds, or why it is missing."""

    name: str  # path inside the archive's folder, e.g. "daemon/state.json"
    status: str = "ok"  # ok, truncated (over its cap; the note says what was kept), missing
    data: bytes = b""
    error: str | None = None  # why it is missing
    notes: list[str] = field(default_factory=list)

    @classmethod
    def missing(cls, name: str, why: str) -> "Part":
        return cls(name, "missing", error=why)


def as_json(value: Any) -> bytes:
    return (json.dumps(value, indent=1, ensure_ascii=False, default=str) + "\n").encode()


def utc_iso(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------ flexedge check


class ThreadRoutedStream(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr: what a registered thread prints goes to its buffer.

    `flexedge check` prints; run in-process, its output is captured this way without
    swapping the streams of the other threads at work meanwhile.
    """

    def __init__(self, fallback):
        self.fallback = fallback
        self.buffers: dict[int, io.StringIO] = {}

    def write(self, text: str) -> int:
        buffer = self.buffers.get(threading.get_ident())
        return (buffer if buffer is not None else self.fallback).write(text)

    def flush(self) -> None:
        if threading.get_ident() not in self.buffers:
            self.fallback.flush()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.fallback, "encoding", None) or "utf-8"

    def isatty(self) -> bool:
        return self.fallback.isatty()

    def fileno(self) -> int:
        return self.fallback.fileno()


def check_part(profile_path: str) -> Part:
    """`flexedge check PROFILE`, in-process, its output and exit status."""
    from edge.cli import cmd_check  # same layer; the command line's own check, not a copy

    buffer = io.StringIO()
    routed = [stream for stream in (sys.stdout, sys.stderr) if isinstance(stream, ThreadRoutedStream)]
    for stream in routed:
        stream.buffers[threading.get_ident()] = buffer
    try:
        status = cmd_check(_Args(profile_path))
    except BaseException as error:  # noqa: BLE001 -- a crash of the check is itself a finding
        status = f"crashed: {type(error).__name__}: {error}"
    finally:
        for stream in routed:
            stream.buffers.pop(threading.get_ident(), None)
    text = f"$ flexedge check {profile_path}\n{buffer.getvalue()}\nexit status: {status}\n"
    part = Part("check.txt", data=text.encode())
    part.notes.append(f"flexedge check: exit {status}")
    return part


class _Args:
    def __init__(self, profile: str):
        self.profile = profile


# ------------------------------------------------------------------ templates


def templates_part(data: Any) -> Part:
    """The point-list templates the profile names: shipped files, so their name and sha256 say all."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "template" and isinstance(value, str):
                    names.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(data)
    deie = data.get("grid", {}).get("deie") if isinstance(data, dict) and isinstance(data.get("grid"), dict) else None
    if isinstance(deie, dict) and "template" not in deie:
        names.add("deie")  # the DEIE's default template (docs/deie.md)
    found = []
    for name in sorted(names):
        entry: dict[str, Any] = {"name": name}
        try:
            path = template_path(name)
            entry["path"] = str(path)
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        except (ValueError, OSError) as error:
            entry["error"] = str(error)
        found.append(entry)
    part = Part("templates.json", data=as_json({"templates": found}))
    part.notes.append(f"{len(found)} named" if found else "none named")
    return part


# ------------------------------------------------------------------ versions


def versions_part(timeout_s: float) -> Part:
    distributions = {}
    for name in DISTRIBUTIONS:
        try:
            distributions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            distributions[name] = None
    uname = platform.uname()
    info = {
        "flexedge": __version__,
        "flexedge_location": str(Path(edge.__file__).resolve().parent),
        "python": {"version": sys.version, "executable": sys.executable},
        "sqlite": sqlite3.sqlite_version,
        "openssl": ssl.OPENSSL_VERSION,
        "platform": {"system": uname.system, "node": uname.node, "release": uname.release, "version": uname.version,
                     "machine": uname.machine, "architecture": platform.architecture()[0],
                     "os_release": _os_release()},
        "distributions": distributions,
        "systemd": _systemd_state(timeout_s),
    }
    return Part("versions.json", data=as_json(info))


def _os_release() -> dict[str, str] | str:
    try:
        with open("/etc/os-release", encoding="utf-8", errors="replace") as handle:
            text = handle.read(16_384)
    except OSError as error:
        return f"cannot read /etc/os-release: {error.strerror or error}"
    pairs = (line.partition("=") for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {key: value.strip().strip('"') for key, _, value in pairs}


def _systemd_state(timeout_s: float) -> dict[str, str]:
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return {"unavailable": "no systemctl on this machine"}
    command = [systemctl, "show", SYSTEMD_UNIT, "--no-pager", "-p", ",".join(SYSTEMD_PROPERTIES)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"unavailable": f"systemctl show gave no answer within {timeout_s:g} s"}
    except OSError as error:
        return {"unavailable": f"systemctl cannot be run: {error.strerror or error}"}
    text = done.stdout.decode("utf-8", "replace")[:16_384]
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return {"unavailable": f"systemctl show: exit {done.returncode}" + (f": {why[0]}" if why else "")}
    return {key: value for key, _, value in (line.partition("=") for line in text.splitlines()) if key}


# ------------------------------------------------------------------ the running daemon


DAEMON_PATHS = (("daemon/health.json", "/health"), ("daemon/state.json", "/api/state"), ("daemon/metrics.txt", "/metrics"))


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # http://127.0.0.1:8750
    where: str  # 127.0.0.1:8750, for messages
    credentials: tuple[str, str] | None = None
    auth_note: str | None = None  # why no credentials could be had, when the endpoint wants some


def endpoint_from(url: str | None, local_http: dict | None, auth_entries: list[tuple[str, str]] | None) -> Endpoint | str:
    """Where and how to ask the daemon, or why it cannot be asked."""
    if url:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"--url {url!r} is not an http:// or https:// URL with a host"
        credentials = None
        if parts.username is not None:
            credentials = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port:
            netloc += f":{parts.port}"
        base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        return Endpoint(base, netloc, credentials)
    if local_http is None:
        return "local_http is not enabled in the profile, so the daemon has no endpoint to ask (--url asks one anyway)"
    host = str(local_http.get("host", "127.0.0.1"))
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # listening everywhere: ask here
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{local_http.get('port', 8750)}"
    credentials = note = None
    if auth_entries is not None:  # the profile names a Basic auth file
        plain = [(user, password) for user, password in auth_entries if not password.startswith(HASH_PREFIX)]
        if plain:
            credentials = plain[0]
        else:
            note = ("basic_auth_file has no plain-text entry to log in with (empty, unreadable, or hashed passwords "
                    "only): give --url http://USER:PASSWORD@" + netloc)
    return Endpoint(f"http://{netloc}", netloc, credentials, note)


def daemon_parts(endpoint: Endpoint | str, timeout_s: float, caps: dict[str, int]) -> list[Part]:
    """/health, /api/state and /metrics as the daemon serves them; one reason for all when it cannot be reached."""
    if isinstance(endpoint, str):
        return [Part.missing(name, endpoint) for name, _ in DAEMON_PATHS]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    parts: list[Part] = []
    unreachable = None
    for name, path in DAEMON_PATHS:
        if unreachable:
            parts.append(Part.missing(name, unreachable))
            continue
        request = urllib.request.Request(endpoint.base_url + path, headers={"User-Agent": f"flexedge-diagnostics/{__version__}"})
        if endpoint.credentials is not None:
            token = base64.b64encode(":".join(endpoint.credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        cap = caps[name]
        try:
            with contextlib.closing(opener.open(request, timeout=timeout_s)) as response:
                body, status = response.read(cap + 1), response.status
        except urllib.error.HTTPError as error:
            status = error.code
            try:
                body = error.read(cap + 1)
            except OSError:
                body = b""
            if status in (401, 403):
                why = f"the daemon at {endpoint.where} refused the request: HTTP {status}"
                why += f"; {endpoint.auth_note}" if endpoint.auth_note else (
                    " (check local_http.basic_auth_file)" if endpoint.credentials else "")
                parts.append(Part.missing(name, why))
                continue
            if not body:
                parts.append(Part.missing(name, f"the daemon at {endpoint.where} answered {path} with HTTP {status}"))
                continue
        except (urllib.error.URLError, OSError, ValueError) as error:
            unreachable = f"daemon not reachable at {endpoint.where}: {_network_reason(error, timeout_s)}"
            parts.append(Part.missing(name, unreachable))
            continue
        part = Part(name, data=body[:cap])
        if status != 200:
            part.notes.append(f"HTTP {status}")  # /health says 503 when unhealthy: its body is the finding
        if len(body) > cap:
            part.status = "truncated"
            part.notes.append(f"first {cap} bytes kept")
        parts.append(part)
    return parts


def _network_reason(error: BaseException, timeout_s: float) -> str:
    reason = getattr(error, "reason", error)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(reason, socket.gaierror):
        return f"host name not resolved ({reason.strerror or reason})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or type(reason).__name__


# ------------------------------------------------------------------ the spool


def spool_part(spool_path: Path, time_limit_s: float) -> Part:
    """The spool's statistics and the grid orders kept beside it, read without writing a byte."""
    from edge.control.order_store import OrderStoreError, load_orders, orders_path
    from edge.uplink.spool import SpoolError, inspect_read_only

    report: dict[str, Any] = {"path": str(spool_path)}
    notes = []
    try:
        stats = inspect_read_only(spool_path, time_limit_s)
        for key in ("oldest_created_s", "newest_created_s"):
            stats[key.replace("_created_s", "_created")] = utc_iso(stats.get(key))
        if stats.get("oldest_created_s") is not None:
            stats["oldest_age_s"] = round(time.time() - stats["oldest_created_s"], 3)
        report["spool"] = stats
        if "waiting_total" in stats:
            notes.append(f"{stats['waiting_total']} messages waiting"
                         + (f", oldest {stats['oldest_created']}" if stats["waiting_total"] else ""))
        if "quick_check" in stats:
            notes.append("quick_check " + ("ok" if stats["quick_check"] == ["ok"] else "FAILED"))
        notes.extend(stats.get("unfinished", []))
    except SpoolError as error:
        report["spool_error"] = str(error)
        notes.append(str(error))
    path = orders_path(spool_path)
    try:
        stored = load_orders(path)
        if stored is None:
            report["grid_orders"] = {"path": str(path), "file": "none (no grid order kept)"}
        else:
            orders = stored.orders
            report["grid_orders"] = {
                "path": str(path), "in_force": stored.in_force, "source": orders.source,
                "given_at": utc_iso(stored.given_at_s), "export_limit_kw": orders.export_limit_kw,
                "disconnected": orders.disconnected, "reactive_setpoint_kvar": orders.reactive_setpoint_kvar,
                "tan_phi": orders.tan_phi}
    except OrderStoreError as error:
        report["grid_orders"] = {"path": str(path), "error": str(error)}
    if "spool" not in report:
        return Part("spool.json", "missing", as_json(report), error=report["spool_error"])
    return Part("spool.json", data=as_json(report), notes=notes)


# ------------------------------------------------------------------ logs


def journal_part(since_epoch_s: float, timeout_s: float, cap: int) -> Part:
    name = "logs/journal.txt"
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        return Part.missing(name, "no journalctl on this machine")
    since = datetime.fromtimestamp(since_epoch_s, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = [journalctl, "-u", SYSTEMD_UNIT, "--since", since, "-o", "short-iso-precise", "--no-pager",
               "-n", str(JOURNAL_MAX_LINES)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Part.missing(name, f"journalctl gave no answer within {timeout_s:g} s")
    except OSError as error:
        return Part.missing(name, f"journalctl cannot be run: {error.strerror or error}")
    lines = [line for line in done.stdout.splitlines(keepends=True) if not line.startswith(b"-- No entries --")]
    why = done.stderr.decode("utf-8", "replace").strip().splitlines()
    if not lines:
        return Part.missing(name, f"the journal has no entries of {SYSTEMD_UNIT} since {since}"
                                  + (f" (journalctl: {why[0]})" if why else ""))
    part = _tail(name, b"".join(lines), cap)
    if len(lines) >= JOURNAL_MAX_LINES:
        part.notes.append(f"the newest {JOURNAL_MAX_LINES} lines since {since}")
    return part


def log_file_part(path: Path, cap: int) -> Part:
    name = f"logs/{path.name or 'log'}"
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - cap - 1))
            data = handle.read(cap + 1)
    except OSError as error:
        return Part.missing(name, f"cannot read --log-file {path}: {error.strerror or error}")
    return _tail(name, data, cap)


def _tail(name: str, data: bytes, cap: int) -> Part:
    """The newest ``cap`` bytes, from a line's start: the end of a log is what support reads first."""
    if len(data) <= cap:
        return Part(name, data=data)
    data = data[-cap:]
    data = data[data.find(b"\n") + 1:] if b"\n" in data else data
    return Part(name, "truncated", data, notes=[f"the newest {len(data)} bytes kept"])

