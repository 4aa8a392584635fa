"""The grid operator's orders in force, kept on disk so that they survive a restart.

Without this, a site that the operator had capped would export without limit
after a crash or an update, until the operator sent the order again.  The
daemon hands every change of the orders in force to :meth:`OrderStore.put`;
at start-up, before any driver runs, it reads them back (:meth:`OrderStore.load`)
and puts them in force again with source ``"persisted"`` (docs/deie.md,
"Restart").

File
    ``<spool folder>/<spool stem>.grid-orders.json`` (:func:`orders_path`): the
    same disk as the spool, which the deployment already keeps on persistent
    storage.  One JSON object::

        {"version": 1,
         "orders": {"export_limit_kw": 6.0, "disconnected": false,
                    "reactive_setpoint_kvar": null, "tan_phi": null},
         "source": "deie", "given_at_s": 1718000000.123, "saved_at_s": 1718000000.125}

    ``source`` is where the orders came from before the restart (``deie``,
    ``link_loss_default``); ``given_at_s`` (wall clock, s since the epoch) is
    when this set of orders came into force, i.e. when the last of them was
    given.  A file whose orders are all null/false says that no order is in force.

Durability
    Each save writes a temporary file in the same folder, fsyncs it, renames it
    over the file (``os.replace``, atomic on POSIX) and fsyncs the folder: after
    ``kill -9`` or a power cut the file holds either the previous orders or the
    new ones, never a mix.  Saves run in a worker thread (``asyncio.to_thread``);
    one writer task at a time, newest orders win, so a burst of orders costs at
    most two writes and the last one always reaches the disk.

Errors
    :func:`load_orders` raises :class:`OrderStoreError` (its message names the file
    and the cause) for an unreadable, corrupt or other-version file; a missing
    file is not an error (first start).  A failed save is logged, reported as a
    ``grid_order_persist_failed`` event and retried every ``RETRY_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge.asset import EventSink
from edge.gridorders import GridOrders
from edge.uplink.intake import InboundRejected, load_object

__all__ = ["FORMAT_VERSION", "OrderStore", "OrderStoreError", "StoredOrders", "load_orders", "orders_path",
           "save_orders"]

log = logging.getLogger("flexedge.order_store")

FORMAT_VERSION = 1
MAX_FILE_BYTES = 64 * 1024  # the file is a few hundred bytes
ORDER_FIELDS = ("export_limit_kw", "disconnected", "reactive_setpoint_kvar", "tan_phi")
RETRY_S = 10.0  # a failed save (disk full, read-only remount) is tried again this often


class OrderStoreError(Exception):
    """The orders file cannot be read or written; the message names the file and the cause."""


@dataclass(frozen=True, slots=True)
class StoredOrders:
    orders: GridOrders  # with the source they had when saved
    given_at_s: float  # wall clock: when this set of orders came into force

    @property
    def in_force(self) -> bool:
        return has_orders(self.orders)


def has_orders(orders: GridOrders) -> bool:
    """Any order at all, reactive ones included (``GridOrders.active`` counts only P and disconnection)."""
    return (orders.export_limit_kw is not None or orders.disconnected
            or orders.reactive_setpoint_kvar is not None or orders.tan_phi is not None)


def orders_path(spool_path: Path) -> Path:
    spool_path = Path(spool_path)
    return spool_path.with_name(f"{spool_path.stem}.grid-orders.json")


def _fields(orders: GridOrders) -> tuple[Any, ...]:
    return tuple(getattr(orders, name) for name in ORDER_FIELDS)


def _base_source(source: str) -> str:
    # DeieLink marks orders the controller failed to apply; they are still the operator's orders.
    return source.removesuffix(":unapplied")


# ---------------------------------------------------------------- blocking file I/O (worker thread)


def load_orders(path: Path) -> StoredOrders | None:
    """The orders saved in ``path``; None when there is no file.  Blocking.  Raises only OrderStoreError."""
    try:
        return _load_orders(path)
    except OrderStoreError:
        raise
    except (ValueError, OverflowError, RecursionError, TypeError) as exc:  # whatever a damaged file holds
        raise OrderStoreError(f"grid orders file {path}: unusable ({type(exc).__name__}: {exc})"[:300]) from None


def _load_orders(path: Path) -> StoredOrders | None:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OrderStoreError(f"grid orders file {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        # the same strict reading as a message from outside: no NaN, no huge integers, shallow
        document = load_object(raw, MAX_FILE_BYTES)
    except InboundRejected as exc:
        raise OrderStoreError(f"grid orders file {path}: not usable JSON (truncated or damaged?): {exc.reason}") from None
    version = document.get("version")
    if version != FORMAT_VERSION:
        raise OrderStoreError(f"grid orders file {path}: format version {version!r}, "
                              f"this flexedge reads version {FORMAT_VERSION}")
    orders = document.get("orders")
    if not isinstance(orders, dict):
        raise OrderStoreError(f"grid orders file {path}: 'orders' must be an object")
    values: dict[str, Any] = {}
    for name in ("export_limit_kw", "reactive_setpoint_kvar", "tan_phi"):
        value = orders.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise OrderStoreError(f"grid orders file {path}: orders.{name} must be a number or null, got {value!r}")
        values[name] = None if value is None else float(value)
    disconnected = orders.get("disconnected")
    if not isinstance(disconnected, bool):
        raise OrderStoreError(f"grid orders file {path}: orders.disconnected must be true or false, got {disconnected!r}")
    source = document.get("source")
    if not isinstance(source, str) or not source:
        raise OrderStoreError(f"grid orders file {path}: 'source' must be a non-empty string")
    given_at_s = document.get("given_at_s")
    if isinstance(given_at_s, bool) or not isinstance(given_at_s, (int, float)) or not math.isfinite(given_at_s):
        raise OrderStoreError(f"grid orders file {path}: 'given_at_s' must be a finite number, got {given_at_s!r}")
    try:
        restored = GridOrders(disconnected=disconnected, source=source, **values)
    except ValueError as exc:  # non-finite or negative values
        raise OrderStoreError(f"grid orders file {path}: {exc}") from None
    return StoredOrders(restored, float(given_at_s))


def save_orders(path: Path, stored: StoredOrders) -> None:
    """Replace ``path`` atomically and durably with ``stored``.  Blocking."""
    path = Path(path)
    document = {
        "version": FORMAT_VERSION,
        "orders": dict(zip(ORDER_FIELDS, _fields(stored.orders))),
        "source": stored.orders.source,
        "given_at_s": stored.given_at_s,
        "saved_at_s": time.time(),
    }
    data = (json.dumps(document, indent=1, allow_nan=False) + "\n").encode()
    # Same folder as the target, so that os.replace is a rename within one file system.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        # The rename lives in the folder: without this fsync a power cut can bring back the old file.
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OrderStoreError(f"grid orders file {path}: cannot write it: {exc.strerror or exc}") from None


# ---------------------------------------------------------------- on the event loop


class OrderStore:
    """Keeps the file in step with the orders in force; every method is called on the event loop."""

    def __init__(self, path: Path, emit_event: EventSink, clock_s: Callable[[], float] = time.time):
        self.path = Path(path)
        self._emit = emit_event
        self._clock_s = clock_s
        self._wanted: StoredOrders | None = None  # newest orders handed to put()
        self._written: StoredOrders | None = None  # what the file holds
        self._writer: asyncio.Task | None = None
        self._failing = False  # the last save failed; the writer waits RETRY_S before the next try

    async def load(self) -> StoredOrders | None:
        """Read the file (worker thread); raises :class:`OrderStoreError`."""
        stored = await asyncio.to_thread(load_orders, self.path)
        self._wanted = self._written = stored
        return stored

    def put(self, orders: GridOrders) -> None:
        """The orders now in force; saved in the background, newest wins.  Never blocks."""
        if self._wanted is not None and _fields(self._wanted.orders) == _fields(orders):
            # Only the source changed (the restored orders confirmed by the DEIE, say): the
            # file's orders and their given_at_s still hold.
            return
        self._wanted = StoredOrders(orders.with_(source=_base_source(orders.source)), self._clock_s())
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_wanted(), name="grid-orders-store")

    @property
    def saved(self) -> bool:
        """The file holds the newest orders handed to put()."""
        return self._written is self._wanted

    async def flush(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the newest orders to reach the disk (at shutdown)."""
        if self._writer is None or self._writer.done():
            return
        if self._failing:  # waiting would only delay the shutdown: the error is already reported
            log.warning("grid orders not saved to %s at shutdown: the last save failed", self.path)
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), timeout_s)
        except asyncio.TimeoutError:
            log.warning("grid orders not yet saved to %s after %.1f s at shutdown", self.path, timeout_s)

    async def _write_wanted(self) -> None:
        while self._written is not self._wanted:
            stored = self._wanted
            try:
                await asyncio.to_thread(save_orders, self.path, stored)
            except OrderStoreError as error:
                if not self._failing:
                    log.error("%s; retrying every %.0f s (a restart now would lose the orders in force)", error, RETRY_S)
                    self._emit("grid_order_persist_failed", None, {"path": str(self.path), "error": str(error)})
                self._failing = True
                await asyncio.sleep(RETRY_S)
                continue
            if self._failing:
                log.warning("grid orders saved to %s again", self.path)
                self._failing = False
            self._written = stored
