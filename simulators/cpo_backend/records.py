"""What the CPO backend simulator keeps: every message each way, and views built from them.

The views (transactions, meter values, boots, authorizations) are computed from the
recorded messages when asked, so they always agree with what crossed the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class BackendCallError(Exception):
    """A CALL the backend sent did not get a CALLRESULT."""


class ChargerNotConnected(BackendCallError):
    """No link to that charger (never connected, gone, or lost before the answer)."""


class CallTimeout(BackendCallError, TimeoutError):
    """The charger did not answer within the timeout."""


class CallErrorAnswer(BackendCallError):
    """The charger answered CALLERROR; ``code``, ``description``, ``details`` as sent."""

    def __init__(self, message: str, code: str, description: str, details: Any):
        super().__init__(message)
        self.code, self.description, self.details = code, description, details


@dataclass
class Received:
    """A CALL from a charger, as on the wire (``payload`` camelCase), and the backend's answer."""

    action: str
    unique_id: str
    payload: Any
    received_at: float  # wall clock, s since epoch
    received_mono: float
    connection_no: int  # 1 for the charger's first connection, 2 for its second, ...
    ocpp_version: str
    answer: dict | None = None  # the CALLRESULT payload
    error_code: str | None = None  # set when the backend answered CALLERROR

    @property
    def answered(self) -> bool:
        return self.answer is not None or self.error_code is not None


@dataclass
class Sent:
    """A CALL the backend sent (its own ``cpo-N`` unique id) and what came back."""

    action: str
    unique_id: str
    payload: dict
    sent_at: float
    sent_mono: float
    connection_no: int
    answer: dict | None = None
    error_code: str | None = None
    error_description: str | None = None
    answered_mono: float | None = None


@dataclass(frozen=True)
class Link:
    """One websocket connection of a charger."""

    connection_no: int
    ocpp_version: str
    remote: str
    opened_mono: float


@dataclass(frozen=True)
class Refusal:
    """A handshake the backend refused (HTTP ``status``)."""

    charge_point_id: str
    status: int
    reason: str
    at_mono: float


@dataclass(frozen=True)
class Boot:
    charge_point_id: str
    ocpp_version: str
    vendor: str | None
    model: str | None
    reason: str | None  # 2.x BootReason
    received_at: float
    received_mono: float
    connection_no: int
    status: str | None  # the backend's answer


@dataclass(frozen=True)
class Authorization:
    """An ID tag presented in Authorize, StartTransaction (1.6) or TransactionEvent (2.x)."""

    id_tag: str
    status: str | None  # Accepted / Invalid as answered (None: not answered)
    action: str
    received_mono: float
    connection_no: int


@dataclass(frozen=True)
class MeterReading:
    transaction_id: str | None
    timestamp: str | None  # the charger's
    measurand: str
    value: float
    unit: str
    phase: str | None
    context: str | None
    received_mono: float
    connection_no: int


@dataclass
class Transaction:
    """One transaction: its messages in arrival order (start, meter values, stop)."""

    transaction_id: str
    id_tag: str | None = None
    status: str | None = None  # the authorization answered at the start
    started_at: str | None = None  # the charger's timestamps
    stopped_at: str | None = None
    meter_start_wh: float | None = None
    meter_stop_wh: float | None = None
    stop_reason: str | None = None
    messages: list[Received] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.stopped_at is not None

    @property
    def seq_nos(self) -> list[int]:
        """2.x TransactionEvent seqNo values in arrival order (a gap or repeat shows loss or replay)."""
        return [m.payload.get("seqNo") for m in self.messages if m.action == "TransactionEvent"]

    @property
    def meter_readings(self) -> list[MeterReading]:
        return [r for m in self.messages for r in readings(m)]


def _dict(value) -> dict:
    # The views read payloads the schema let through, but a test may record anything: never fail on shape.
    return value if isinstance(value, dict) else {}


def _status(answer: dict | None, key: str) -> str | None:
    return _dict(_dict(answer).get(key)).get("status")


def boots(charge_point_id: str, messages: list[Received]) -> list[Boot]:
    found = []
    for m in messages:
        if m.action != "BootNotification" or m.error_code or not isinstance(m.payload, dict):
            continue
        station = _dict(m.payload.get("chargingStation"))
        vendor = m.payload.get("chargePointVendor", station.get("vendorName"))
        model = m.payload.get("chargePointModel", station.get("model"))
        found.append(Boot(charge_point_id, m.ocpp_version, vendor, model, m.payload.get("reason"), m.received_at,
                          m.received_mono, m.connection_no, _dict(m.answer).get("status")))
    return found


def authorizations(messages: list[Received]) -> list[Authorization]:
    found = []
    for m in messages:
        if m.error_code or not isinstance(m.payload, dict):
            continue
        if m.action == "Authorize" or m.action == "StartTransaction" or (
                m.action == "TransactionEvent" and "idToken" in m.payload):
            tag = m.payload.get("idTag")
            if tag is None:
                tag = _dict(m.payload.get("idToken")).get("idToken")
            status = _status(m.answer, "idTagInfo") or _status(m.answer, "idTokenInfo")
            found.append(Authorization(str(tag), status, m.action, m.received_mono, m.connection_no))
    return found


def readings(message: Received) -> list[MeterReading]:
    """The sampled values a message carries (MeterValues, TransactionEvent, 1.6 StopTransaction transactionData)."""
    payload = _dict(message.payload)
    transaction_id = payload.get("transactionId", _dict(payload.get("transactionInfo")).get("transactionId"))
    if transaction_id is None and message.action == "StartTransaction":
        transaction_id = _dict(message.answer).get("transactionId")
    groups = payload.get("meterValue") or payload.get("transactionData") or []
    found = []
    for group in groups if isinstance(groups, list) else []:
        samples = _dict(group).get("sampledValue")
        for sample in samples if isinstance(samples, list) else []:
            sample = _dict(sample)
            try:
                value = float(sample["value"])
            except (KeyError, TypeError, ValueError, OverflowError):
                continue
            unit = sample.get("unit") or _dict(sample.get("unitOfMeasure")).get("unit") or "Wh"
            found.append(MeterReading(
                None if transaction_id is None else str(transaction_id), group.get("timestamp"),
                sample.get("measurand", "Energy.Active.Import.Register"), value, unit, sample.get("phase"),
                sample.get("context"), message.received_mono, message.connection_no))
    return found


def transactions(messages: list[Received]) -> list[Transaction]:
    """Transactions in the order of their first message; 1.6 ids are the ones the backend gave."""
    found: dict[str, Transaction] = {}

    def get(transaction_id) -> Transaction:
        key = str(transaction_id)
        if key not in found:
            found[key] = Transaction(key)
        return found[key]

    for m in messages:
        payload = _dict(m.payload)
        info = _dict(payload.get("transactionInfo"))
        if m.error_code:
            continue
        if m.action == "StartTransaction":
            if _dict(m.answer).get("transactionId") is None:
                continue
            t = get(m.answer["transactionId"])
            t.id_tag, t.status = payload.get("idTag"), _status(m.answer, "idTagInfo")
            t.started_at = payload.get("timestamp")
            t.meter_start_wh = _number(payload.get("meterStart"))
        elif m.action == "StopTransaction" and "transactionId" in payload:
            t = get(payload["transactionId"])
            t.stopped_at, t.stop_reason = payload.get("timestamp"), payload.get("reason", "Local")
            t.meter_stop_wh = _number(payload.get("meterStop"))
        elif m.action == "MeterValues" and payload.get("transactionId") is not None:
            t = get(payload["transactionId"])
        elif m.action == "TransactionEvent" and "transactionId" in info:
            t = get(info["transactionId"])
            register = [r.value for r in readings(m) if r.measurand == "Energy.Active.Import.Register"]
            if payload.get("eventType") == "Started":
                t.started_at = payload.get("timestamp")
                t.meter_start_wh = register[0] if register else t.meter_start_wh
            elif payload.get("eventType") == "Ended":
                t.stopped_at = payload.get("timestamp")
                t.stop_reason = info.get("stoppedReason", "Local")
                t.meter_stop_wh = register[-1] if register else t.meter_stop_wh
            if "idToken" in payload and t.id_tag is None:
                t.id_tag, t.status = _dict(payload["idToken"]).get("idToken"), _status(m.answer, "idTokenInfo")
        else:
            continue
        t.messages.append(m)
    return list(found.values())


def _number(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError, OverflowError):
        return None
