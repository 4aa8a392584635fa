"""Logging to stderr: readable by a person by default, JSON lines for machines.

Every flexedge logger is under ``flexedge.`` (``flexedge.daemon``, ``flexedge.uplink``,
``flexedge.drivers.sunspec`` ...).  One handler on the root logger, set up once by
:func:`setup_logging`, formats every record, the libraries' included; the libraries
(pymodbus, websockets, ocpp, aiomqtt, asyncio) are kept at WARNING.

Text::

    2026-12-04T09:21:18.123Z INFO  flexedge.daemon: event=command_failed asset=pv1 reason="no answer"

JSON: one object per line with ``ts``, ``level``, ``logger``, ``msg`` and, for a
structured record (:func:`log_fields`), its fields as top-level keys.

pymodbus logs every failed connect and every unanswered request, at each reconnect; the
SunSpec driver reports the same as one offline line per transition.  :class:`LibraryChatter`
folds pymodbus's connection-level records away (counted), lets anything else through, and
keeps the last connect failure's cause for the driver's own line.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections import Counter
from typing import Any

LIBRARY_LOGGERS = ("pymodbus", "websockets", "ocpp", "aiomqtt", "asyncio")
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})
_NEEDS_QUOTES = re.compile(r'[\s"=\\]|[^\x20-\x7e\u00a0-\U0010ffff]')


def utc_stamp(created_s: float) -> str:
    """``2026-12-04T09:21:18.123Z``: ISO 8601, UTC, milliseconds."""
    whole = int(created_s)
    millis = min(999, int((created_s - whole) * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


# ------------------------------------------------------------------ structured records


def log_fields(logger: logging.Logger, level: int, message: str, /, **fields: Any) -> None:
    """Log ``message`` with ``fields``: ``key=value`` after the message in text, top-level keys in JSON.

    Fields keep the order given (None is ``null``).  ``message`` is taken as it is (no
    %-formatting), so it may contain anything."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", message, extra={"fields": fields}, stacklevel=2)


def text_value(value: Any) -> str:
    """One field's value in a text line: bare when unambiguous, else a JSON string."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, int) or math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)) and value and all(_plain_item(item) for item in value):
        return ",".join(text_value(item) for item in value)  # assets=pv1,pv2
    text = value if isinstance(value, str) else json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"))
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _plain_item(item: Any) -> bool:
    if isinstance(item, str):
        return bool(item) and "," not in item and not _NEEDS_QUOTES.search(item)
    return isinstance(item, (int, float)) and not isinstance(item, bool)


def render_fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{key}={text_value(value)}" for key, value in fields.items())


def _jsonable(value: Any) -> Any:
    """JSON-safe: non-finite floats as strings, unknown objects as their str()."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item) for item in value]
    return str(value)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields = getattr(record, "fields", None)
        if fields:
            message = f"{message} {render_fields(fields)}" if message else render_fields(fields)
        line = f"{utc_stamp(record.created)} {record.levelname:<5} {record.name}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        message = record.getMessage()
        entry: dict[str, Any] = {
            "ts": utc_stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message or render_fields(fields),
        }
        for key, value in fields.items():
            entry[f"field_{key}" if key in _RESERVED else key] = _jsonable(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


# ------------------------------------------------------------------ pymodbus's chatter


class LibraryChatter(logging.Filter):
    """Drops a library's connection-level records, counted by kind; lets the others through.

    pymodbus repeats "Failed to connect ..." (or its own "Repeating....") at every reconnect
    and "No response received ..." at every unanswered request; the driver says the same
    once per transition, with the cause, which it takes from :attr:`last_connect_failure`."""

    KINDS = (
        ("connect_failed", re.compile(r"^Failed to connect\b")),
        ("not_connected", re.compile(r"^(Not connected, trying to connect|Cancel send, because not connected)")),
        ("no_response", re.compile(r"^(ERROR: )?No response received\b")),
    )

    def __init__(self) -> None:
        super().__init__()
        self.dropped: Counter[str] = Counter()
        self.last_connect_failure: str | None = None  # "[Errno 111] Connect call failed ..."; "" for a timeout
        self._last_dropped = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text == "Repeating....":  # pymodbus's mark for a repeat of its previous record
            if self._last_dropped:
                self.dropped["repeated"] += 1
            return not self._last_dropped
        for kind, pattern in self.KINDS:
            if pattern.match(text):
                if kind == "connect_failed":
                    self.last_connect_failure = text[len("Failed to connect"):].strip()
                self.dropped[kind] += 1
                self._last_dropped = True
                return False
        self._last_dropped = False
        return True


PYMODBUS_CHATTER = LibraryChatter()
_PYMODBUS_LOGGER = "pymodbus.logging"  # where pymodbus's Log class writes (a filter sees no child's records)


def fold_pymodbus_chatter() -> LibraryChatter:
    """Put :data:`PYMODBUS_CHATTER` on pymodbus's logger (once) and return it."""
    logger = logging.getLogger(_PYMODBUS_LOGGER)
    if PYMODBUS_CHATTER not in logger.filters:
        logger.addFilter(PYMODBUS_CHATTER)
    return PYMODBUS_CHATTER


def pymodbus_connect_cause() -> str | None:
    """Why pymodbus's last connect failed, in words ("Connection refused", "no answer"), or None.

    pymodbus logs the cause and returns False; read this right after that False, with no
    await in between, and it is this connect's cause (pymodbus logs nothing for a repeat
    of its previous record, which is then this same text)."""
    text = fold_pymodbus_chatter().last_connect_failure
    if text is None:
        return None
    if not text:
        return "no answer (timed out)"
    errno = re.match(r"\[Errno (\d+)\]", text)
    if errno:
        import os

        return os.strerror(int(errno.group(1)))
    return text


# ------------------------------------------------------------------ set-up


def setup_logging(log_format: str = "text", level: str = "info") -> None:
    """The one root handler (stderr), for flexedge's loggers and the libraries' alike."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (reconnect attempts, frame dumps) is ours to report, not theirs.
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.setLevel(logging.WARNING)
        library.handlers[:] = []  # through our handler and format, not one of their own
        library.propagate = True
    fold_pymodbus_chatter()
