"""Central-system side of one websocket: OCPP 1.6J, 2.0.1 and 2.1 message handlers.

``CentralPoint16``, ``CentralPoint201`` and ``CentralPoint21`` are the ocpp library's
``ChargePoint`` classes with handlers that answer the charger and feed its
``ChargerSession``.  2.0.1 and 2.1 share one set of handlers (``Handlers2x``), each
answering with its own version's result classes; 2.1 adds nothing the gateway must
answer differently.  Both take an EV's charging needs (NotifyEVChargingNeeds) and
schedule (NotifyEVChargingSchedule).  Handlers never ``call()`` the charger themselves (the
library routes responses through the same receive loop, so a CALL awaited
inside a handler would deadlock); commands go out from the connection's
command task (``drivers.ocpp.central``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from datetime import datetime, timezone
from types import ModuleType
from typing import Any, Callable

import ocpp.messages
from ocpp.messages import Call, MessageType
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint as _ChargePoint16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as _ChargePoint201
from ocpp.v201 import call_result as result201
from ocpp.v21 import ChargePoint as _ChargePoint21
from ocpp.v21 import call_result as result21

from drivers.ocpp.meter import decode_meter_values
from drivers.ocpp.needs import decode_charging_needs, schedule_peak_w
from drivers.ocpp.pacing import LoopPacer, message_priority
from drivers.ocpp.session import ChargerSession

log = logging.getLogger("flexedge.drivers.ocpp")
# The ocpp library logs every frame at INFO, ID tags included (personal data).
# Frames go to their own logger, quiet unless someone asks for it explicitly.
wire_log = logging.getLogger("flexedge.drivers.ocpp.wire")
if wire_log.level == logging.NOTSET:
    wire_log.setLevel(logging.WARNING)

# The library validates every message against its JSON schema in the default
# thread pool.  jsonschema is pure Python, so the threads buy no parallelism,
# only a hand-off per message (it doubled the wall time of a MeterValues
# validation) and GIL contention with the event loop, and they queue behind
# the spool's writes in the same pool.  Validate on the loop instead
# (0.1-0.6 ms a message).  A process-wide switch of the library.
ocpp.messages.ASYNC_VALIDATION = False

# 1.6 transaction ids are chosen by the central system (int32).  Seeding from the
# clock keeps ids of a restarted gateway away from those still running.
_transaction_ids = itertools.count(int(time.time() * 10) % 2**30 + 1)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _wh(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


Authorizer = Callable[[str], bool]


class PrebuiltCalls:
    """``call_prebuilt``: a CALL whose wire payload the driver built itself; and a paced receive loop.

    ``ChargePoint.call`` takes the library's dataclasses and converts them
    generically (dataclass -> dict -> camelCase, by regex, key by key), which
    costs more than the rest of sending a SetChargingProfile; a setpoint that
    moves 500 chargers sends 500 of them.  This sends a camelCase dict
    as is, under the same lock and response queue as ``call``, unvalidated
    (the payload is ours), and returns the response payload (camelCase).
    Raises asyncio.TimeoutError without an answer within the call timeout and
    the matching OCPPError for a CALLERROR, as ``call(suppress=False)`` does.
    It waits for the answer under ``asyncio.timeout`` rather than the library's
    ``wait_for`` (one task fewer per call).  It uses ``ChargePoint`` internals
    of ocpp 2.1 (``_call_lock``, ``_send``, ``_response_queue``);
    tests/test_ocpp_driver.py checks it (answer, CALLERROR, timeout).

    ``start`` is the library's receive loop, except that each message waits
    for a turn of the central system's pacer (``drivers.ocpp.pacing``) before
    it is handled: 500 MeterValues arriving together are handled a few per
    loop iteration, not in one iteration of a quarter of a second.

    The boot gate: some chargers misbehave on a request that arrives before
    their BootNotification is answered, so every CALL to the charger
    (``call`` and ``call_prebuilt``, whatever the request) first waits for
    ``ready``.  It opens once our BootNotification answer *Accepted* has
    been sent on this link, or ``arm_boot_grace(grace_s)`` after connecting
    if the charger sent no BootNotification by then (it was booted already
    and reconnected, e.g. after a gateway restart).  An answer other than
    Accepted (the gateway gives none today) would close it again: under
    Pending or Rejected the charger is not to be spoken to.
    """

    pacer: LoopPacer | None = None

    def __init__(self, cp_id, connection, session: ChargerSession, authorize: Authorizer,
                 heartbeat_s: int, response_timeout_s: float, pacer: LoopPacer | None = None):
        # The central system's side of every version: the library's ChargePoint comes next in the MRO.
        super().__init__(cp_id, connection, response_timeout=response_timeout_s, logger=wire_log)
        self.pacer = pacer
        self.session = session
        self.authorize_tag = authorize
        self.heartbeat_s = heartbeat_s
        self._init_boot_gate()

    def _init_boot_gate(self) -> None:
        self.ready = asyncio.Event()
        self.boot_status: str | None = None  # our answer to the last BootNotification on this link
        self._grace: asyncio.TimerHandle | None = None

    def arm_boot_grace(self, grace_s: float) -> None:
        self._grace = asyncio.get_running_loop().call_later(grace_s, self._grace_over, grace_s)

    def disarm_boot_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _grace_over(self, grace_s: float) -> None:
        self._grace = None
        if self.boot_status is None and not self.ready.is_set():
            log.info("%s: no BootNotification within %g s of connecting: taken as booted", self.id, grace_s)
            self.ready.set()

    def _boot_answered(self) -> None:
        """Runs after the BootNotification answer went out (the library's ``after`` hook)."""
        self.disarm_boot_grace()
        if self.boot_status == "Accepted":
            self.ready.set()
        else:
            self.ready.clear()

    async def call(self, payload, *args, **kwargs):
        await self.ready.wait()
        return await super().call(payload, *args, **kwargs)

    async def _send(self, message) -> None:
        # A charger that stops reading must not hold its link's sender (and the call lock) for
        # ever: a send waits at most the call timeout, then raises TimeoutError as an unanswered
        # CALL does (a frame the gateway answers with: the link ends, as for a broken one).
        async with asyncio.timeout(self._response_timeout):
            await super()._send(message)

    @property
    def response_timeout_s(self) -> float:
        return self._response_timeout

    async def start(self) -> None:
        recv, pacer = self._connection.recv, self.pacer
        while True:
            message = await recv()
            self.logger.info("%s: receive message %s", self.id, message)
            if pacer is not None:
                await pacer.take(message_priority(message))
            await self.route_message(message)

    async def call_prebuilt(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        await self.ready.wait()
        call = Call(unique_id=str(self._unique_id_generator()), action=action, payload=payload)
        async with self._call_lock:
            await self._send(call.to_json())
            async with asyncio.timeout(self._response_timeout):
                while True:
                    response = await self._response_queue.get()
                    if response.unique_id == call.unique_id:
                        break
                    self.logger.error("Ignoring response with unknown unique id: %s", response)
        if response.message_type_id == MessageType.CallError:
            raise response.to_exception()
        return response.payload


class CentralPoint16(PrebuiltCalls, _ChargePoint16):
    def _ours(self, connector_id: int) -> bool:
        wanted = self.session.charger.connector_id
        return wanted == 0 and connector_id != 0 or int(connector_id) == wanted

    def _tag_info(self, id_tag: str) -> dict[str, str]:
        if self.authorize_tag(id_tag):
            return {"status": "Accepted"}
        self.session.emit("authorization_rejected", {"id_tag_hash": self.session.hash_tag(id_tag)})
        return {"status": "Invalid"}

    @on("BootNotification")
    def on_boot(self, charge_point_vendor: str, charge_point_model: str, **extra):
        self.ready.clear()  # a charger that boots again gets nothing until this answer is out
        self.session.on_boot({"vendor": charge_point_vendor, "model": charge_point_model,
                              "firmware": extra.get("firmware_version")})
        self.boot_status = "Accepted"
        return result16.BootNotification(current_time=now_iso(), interval=self.heartbeat_s, status=self.boot_status)

    @after("BootNotification")
    def after_boot(self, **_):
        self._boot_answered()

    @on("Heartbeat")
    def on_heartbeat(self):
        return result16.Heartbeat(current_time=now_iso())

    @on("StatusNotification")
    def on_status(self, connector_id: int, error_code: str, status: str, **extra):
        if self._ours(connector_id):
            self.session.on_status(status)
        return result16.StatusNotification()

    @on("Authorize")
    def on_authorize(self, id_tag: str):
        return result16.Authorize(id_tag_info=self._tag_info(id_tag))

    @on("StartTransaction")
    def on_start(self, connector_id: int, id_tag: str, meter_start: int, timestamp: str, **extra):
        transaction_id = next(_transaction_ids)
        info = self._tag_info(id_tag)
        if info["status"] == "Accepted" and self._ours(connector_id):
            self.session.on_transaction_started(str(transaction_id), id_tag, _wh(meter_start))
        return result16.StartTransaction(transaction_id=transaction_id, id_tag_info=info)

    @on("StopTransaction")
    def on_stop(self, meter_stop: int, timestamp: str, transaction_id: int, **extra):
        if extra.get("transaction_data"):
            self.session.on_meter(decode_meter_values(extra["transaction_data"]))
        self.session.on_transaction_stopped(str(transaction_id), _wh(meter_stop), extra.get("reason"))
        return result16.StopTransaction()

    @on("MeterValues")
    def on_meter_values(self, connector_id: int, meter_value: list, **extra):
        if self._ours(connector_id):
            if extra.get("transaction_id") is not None:
                self.session.on_transaction_seen(str(extra["transaction_id"]))
            self.session.on_meter(decode_meter_values(meter_value))
        return result16.MeterValues()

    @on("DataTransfer")
    def on_data_transfer(self, vendor_id: str, **extra):
        log.info("%s: DataTransfer from vendor %s, message %s (%d chars of data)", self.id, vendor_id,
                 extra.get("message_id"), len(str(extra.get("data") or "")))
        return result16.DataTransfer(status="UnknownVendorId")


class Handlers2x:
    """The handlers of OCPP 2.0.1 and 2.1; ``results`` is the version's call_result module."""

    results: ModuleType

    def _token_info(self, id_token: dict[str, Any] | None) -> dict[str, str]:
        tag = (id_token or {}).get("id_token", "")
        if self.authorize_tag(tag):
            return {"status": "Accepted"}
        self.session.emit("authorization_rejected", {"id_tag_hash": self.session.hash_tag(tag)})
        return {"status": "Invalid"}

    @on("BootNotification")
    def on_boot(self, charging_station: dict, reason: str, **extra):
        self.ready.clear()  # a charger that boots again gets nothing until this answer is out
        self.session.on_boot({"vendor": charging_station.get("vendor_name"), "model": charging_station.get("model"),
                              "firmware": charging_station.get("firmware_version"), "reason": reason})
        self.boot_status = "Accepted"
        return self.results.BootNotification(current_time=now_iso(), interval=self.heartbeat_s, status=self.boot_status)

    @after("BootNotification")
    def after_boot(self, **_):
        self._boot_answered()

    @on("Heartbeat")
    def on_heartbeat(self, **extra):
        return self.results.Heartbeat(current_time=now_iso())

    @on("StatusNotification")
    def on_status(self, timestamp: str, connector_status: str, evse_id: int, connector_id: int, **extra):
        if evse_id == self.session.charger.evse_id:
            self.session.on_status(connector_status)
        return self.results.StatusNotification()

    @on("Authorize")
    def on_authorize(self, id_token: dict, **extra):
        return self.results.Authorize(id_token_info=self._token_info(id_token))

    @on("TransactionEvent")
    def on_transaction_event(self, event_type: str, timestamp: str, trigger_reason: str, seq_no: int,
                             transaction_info: dict, **extra):
        evse = extra.get("evse") or {}
        if evse and evse.get("id") != self.session.charger.evse_id:
            return self.results.TransactionEvent()
        session = self.session
        transaction_id = transaction_info["transaction_id"]
        sample = decode_meter_values(extra.get("meter_value") or [])
        id_token = extra.get("id_token")
        response = self.results.TransactionEvent()
        if id_token is not None:
            response = self.results.TransactionEvent(id_token_info=self._token_info(id_token))
        tag = id_token.get("id_token") if id_token and response.id_token_info["status"] == "Accepted" else None
        if event_type == "Ended":
            session.on_meter(sample)
            session.on_transaction_stopped(transaction_id, sample.energy_wh, transaction_info.get("stopped_reason"))
        else:
            session.on_transaction_started(transaction_id, tag, sample.energy_wh)
            session.on_meter(sample)
        return response

    @on("MeterValues")
    def on_meter_values(self, evse_id: int, meter_value: list, **extra):
        if evse_id == self.session.charger.evse_id:
            self.session.on_meter(decode_meter_values(meter_value))
        return self.results.MeterValues()

    @on("DataTransfer")
    def on_data_transfer(self, vendor_id: str, **extra):
        log.info("%s: DataTransfer from vendor %s, message %s", self.id, vendor_id, extra.get("message_id"))
        return self.results.DataTransfer(status="UnknownVendorId")

    @on("NotifyReport")
    def on_notify_report(self, request_id: int, generated_at: str, seq_no: int, **extra):
        # Asked for on every link (drivers.ocpp.commands.request_ratings); a report asked for
        # by anyone else that carries the variable counts as well.
        report_data = extra.get("report_data") or []
        kw = evse_max_power_kw(report_data, self.session.charger.evse_id)
        if kw is not None:
            self.session.on_device_max_power(kw, f"OCPP EVSE {self.session.charger.evse_id} Power maxLimit")
        self.session.on_report(request_id, report_data, bool(extra.get("tbc")))
        return self.results.NotifyReport()

    @on("NotifyEVChargingNeeds")
    def on_charging_needs(self, evse_id: int, charging_needs: Any, **extra):
        """Accepted, and the next profile follows within the cycle; Rejected for another EVSE or a
        message nothing can be made of.  A bad value is left out with one log line naming it."""
        session = self.session
        if evse_id != session.charger.evse_id:
            log.info("%s: NotifyEVChargingNeeds for EVSE %s, not this asset's (%d): rejected", self.id, evse_id,
                     session.charger.evse_id)
            return self.results.NotifyEVChargingNeeds(status="Rejected")
        try:
            needs, problems = decode_charging_needs(charging_needs, session.charger.voltage_v,
                                                    session.charger.phases, time.time())
        except Exception:  # a decoder bug must not take the link down: the car is told no
            log.exception("%s: NotifyEVChargingNeeds could not be decoded", self.id)
            needs, problems = None, []
        for problem in problems:
            log.warning("%s: NotifyEVChargingNeeds %s: ignored", self.id, problem)
        if needs is None:
            return self.results.NotifyEVChargingNeeds(status="Rejected")
        session.on_charging_needs(needs)
        return self.results.NotifyEVChargingNeeds(status="Accepted")

    @on("NotifyEVChargingSchedule")
    def on_charging_schedule(self, time_base: str, evse_id: int, charging_schedule: Any, **extra):
        """The EV's own schedule within the profile sent: noted, not acted on."""
        peak_w = schedule_peak_w(charging_schedule)
        allowed_kw = self.session.charge_max_kw()
        if peak_w is not None:
            log.debug("%s: the EV's schedule peaks at %.0f W: %s the charging maximum of %.0f W", self.id, peak_w,
                      "within" if peak_w <= allowed_kw * 1000.0 + 1.0 else "above", allowed_kw * 1000.0)
        return self.results.NotifyEVChargingSchedule(status="Accepted")


class _Central2x(Handlers2x, PrebuiltCalls):
    """The 2.0.1 and 2.1 handlers on the central system's connection."""


class CentralPoint201(_Central2x, _ChargePoint201):
    results = result201


class CentralPoint21(_Central2x, _ChargePoint21):
    """OCPP 2.1: the same handlers, 2.1's result classes and schemas."""

    results = result21


def evse_max_power_kw(report_data: list[dict[str, Any]], evse_id: int) -> float | None:
    """The maxLimit of device-model variable EVSE Power for ``evse_id`` in a NotifyReport, in kW;
    None when the report does not carry it or carries no usable figure (W unless it says kW)."""
    for item in report_data:
        component, variable = item.get("component") or {}, item.get("variable") or {}
        if component.get("name") != "EVSE" or (component.get("evse") or {}).get("id") != evse_id \
                or variable.get("name") != "Power" or variable.get("instance"):
            continue
        characteristics = item.get("variable_characteristics") or {}
        limit, unit = characteristics.get("max_limit"), characteristics.get("unit") or "W"
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
            continue
        if unit not in ("W", "kW"):
            log.info("EVSE %d Power maxLimit %g in unit %r: not understood", evse_id, limit, unit)
            continue
        return float(limit) if unit == "kW" else float(limit) / 1000.0
    return None
