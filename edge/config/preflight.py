"""The files and folders a profile names, checked before anything starts: one clear line per problem.

``flexedge check`` and ``flexedge run`` call :func:`check_files`; the spool and the
uplink use the same functions when they open a file later, so a problem reads the
same wherever it is found: ``<profile key>: <what> <path> <cause>``, e.g.
``uplink.mqtt.password_file: password file /etc/flexedge/mqtt-password is empty``.

What is checked:

* the spool (``uplink.spool.path``): its folder exists or can be created, is a
  folder, and accepts new files (SQLite puts ``-wal`` and ``-shm`` files beside the
  database); an existing spool is a regular file that opens for writing and is an
  SQLite database this flexedge can read;
* the uplink's ``password_file`` (exists, readable, a file, first line not blank),
  ``password_env`` (set), and TLS files (exist, readable, PEM of the right kind; the
  certificate, key and CA load together).

Writability is tried, not asked: ``os.access`` says yes to root for almost
everything, and to anyone for /proc and /sys.  Trying means creating and removing
a ``.flexedge-check-*`` file (or folder, when the spool's folder is still to be
made) in the folder concerned.

Everything here blocks (stat, open, SQLite): at run time call it through
:func:`asyncio.to_thread`.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import ssl
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FileProblem", "FileProblemError", "check_files", "spool_problem", "read_password", "tls_context"]

SQLITE_HEADER = b"SQLite format 3\x00"
# The spool's format (PRAGMA user_version), which edge/uplink/spool.py writes and this
# checks: defined here, below the uplink, so that the check need not import it.
SPOOL_SCHEMA_VERSION = 1
_PROBE_PREFIX = ".flexedge-check-"
_CERTIFICATE = re.compile(rb"-----BEGIN (?:TRUSTED )?CERTIFICATE-----")
_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
_MAX_PEM_BYTES = 1 << 20  # a CA bundle is ~200 kB; more is not a PEM file meant for us

# The wording people search for, rather than C's capitalised strerror.
_ERRNO_TEXT = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "the file system does not allow it",  # /proc: the folder exists, creating in it fails so
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.ELOOP: "too many symbolic links",
    errno.ENAMETOOLONG: "the name is too long",
}


@dataclass(frozen=True, slots=True)
class FileProblem:
    key: str  # the profile key that names the path, e.g. "uplink.spool.path"
    what: str  # "spool", "password file", "CA file" ...
    path: Path | str
    cause: str  # reads on from the path: "is empty", "does not exist" ...
    missing: bool = False  # not there at all: `check` only warns (a profile is often checked off-site)

    @property
    def text(self) -> str:
        return f"{self.what} {self.path} {self.cause}"

    def __str__(self) -> str:
        return f"{self.key}: {self.text}"


class FileProblemError(ValueError):
    """A file the profile names cannot be used; ``str()`` is the problem's one line."""

    def __init__(self, problem: FileProblem):
        self.problem = problem
        super().__init__(str(problem))


def describe_os_error(exc: OSError) -> str:
    if exc.errno in _ERRNO_TEXT:
        return _ERRNO_TEXT[exc.errno]
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


def _stat(path: Path) -> os.stat_result | None:
    """``None`` when nothing is there (including a path through a file); other errors propagate."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _probe(folder: Path, make_folder: bool = False) -> OSError | None:
    """Create and remove a file (or folder) in ``folder``: the only test of writability that root cannot pass by privilege."""
    try:
        if make_folder:
            os.rmdir(tempfile.mkdtemp(prefix=_PROBE_PREFIX, dir=folder))
        else:
            fd, name = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return exc
    return None


# -------------------------------------------------------------------- spool


def spool_problem(path: Path, key: str = "uplink.spool.path") -> FileProblem | None:
    """Why the spool at ``path`` cannot be opened or created, or ``None`` if it can (as far as can be told)."""
    path = Path(path)

    def problem(cause: str, missing: bool = False) -> FileProblem:
        return FileProblem(key, "spool", path, cause, missing)

    try:
        info = _stat(path)
    except OSError as exc:  # e.g. a folder on the way that we may not enter
        return problem(f"cannot be reached: {describe_os_error(exc)}")
    if info is None:
        return _new_spool_problem(path, problem)
    if stat.S_ISDIR(info.st_mode):
        return problem("is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        return problem("is not a regular file")
    try:
        # O_RDWR without O_CREAT or O_TRUNC changes nothing; it fails as the daemon's open would
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            header = os.read(fd, len(SQLITE_HEADER))
        finally:
            os.close(fd)
    except OSError as exc:
        return problem(f"cannot be opened for writing: {describe_os_error(exc)}")
    if header and header != SQLITE_HEADER:
        return problem("is not an SQLite database (another kind of file, or damaged)")
    error = _probe(path.parent)
    if error is not None:
        return problem(f"cannot be used: its folder {path.parent} does not accept new files, and SQLite needs its "
                       f"-wal and -shm files there: {describe_os_error(error)}")
    if header:
        return _database_problem(path, problem)
    return None  # empty: SQLite makes a new database of it


def _new_spool_problem(path: Path, problem) -> FileProblem | None:
    folder = path.parent
    for candidate in (folder, *folder.parents):
        try:
            info = _stat(candidate)
        except OSError as exc:
            return problem(f"cannot be created: folder {candidate} cannot be reached: {describe_os_error(exc)}")
        if info is not None:
            break
    else:  # not even the root exists: a relative path's "." always does, so this is unreachable in practice
        return problem("cannot be created: none of its folders exists")
    if not stat.S_ISDIR(info.st_mode):
        return problem(f"cannot be created: {candidate} is a file, not a folder")
    if candidate == folder:
        error = _probe(folder)
        if error is not None:
            return problem(f"cannot be created: folder {folder} does not accept new files: {describe_os_error(error)}")
        return None
    error = _probe(candidate, make_folder=True)
    if error is not None:
        # The folder may appear by deployment (systemd's StateDirectory): `check` off-site only warns.
        return problem(f"cannot be created: folder {folder} does not exist and cannot be created in {candidate}: "
                       f"{describe_os_error(error)}", missing=True)
    return None


def _database_problem(path: Path, problem) -> FileProblem | None:
    try:
        # Read-only: a check must not change a spool the daemon may be using.  Without a WAL beside
        # it (no daemon has it open), even a mode=ro open creates -wal and -shm files, owned by
        # whoever runs the check: read it as immutable then (as edge.uplink.spool.inspect_read_only).
        with_wal = path.with_name(path.name + "-wal").exists()
        mode = "mode=ro" if with_wal else "immutable=1"
        db = sqlite3.connect(f"{path.absolute().as_uri()}?{mode}", uri=True, timeout=2.0)
    except sqlite3.Error as exc:
        return problem(f"cannot be opened by SQLite: {exc}")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "messages" in tables:
            db.execute("SELECT max(id) FROM messages").fetchone()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return None  # a running daemon holds it for a moment: in use, so usable
        return problem(f"cannot be read by SQLite ({exc})")
    except sqlite3.DatabaseError as exc:
        return problem(f"is a damaged SQLite database ({exc})")
    finally:
        db.close()
    if version > SPOOL_SCHEMA_VERSION:
        return problem(f"was written by a newer flexedge (schema {version}; this one reads {SPOOL_SCHEMA_VERSION})")
    return None


# ------------------------------------------------------------------- uplink


def _regular_file(key: str, what: str, path: Path) -> bytes:
    """The file's bytes, or FileProblemError saying why not."""
    def fail(cause: str, missing: bool = False) -> FileProblemError:
        return FileProblemError(FileProblem(key, what, path, cause, missing))

    try:
        info = _stat(path)
    except OSError as exc:
        raise fail(f"cannot be reached: {describe_os_error(exc)}") from None
    if info is None:
        raise fail("does not exist", missing=True)
    if stat.S_ISDIR(info.st_mode):
        raise fail("is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise fail("is not a regular file")  # a FIFO would block the reader
    try:
        with open(path, "rb") as handle:
            return handle.read(_MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise fail(f"cannot be read: {describe_os_error(exc)}") from None


def read_password(path: Path, key: str = "uplink.mqtt.password_file") -> str:
    """The first line of the password file; FileProblemError if it is missing, unreadable or blank."""
    path = Path(path)
    data = _regular_file(key, "password file", path)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise FileProblemError(FileProblem(key, "password file", path, "is not UTF-8 text")) from None
    lines = text.splitlines()
    if not text.strip():
        raise FileProblemError(FileProblem(key, "password file", path, "is empty"))
    if not lines[0].strip():
        raise FileProblemError(FileProblem(key, "password file", path, "has a blank first line (the password is the first line)"))
    return lines[0]


_TLS_FILES = (  # key, what, the PEM block it must hold, its name in a message
    ("ca_file", "CA file", _CERTIFICATE, "certificate"),
    ("cert_file", "client certificate", _CERTIFICATE, "certificate"),
    ("key_file", "client key", _PRIVATE_KEY, "private key"),
)


def _pem_problem(key: str, what: str, path: Path, block: re.Pattern, name: str) -> FileProblem | None:
    try:
        data = _regular_file(key, what, path)
    except FileProblemError as error:
        return error.problem
    if not data.strip():
        return FileProblem(key, what, path, "is empty")
    if not block.search(data):
        header = "-----BEGIN CERTIFICATE-----" if name == "certificate" else "-----BEGIN PRIVATE KEY-----"
        found = "it holds PEM, but no" if b"-----BEGIN" in data else "no"
        return FileProblem(key, what, path, f"is not a PEM {name} ({found} {header} line)")
    if name == "private key" and (b"ENCRYPTED" in data):
        return FileProblem(key, what, path, "is encrypted: the daemon cannot ask for its pass phrase (use an unencrypted key "
                                            "readable by the service only)")
    return None


def _no_pass_phrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal: a daemon would hang.
    return b""


def tls_context(tls: Any, prefix: str = "uplink.mqtt.tls") -> ssl.SSLContext:
    """The client TLS context of ``tls`` (ca_file, cert_file, key_file); FileProblemError naming the file at fault."""
    for attribute, what, block, name in _TLS_FILES:
        path = getattr(tls, attribute)
        if path is not None:
            problem = _pem_problem(f"{prefix}.{attribute}", what, Path(path), block, name)
            if problem is not None:
                raise FileProblemError(problem)
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (ssl.SSLError, OSError) as exc:
        raise FileProblemError(FileProblem(f"{prefix}.ca_file", "CA file", tls.ca_file, f"cannot be loaded: {exc}")) from None
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=_no_pass_phrase)
        except (ssl.SSLError, OSError) as exc:
            cause = f"cannot be used with key {tls.key_file}: {exc}"
            if "KEY_VALUES_MISMATCH" in str(exc):
                cause = f"does not match key {tls.key_file} ({exc})"
            raise FileProblemError(FileProblem(f"{prefix}.cert_file", "client certificate", tls.cert_file, cause)) from None
    return context


# -------------------------------------------------------------------- all


def check_files(profile: Any) -> list[FileProblem]:
    """Every problem with the files, folders and variables the profile's uplink needs, in one pass."""
    problems: list[FileProblem] = []
    spool = spool_problem(Path(profile.uplink.spool.path))
    if spool is not None:
        problems.append(spool)
    mqtt = profile.uplink.mqtt
    if mqtt.password_file is not None:
        try:
            read_password(mqtt.password_file)
        except FileProblemError as error:
            problems.append(error.problem)
    if mqtt.password_env and mqtt.password_env not in os.environ:
        problems.append(FileProblem("uplink.mqtt.password_env", "environment variable", mqtt.password_env, "is not set",
                                    missing=True))
    for index, asset in enumerate(profile.assets):
        # A charger whose configured password cannot be had is refused (fail closed): say so first.
        charger_file = getattr(asset, "password_file", None)
        if charger_file is not None:
            try:
                read_password(charger_file, f"assets[{index}].password_file ({asset.id})")
            except FileProblemError as error:
                problems.append(error.problem)
        charger_env = getattr(asset, "password_env", None)
        if charger_env and charger_env not in os.environ:
            problems.append(FileProblem(f"assets[{index}].password_env ({asset.id})", "environment variable",
                                        charger_env, "is not set", missing=True))
    if mqtt.tls is not None:
        found = [
            problem
            for attribute, what, block, name in _TLS_FILES
            if getattr(mqtt.tls, attribute) is not None
            and (problem := _pem_problem(f"uplink.mqtt.tls.{attribute}", what, Path(getattr(mqtt.tls, attribute)), block, name))
        ]
        problems.extend(found)
        if not found:  # each file is fine alone: do they load together (key matches certificate ...)?
            try:
                tls_context(mqtt.tls)
            except FileProblemError as error:
                problems.append(error.problem)
    return problems
