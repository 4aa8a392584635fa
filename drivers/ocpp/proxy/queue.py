"""The transaction messages a charger sent while its backend was unreachable, in order.

OCPP's offline behaviour: a charger (here the gateway on its behalf) keeps its
transaction-related messages and delivers them in order once the central system is back.
Bounded: when full, the oldest meter values go first; transactions are never dropped (the
queue then grows past its bound, with a warning, rather than lose a bill).

On disk too (``QueueFile``): the charger believes its messages delivered once the gateway
answered them, so a gateway restart while the backend is away must not lose them.  The
queue (and the 1.6 transaction ids it maps) is written, whole and atomically, a moment after
each change, in a thread; a gateway that starts again puts what it finds there before anything
queued since, and replays it first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger("flexedge.drivers.ocpp.proxy")

QUEUE_FORMAT = 1
SAVE_DELAY_S = 0.2  # changes within this are written together

# What is queued while the backend is away (everything else is answered locally and forgotten).
TRANSACTION_ACTIONS = frozenset({"StartTransaction", "StopTransaction", "MeterValues", "TransactionEvent"})


def is_meter_values(action: str, payload: dict[str, Any]) -> bool:
    """Droppable: 1.6/2.x MeterValues, and 2.x TransactionEvent Updated sent only for its meter values."""
    if action == "MeterValues":
        return True
    return (action == "TransactionEvent" and payload.get("eventType") == "Updated"
            and payload.get("triggerReason") in ("MeterValuePeriodic", "MeterValueClock"))


@dataclass
class QueuedMessage:
    unique_id: str
    action: str
    payload: dict[str, Any]
    local_transaction_id: int | None = None  # 1.6 StartTransaction: the id the gateway gave the charger
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class OfflineQueue:
    def __init__(self, max_messages: int):
        self.max_messages = max_messages
        self._items: deque[QueuedMessage] = deque()
        self.dropped = 0  # meter values dropped, in all

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def push(self, message: QueuedMessage) -> QueuedMessage | None:
        """Queue ``message``; the meter values dropped to make room, if any (None: nothing dropped)."""
        dropped = None
        if len(self._items) >= self.max_messages:
            dropped = self._drop_oldest_meter_values()
            if dropped is None and is_meter_values(message.action, message.payload):
                self.dropped += 1
                return message  # full of transactions: the newest reading is the one to lose
        self._items.append(message)
        return dropped

    def _drop_oldest_meter_values(self) -> QueuedMessage | None:
        for index, item in enumerate(self._items):
            if is_meter_values(item.action, item.payload):
                del self._items[index]
                self.dropped += 1
                return item
        return None

    def head(self) -> QueuedMessage | None:
        return self._items[0] if self._items else None

    def pop_head(self) -> None:
        self._items.popleft()

    def over_bound(self) -> bool:
        return len(self._items) > self.max_messages

    def items(self) -> list[QueuedMessage]:
        return list(self._items)

    def put_first(self, older: list[QueuedMessage]) -> None:
        """Messages from before a restart go ahead of everything queued since."""
        self._items.extendleft(reversed(older))


def queue_path(folder: Path, charge_point_id: str) -> Path:
    return folder / f"{quote(charge_point_id, safe='')}.json"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


class QueueFile:
    """The queue of one charger on disk.  ``restore()`` first (it reads what a previous run left);
    ``changed()`` after every change; nothing is written before the restore, so a file from
    before a restart is never overwritten unread."""

    def __init__(self, path: Path, queue: OfflineQueue, transaction_ids: dict[int, int]):
        self.path = path
        self.queue = queue
        self.transaction_ids = transaction_ids
        self.restored = asyncio.Event()
        self._save: asyncio.TimerHandle | None = None
        self._writing = False
        self._again = False

    async def restore(self) -> int:
        """Put the messages a previous run left ahead of the queue; how many there were."""
        try:
            text = await asyncio.to_thread(_read, self.path)
            older, ids = self._parse(text) if text else ([], {})
        except (OSError, ValueError, TypeError, KeyError) as error:
            log.error("%s: the queued messages for the backend cannot be read (%s): kept aside as %s.bad",
                      self.path, error, self.path.name)
            await asyncio.to_thread(lambda: self.path.exists() and os.replace(self.path, self.path.with_suffix(".bad")))
            older, ids = [], {}
        self.queue.put_first(older)
        for local, remote in ids.items():
            self.transaction_ids.setdefault(local, remote)
        self.restored.set()
        if older or self.queue:
            self.changed()
        return len(older)

    @staticmethod
    def _parse(text: str) -> tuple[list[QueuedMessage], dict[int, int]]:
        data = json.loads(text)
        if data.get("format") != QUEUE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {QUEUE_FORMAT}")
        items = [QueuedMessage(**{k: item[k] for k in ("unique_id", "action", "payload", "local_transaction_id")})
                 for item in data["items"]]
        ids = {int(local): int(remote) for local, remote in data.get("transaction_ids", {}).items()}
        return items, ids

    def changed(self) -> None:
        if not self.restored.is_set():
            return  # the restore writes what is queued meanwhile
        if self._writing:
            self._again = True
        elif self._save is None:
            self._save = asyncio.get_running_loop().call_later(SAVE_DELAY_S, self._start_write)

    def _start_write(self) -> None:
        self._save = None
        self._writing = True
        task = asyncio.ensure_future(asyncio.to_thread(_write, self.path, self._snapshot()))
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Future) -> None:
        self._writing = False
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: the queue for the backend could not be written: %s", self.path, task.exception())
        if self._again:
            self._again = False
            self.changed()

    def _snapshot(self) -> str:
        return json.dumps({"format": QUEUE_FORMAT, "items": [asdict(item) for item in self.queue.items()],
                           "transaction_ids": {str(k): v for k, v in self.transaction_ids.items()}})

    def write_soon(self) -> None:
        """A change waiting for its delay is written now (the gateway stops: the write, in a
        thread, completes before the process ends)."""
        if self._save is not None:
            self._save.cancel()
            self._start_write()
