"""The backend's side of one charger link: the ocpp library's ChargePoint per version, handlers only.

Every frame is recorded before the library sees it, and every answer the library sends is
attached to the CALL it answers, so the records show the wire, including refusals.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ocpp.exceptions import NotImplementedError as OcppNotImplemented
from ocpp.exceptions import NotSupportedError, OCPPError, ProtocolError
from ocpp.messages import unpack
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call_result as result16
from ocpp.v16.enums import Action as Action16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call_result as result201
from ocpp.v201.enums import Action as Action201
from ocpp.v21 import ChargePoint as ChargePoint21
from ocpp.v21 import call_result as result21
from ocpp.v21.enums import Action as Action21

if TYPE_CHECKING:
    from simulators.cpo_backend.backend import CpoBackend, _Link

log = logging.getLogger("flexedge.simulators.cpo_backend")
wire_log = logging.getLogger("flexedge.simulators.cpo_backend.wire")

_ACTIONS = {"1.6": Action16, "2.0.1": Action201, "2.1": Action21}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Recording:
    backend: "CpoBackend"
    link: "_Link"
    version: str

    def __init__(self, cp_id, connection, backend: "CpoBackend", link: "_Link"):
        super().__init__(cp_id, connection, response_timeout=5, logger=wire_log)
        self.backend, self.link = backend, link
        self._unanswered: dict[str, object] = {}

    async def route_message(self, raw_msg):
        # One bad frame must cost the charger an error answer, never the link or the server.
        try:
            await self._route(raw_msg)
        except Exception:
            log.exception("%s: frame not handled: %.200r", self.id, raw_msg)

    async def _route(self, raw_msg) -> None:
        try:
            message = json.loads(raw_msg)
        except (ValueError, TypeError):
            message = None
        if isinstance(message, list) and len(message) >= 3 and message[0] in (3, 4):
            self.backend._answer_arrived(self.link, message)
            return
        if (isinstance(message, list) and len(message) == 4 and message[0] == 2
                and isinstance(message[1], str) and isinstance(message[2], str)):
            unique_id, action = message[1], message[2]
            self._unanswered[unique_id] = self.backend._record_call(self.link, unique_id, action, message[3])
            if action not in self.route_map:
                known = action in {a.value for a in _ACTIONS[self.version]}
                error = (OcppNotImplemented(details={"cause": f"the CPO backend simulator does not handle {action}"})
                         if known else NotSupportedError(details={"cause": f"{action} is not OCPP {self.version}"}))
                await self._send_error(unique_id, error)
                return
            await super().route_message(raw_msg)  # the library: schema check, handler, CALLRESULT or CALLERROR
            return
        try:
            unpack(raw_msg)
            error: OCPPError = ProtocolError(details={"cause": "a CALL needs a string id, a string action, a payload"})
        except OCPPError as refused:
            error = refused
        readable = isinstance(message, list) and len(message) > 1 and isinstance(message[1], str)
        unique_id = message[1] if readable else "-1"
        self.backend._record_malformed(self.link, raw_msg, error)
        await self._send_error(unique_id, error)

    async def _send_error(self, unique_id: str, error: OCPPError) -> None:
        cause = error.details.get("cause") if isinstance(error.details, dict) else None
        details = {"cause": str(cause)} if cause else {}
        await self._send(json.dumps([4, unique_id, error.code, error.description, details]))

    async def _send(self, message):
        try:
            frame = json.loads(message)
        except ValueError:
            frame = None
        if isinstance(frame, list) and len(frame) >= 3 and frame[0] in (3, 4):
            received = self._unanswered.pop(frame[1], None)
            if received is not None:
                if frame[0] == 3:
                    received.answer = frame[2]
                else:
                    received.error_code = frame[2]
                self.backend._answered(self.link, received)
        await super()._send(message)

    # ------------------------------------------------------------- what every version answers

    def _tag_status(self, tag) -> str:
        return self.backend.tag_status(tag)


class Backend16(_Recording, ChargePoint16):
    version = "1.6"

    @on("BootNotification")
    def on_boot(self, **fields):
        return result16.BootNotification(current_time=now_iso(), interval=self.backend.heartbeat_interval_s,
                                         status=self.backend.boot_status)

    @on("Heartbeat")
    def on_heartbeat(self, **fields):
        return result16.Heartbeat(current_time=now_iso())

    @on("StatusNotification")
    def on_status(self, **fields):
        return result16.StatusNotification()

    @on("Authorize")
    def on_authorize(self, id_tag, **fields):
        return result16.Authorize(id_tag_info={"status": self._tag_status(id_tag)})

    @on("StartTransaction")
    def on_start(self, id_tag, **fields):
        return result16.StartTransaction(transaction_id=self.backend._next_transaction_id(),
                                         id_tag_info={"status": self._tag_status(id_tag)})

    @on("StopTransaction")
    def on_stop(self, id_tag=None, **fields):
        return result16.StopTransaction(id_tag_info=None if id_tag is None else {"status": self._tag_status(id_tag)})

    @on("MeterValues")
    def on_meter_values(self, **fields):
        return result16.MeterValues()

    @on("DataTransfer")
    def on_data_transfer(self, **fields):
        return result16.DataTransfer(status="Accepted")

    @on("FirmwareStatusNotification")
    def on_firmware(self, **fields):
        return result16.FirmwareStatusNotification()

    @on("DiagnosticsStatusNotification")
    def on_diagnostics(self, **fields):
        return result16.DiagnosticsStatusNotification()


class _Backend2x(_Recording):
    results = result201

    @on("BootNotification")
    def on_boot(self, **fields):
        return self.results.BootNotification(current_time=now_iso(), interval=self.backend.heartbeat_interval_s,
                                             status=self.backend.boot_status)

    @on("Heartbeat")
    def on_heartbeat(self, **fields):
        return self.results.Heartbeat(current_time=now_iso())

    @on("StatusNotification")
    def on_status(self, **fields):
        return self.results.StatusNotification()

    @on("Authorize")
    def on_authorize(self, id_token, **fields):
        return self.results.Authorize(id_token_info={"status": self._tag_status(id_token.get("id_token"))})

    @on("TransactionEvent")
    def on_transaction_event(self, id_token=None, **fields):
        info = None if id_token is None else {"status": self._tag_status(id_token.get("id_token"))}
        return self.results.TransactionEvent(id_token_info=info)

    @on("MeterValues")
    def on_meter_values(self, **fields):
        return self.results.MeterValues()

    @on("DataTransfer")
    def on_data_transfer(self, **fields):
        return self.results.DataTransfer(status="Accepted")

    @on("NotifyReport")
    def on_notify_report(self, **fields):
        return self.results.NotifyReport()

    @on("NotifyEVChargingNeeds")
    def on_charging_needs(self, **fields):
        return self.results.NotifyEVChargingNeeds(status="Accepted")

    @on("NotifyEvent")
    def on_notify_event(self, **fields):
        return self.results.NotifyEvent()

    @on("SecurityEventNotification")
    def on_security_event(self, **fields):
        return self.results.SecurityEventNotification()

    @on("FirmwareStatusNotification")
    def on_firmware(self, **fields):
        return self.results.FirmwareStatusNotification()

    @on("NotifyChargingLimit")
    def on_charging_limit(self, **fields):
        return self.results.NotifyChargingLimit()

    @on("ReportChargingProfiles")
    def on_report_profiles(self, **fields):
        return self.results.ReportChargingProfiles()


class Backend201(_Backend2x, ChargePoint201):
    version = "2.0.1"


class Backend21(_Backend2x, ChargePoint21):
    version = "2.1"
    results = result21


POINT_CLASSES = {"1.6": Backend16, "2.0.1": Backend201, "2.1": Backend21}
