"""The transaction messages a charger sent while its backend was unreachable, in order.

OCPP's offline behaviour: a charger (here the gateway on its behalf) keeps its
transaction-related messages and delivers them in order once the central system is back.
Bounded: when full, the oldest meter values go first; transactions are never dropped (the
queue then grows past its bound, with a warning, rather than lose a bill).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

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
