"""Store-and-forward spool: every telemetry and event message, on disk, until the broker acknowledged it.

The spool is one SQLite file.  Its API is **blocking**; from asyncio code call it
through :func:`asyncio.to_thread`.  One :class:`Spool` may be used from several
threads at once (one connection guarded by a lock).

Durability
    The database runs in WAL mode with ``synchronous=FULL``: every commit
    fsyncs the write-ahead log before :meth:`Spool.append` returns, so a
    message that was appended survives ``kill -9`` *and* power loss.  WAL with
    ``synchronous=NORMAL`` would survive ``kill -9`` but could lose the last
    commits on power loss, which is exactly the event an edge gateway at a
    remote site must expect.  The cost is one fsync per append (one or two per
    control cycle), which even an SD card absorbs; ``bench/spool_size.py``
    measures it.

Size bound
    ``max_bytes`` caps the pages in use in the database file.  An append that
    takes the spool above the cap deletes the oldest messages first, in the same
    transaction, and adds their number to a persisted ``dropped_total``.  Freed
    pages are reused, not returned to the file system: after a long outage the
    file stays near its high-water mark (at most ``max_bytes``) rather than
    being rewritten by a vacuum, which would double the flash wear.  The WAL
    beside it is checkpointed every ~2 MiB and truncated to at most 4 MiB, so
    the files on disk stay below ``max_bytes`` + 4 MiB (+ one transaction).

Sequence numbers
    ``append(..., seq_stream="telemetry")`` takes the next number of that
    stream's persisted counter and writes it into the payload as ``"seq"`` in
    the same transaction that stores the message.  Counters never go back, even
    when every message has been sent and removed, so ``seq`` keeps rising across
    daemon restarts (it restarts at 1 only if the spool file is deleted).

Encoding
    Payloads are stored as compact JSON (UTF-8), zlib-compressed when that is
    smaller (telemetry of a 20-asset site shrinks 3-4x).  :meth:`oldest`
    returns the JSON bytes ready to publish.

Public API::

    Spool(path: Path, max_bytes: int)
    Spool.append(topic, payload, seq_stream=None, qos=1, retain=False) -> int
        # the seq when seq_stream is given, else the row id
    Spool.append_message(topic, payload, seq_stream=None, qos=1, retain=False) -> Appended
        # Appended(seq, message: SpooledMessage, dropped: int); for the uplink
    Spool.oldest(limit, after_id=0) -> list[SpooledMessage]   # ascending id
    Spool.remove(ids: Iterable[int]) -> int                   # rows actually removed
    Spool.stats() -> SpoolStats
    Spool.pending, Spool.dropped_total   # last committed values; never block
    Spool.close()
    inspect_read_only(path, time_limit_s) -> dict   # statistics, writing nothing (diagnostics)

Errors: :class:`SpoolError` (unusable file, closed spool); :class:`ValueError`
for bad arguments or payloads that are not finite JSON.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.config.preflight import SPOOL_SCHEMA_VERSION as SCHEMA_VERSION, describe_os_error, spool_problem

__all__ = ["Appended", "Spool", "SpoolError", "SpoolStats", "SpooledMessage", "MIN_MAX_BYTES", "inspect_read_only"]

MIN_MAX_BYTES = 64 * 1024  # below this the empty schema alone nearly fills the cap
WAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
# Telemetry rows are 1-2 KiB after compression; 4 KiB pages would hold only one
# or two of them (a third of the page wasted), 8 KiB pages pack 85-95 %.
PAGE_SIZE_BYTES = 8192
_ENCODING_JSON = 0
_ENCODING_ZLIB = 1
_COMPRESS_FROM_BYTES = 96  # zlib's header and checksum outweigh the gain below this
_COUNTER_PENDING = "pending"
_COUNTER_DROPPED = "dropped_total"
_SEQ_PREFIX = "seq:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids never reused, so they order all time
    created_s REAL NOT NULL,               -- wall clock, s since epoch
    topic TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    encoding INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""


class SpoolError(Exception):
    """The spool file cannot be used (or the spool is closed); the message names the file."""


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    id: int  # row id: rises with every append, never reused
    topic: str
    payload: bytes  # JSON, ready to publish
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int | None  # the payload's "seq" when a seq_stream was given
    message: SpooledMessage
    dropped: int  # oldest messages deleted by this append to stay under max_bytes
    encoding_problem: str | None = None  # the payload had to be repaired to encode (encode_payload_checked)


@dataclass(frozen=True, slots=True)
class SpoolStats:
    pending: int  # messages stored and not yet removed
    bytes_used: int  # database pages in use (what max_bytes caps)
    bytes_on_disk: int  # database file plus WAL, as the file system sees them
    max_bytes: int
    dropped_total: int  # messages deleted because the spool was full, since the file was created
    oldest_age_s: float | None  # age of the oldest pending message, None when empty


def encode_payload(topic: str, payload: dict[str, Any]) -> bytes:
    """Compact JSON of a message the gateway built; never fails (see encode_payload_checked)."""
    return encode_payload_checked(topic, payload)[0]


def encode_payload_checked(topic: str, payload: dict[str, Any]) -> tuple[bytes, str | None]:
    """Compact UTF-8 JSON, and None; or, when ``payload`` cannot be encoded as it is, the JSON
    of a repaired copy and what was wrong.

    A message the gateway built must never be lost to a value in it (a NaN, a lone
    surrogate, an object JSON has no spelling for): that would drop telemetry, or take a
    sequence number with it.  The repaired copy has NaN and infinities as null, lone
    surrogates as ``\\udxxx`` escapes, and anything else as its ``str()``; the caller
    counts and reports the problem (event ``message_repaired``).
    """
    try:
        return _json(payload), None
    except (ValueError, TypeError, RecursionError) as error:  # UnicodeEncodeError is a ValueError
        problem = f"payload for {topic!r} could not be encoded as built: {type(error).__name__}: {error}"
        problem = problem.encode("utf-8", "backslashreplace").decode("utf-8")[:300]
        return _json(_repaired(payload, 0)), problem


def _json(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


_MAX_REPAIR_DEPTH = 64


def _repaired(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if depth >= _MAX_REPAIR_DEPTH:
        return None
    if isinstance(value, dict):
        return {_repaired(str(key), depth): _repaired(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_repaired(item, depth + 1) for item in value]
    return _repaired(str(value), depth)


class Spool:
    """A bounded, crash-safe FIFO of MQTT messages in one SQLite file.  Blocking; thread-safe."""

    def __init__(self, path: Path, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"spool max_bytes must be an integer of at least {MIN_MAX_BYTES}, got {max_bytes!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None  # before anything can fail: _close_quietly reads it
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(self._why_unusable(f"cannot be created: {describe_os_error(exc)}")) from None
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._open()
        except sqlite3.Error as exc:
            self._close_quietly()
            raise SpoolError(self._why_unusable(f"is not a usable SQLite spool ({exc})")) from None
        except BaseException:
            self._close_quietly()
            raise

    def _why_unusable(self, fallback: str) -> str:
        """SQLite and mkdir say "unable to open database file" or "File exists"; edge.config.preflight says what is wrong."""
        try:
            problem = spool_problem(self.path)
        except Exception:  # noqa: BLE001 -- a diagnosis must not hide the error it explains
            problem = None
        return problem.text if problem is not None else f"spool {self.path} {fallback}"

    # ------------------------------------------------------------- opening

    def _open(self) -> None:
        db = self._db
        assert db is not None
        db.execute(f"PRAGMA page_size={PAGE_SIZE_BYTES}")  # only takes effect on a new file
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(f"spool {self.path}: the file system does not support SQLite WAL mode (got {mode})")
        db.execute("PRAGMA synchronous=FULL")  # see the module docstring: survive power loss
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        # checkpoint every ~2 MiB of WAL rather than SQLite's 1000 pages (8 MiB at our page size)
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_SIZE_LIMIT_BYTES // 2 // PAGE_SIZE_BYTES}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"spool {self.path}: written by a newer flexedge (schema {version}, this one reads {SCHEMA_VERSION})"
            )
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        self._pending = self._counter(_COUNTER_PENDING)
        self._dropped_total = self._counter(_COUNTER_DROPPED)

    def _close_quietly(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    # ------------------------------------------------------------- helpers

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError(f"spool {self.path} is closed")
        return self._db

    def _counter(self, name: str) -> int:
        row = self._conn().execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _set_counter(self, name: str, value: int) -> None:
        self._conn().execute(
            "INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def _used_bytes(self) -> int:
        db = self._conn()
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page_size

    def _transaction(self):
        return _Transaction(self._conn(), self.path)

    # ----------------------------------------------------------------- API

    @property
    def pending(self) -> int:
        """Messages stored, as of the last commit; reads no file and takes no lock."""
        return self._pending

    @property
    def dropped_total(self) -> int:
        """Messages deleted because the spool was full, as of the last commit."""
        return self._dropped_total

    def append(
        self, topic: str, payload: dict[str, Any], seq_stream: str | None = None, qos: int = 1, retain: bool = False
    ) -> int:
        """Store a message; return its seq when ``seq_stream`` is given, else its row id.

        With ``seq_stream`` the payload dict gets ``payload["seq"]`` set to that
        stream's next number.  The commit is fsync'd before this returns.
        """
        result = self.append_message(topic, payload, seq_stream, qos, retain)
        return result.seq if result.seq is not None else result.message.id

    def append_message(
        self, topic: str, payload: dict[str, Any], seq_stream: str | None = None, qos: int = 1, retain: bool = False
    ) -> Appended:
        """Like :meth:`append`, but return the stored message and how many old ones were dropped."""
        if not isinstance(topic, str) or not topic or any(c in topic for c in "#+\0"):
            raise ValueError(f"spool topic must be a non-empty MQTT topic without wildcards, got {topic!r}")
        if not isinstance(payload, dict):
            raise ValueError(f"payload for {topic!r} must be a dict, got {type(payload).__name__}")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos for {topic!r} must be 0, 1 or 2, got {qos!r}")
        if seq_stream is not None and (not isinstance(seq_stream, str) or not seq_stream):
            raise ValueError(f"seq_stream must be a non-empty string or None, got {seq_stream!r}")
        # without a seq the JSON is final now: encode before taking the lock
        json_bytes, problem = encode_payload_checked(topic, payload) if seq_stream is None else (None, None)
        with self._lock:
            with self._transaction():
                seq, row_id, json_bytes, pending, dropped, seq_problem = self._insert(
                    topic, payload, seq_stream, qos, retain, json_bytes)
            # in-memory copies follow the commit, still under the lock
            self._pending = pending
            self._dropped_total += dropped
        if seq is not None:
            payload["seq"] = seq
        return Appended(seq, SpooledMessage(row_id, topic, json_bytes, qos, bool(retain)), dropped, problem or seq_problem)

    def _insert(
        self, topic: str, payload: dict[str, Any], seq_stream: str | None, qos: int, retain: bool, json_bytes: bytes | None
    ) -> tuple[int | None, int, bytes, int, int, str | None]:
        """Inside a transaction: (seq, row id, JSON stored, pending after, dropped, encoding problem)."""
        seq = problem = None
        if seq_stream is not None:
            seq = self._counter(_SEQ_PREFIX + seq_stream) + 1
            self._set_counter(_SEQ_PREFIX + seq_stream, seq)
            # seq first: people read these messages, and it is the key consumers order by
            json_bytes, problem = encode_payload_checked(
                topic, {"seq": seq, **{k: v for k, v in payload.items() if k != "seq"}})
        assert json_bytes is not None
        encoding, body = _compress(json_bytes)
        if len(body) > self.max_bytes // 4:
            raise ValueError(
                f"message for {topic!r} takes {len(body)} bytes stored, more than a quarter of the spool cap"
                f" ({self.max_bytes} bytes)"
            )
        cursor = self._conn().execute(
            "INSERT INTO messages(created_s, topic, qos, retain, encoding, body) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), topic, qos, int(bool(retain)), encoding, body),
        )
        row_id = int(cursor.lastrowid)
        pending = self._pending + 1
        dropped = self._drop_oldest_over_cap(row_id, pending)
        pending -= dropped
        self._set_counter(_COUNTER_PENDING, pending)
        if dropped:
            self._set_counter(_COUNTER_DROPPED, self._dropped_total + dropped)
        return seq, row_id, json_bytes, pending, dropped, problem

    def _drop_oldest_over_cap(self, newest_id: int, pending: int) -> int:
        db = self._conn()
        dropped = 0
        used = self._used_bytes()
        while used > self.max_bytes and pending - dropped > 1:
            # A leaf page is freed only when all its rows are gone, so estimate
            # from the average row and loop until the page count drops.
            average = max(1, used // max(1, pending - dropped))
            count = min(pending - dropped - 1, max(1, math.ceil((used - self.max_bytes) / average)))
            removed = db.execute(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE id < ? ORDER BY id LIMIT ?)",
                (newest_id, count),
            ).rowcount
            if removed <= 0:
                break
            dropped += removed
            used = self._used_bytes()
        return dropped

    def oldest(self, limit: int, after_id: int = 0) -> list[SpooledMessage]:
        """Up to ``limit`` messages with id > ``after_id``, oldest first."""
        if limit < 1:
            raise ValueError(f"oldest(): limit must be at least 1, got {limit}")
        with self._lock:
            try:
                rows = self._conn().execute(
                    "SELECT id, topic, qos, retain, encoding, body FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise SpoolError(f"spool {self.path}: cannot read messages: {exc}") from exc
        return [SpooledMessage(r[0], r[1], _decompress(r[4], r[5], self.path, r[0]), r[2], bool(r[3])) for r in rows]

    def remove(self, ids: Iterable[int]) -> int:
        """Delete acknowledged messages (one fsync'd transaction); unknown ids are ignored."""
        keys = [(int(i),) for i in ids]
        if not keys:
            return 0
        with self._lock:
            with self._transaction():
                before = self._conn().total_changes
                self._conn().executemany("DELETE FROM messages WHERE id = ?", keys)
                removed = self._conn().total_changes - before
                pending = self._pending - removed
                self._set_counter(_COUNTER_PENDING, pending)
            self._pending = pending
        return removed

    def stats(self) -> SpoolStats:
        with self._lock:
            used = self._used_bytes()
            row = self._conn().execute("SELECT created_s FROM messages ORDER BY id LIMIT 1").fetchone()
            pending, dropped = self._pending, self._dropped_total
        on_disk = 0
        for suffix in ("", "-wal"):
            try:
                on_disk += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        age = max(0.0, time.time() - row[0]) if row else None
        return SpoolStats(pending, used, on_disk, self.max_bytes, dropped, age)

    def close(self) -> None:
        """Checkpoint the WAL into the database and close; later calls raise SpoolError."""
        with self._lock:
            if self._db is None:
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # the WAL is replayed at next open anyway
            self._close_quietly()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception; SQLite errors become SpoolError."""

    def __init__(self, db: sqlite3.Connection, path: Path):
        self._db = db
        self._path = path

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self._path}: cannot start a transaction: {exc}") from exc

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as error:  # e.g. disk full: nothing of this transaction is kept
                self._rollback()
                raise SpoolError(f"spool {self._path}: commit failed: {error}") from error
        self._rollback()
        if isinstance(exc, sqlite3.Error):
            raise SpoolError(f"spool {self._path}: {exc}") from exc

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass


def _compress(json_bytes: bytes) -> tuple[int, bytes]:
    if len(json_bytes) >= _COMPRESS_FROM_BYTES:
        packed = zlib.compress(json_bytes, 6)
        if len(packed) < len(json_bytes):
            return _ENCODING_ZLIB, packed
    return _ENCODING_JSON, json_bytes


def _decompress(encoding: int, body: bytes, path: Path, row_id: int) -> bytes:
    if encoding == _ENCODING_JSON:
        return bytes(body)
    if encoding == _ENCODING_ZLIB:
        return zlib.decompress(body)
    raise SpoolError(f"spool {path}: message {row_id} has unknown encoding {encoding}")


# ------------------------------------------------------------ read-only inspection


def inspect_read_only(path: Path, time_limit_s: float = 10.0) -> dict[str, Any]:
    """Statistics of the spool file at ``path``, for ``flexedge diagnostics``, writing nothing.  Blocking.

    The daemon may be writing meanwhile.  With a WAL beside the file (a daemon running or one
    that crashed), the file is opened ``mode=ro`` and read as any reader reads it: SQLite uses
    the shared-memory index (``-shm``) as readers do, and the file and its WAL are not written.
    Without one (the daemon stopped cleanly), a ``mode=ro`` open would create ``-wal`` and
    ``-shm`` files, owned by whoever runs the command, so the file is read ``immutable``.
    Every query stops at ``time_limit_s`` (a spool of a gigabyte takes seconds to scan); what
    did not finish is said so.  Raises SpoolError when the file cannot be read at all.
    """
    path = Path(path)
    deadline = time.monotonic() + time_limit_s
    files = {}
    for suffix in ("", "-wal", "-shm"):
        try:
            files[f"{path.name}{suffix}"] = os.stat(f"{path}{suffix}").st_size
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SpoolError(f"spool {path}{suffix}: cannot be reached: {describe_os_error(exc)}") from None
    if path.name not in files:
        raise SpoolError(f"spool {path} does not exist")
    with_wal = f"{path.name}-wal" in files and f"{path.name}-shm" in files
    mode = "mode=ro" if with_wal else "immutable=1"
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?{mode}", uri=True,
                             timeout=min(2.0, time_limit_s), check_same_thread=False)
    except sqlite3.Error as exc:
        raise SpoolError(f"spool {path} cannot be opened read-only: {exc}") from None
    db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)  # a non-zero answer interrupts the query
    result: dict[str, Any] = {"path": str(path), "files_bytes": files, "opened": mode, "unfinished": []}

    def query(what: str, sql: str) -> list[tuple] | None:
        try:
            return db.execute(sql).fetchall()
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                result["unfinished"].append(f"{what}: not finished within {time_limit_s:g} s")
                return None
            raise

    try:
        for pragma in ("user_version", "page_size", "page_count", "freelist_count", "journal_mode"):
            rows = query(pragma, f"PRAGMA {pragma}")
            result[pragma] = rows[0][0] if rows else None
        counters = dict(query("counters", "SELECT name, value FROM counters") or [])
        result["pending_counter"] = counters.get(_COUNTER_PENDING)
        result["dropped_total"] = counters.get(_COUNTER_DROPPED)
        result["last_seq"] = {name[len(_SEQ_PREFIX):]: value for name, value in counters.items()
                              if name.startswith(_SEQ_PREFIX)}
        rows = query("messages by topic", "SELECT topic, count(*), min(id), max(id), min(created_s), max(created_s) "
                                          "FROM messages GROUP BY topic ORDER BY topic")
        if rows is not None:
            result["waiting_by_topic"] = [
                {"topic": topic, "messages": count, "first_id": first, "last_id": last,
                 "oldest_created_s": oldest, "newest_created_s": newest}
                for topic, count, first, last, oldest, newest in rows]
            result["waiting_total"] = sum(row[1] for row in rows)
            result["oldest_created_s"] = min((row[4] for row in rows), default=None)
            result["newest_created_s"] = max((row[5] for row in rows), default=None)
        if result["page_size"] and result["page_count"] is not None and result["freelist_count"] is not None:
            result["bytes_used"] = (result["page_count"] - result["freelist_count"]) * result["page_size"]
        rows = query("quick_check", "PRAGMA quick_check(20)")
        if rows is not None:
            result["quick_check"] = [row[0] for row in rows]
    except sqlite3.Error as exc:
        raise SpoolError(f"spool {path} cannot be read: {exc}") from None
    finally:
        db.close()
    return result
