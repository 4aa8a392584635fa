"""The station's side of the OCPP link: one ocpp-library ChargePoint per version, handlers only.

Handlers run inside the library's receive loop: a CALL the station sends in reaction (a
NotifyReport, a StatusNotification) is spawned as a task, never awaited here.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from ocpp.v21 import ChargePoint as ChargePoint21
from ocpp.v21 import call as call21
from ocpp.v21 import call_result as result21

from simulators.ocpp import device_model
from simulators.ocpp.specs import RequestRecord

if TYPE_CHECKING:
    from simulators.ocpp.station import Station

log = logging.getLogger("flexedge.simulators.ocpp")

CALL_TIMEOUT_S = 5.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _StrictCalls:
    """Records every CALL from the central system; before the boot is accepted, applies ``before_boot``.

    The boot counts as accepted when its answer is read, in the receive loop: a request
    the central system sends right behind the answer must count as after the boot, even
    if the task awaiting the answer has not run yet.
    """

    station: "Station"

    def __init__(self, cp_id, connection, station: "Station"):
        super().__init__(cp_id, connection, response_timeout=CALL_TIMEOUT_S, logger=log)
        self.station = station

    async def route_message(self, raw_msg):
        station = self.station
        try:
            message = json.loads(raw_msg)
        except ValueError:
            message = None
        if isinstance(message, list) and len(message) >= 3:
            if (message[0] == 3 and message[1] == station._boot_call_id and isinstance(message[2], dict)
                    and message[2].get("status") == "Accepted"):
                station._booted = True
            elif message[0] == 2 and len(message) >= 4:
                early = not station._booted
                station.requests.append(RequestRecord(str(message[2]), time.monotonic(), early))
                if early:
                    log.warning("%s: %s received before the boot was accepted",
                                station.spec.charge_point_id, message[2])
                if early and station.spec.before_boot == "call_error":
                    await self._send(json.dumps([4, message[1], "SecurityError",
                                                 "BootNotification not accepted yet", {}]))
                    return
                if early and station.spec.before_boot == "close":
                    await self._connection.close(1008, "request before BootNotification accepted")
                    return
        await super().route_message(raw_msg)


class Point16(_StrictCalls, ChargePoint16):
    @on("SetChargingProfile")
    def on_set_charging_profile(self, connector_id: int, cs_charging_profiles: dict):
        accepted, _ = self.station.receive_profile(cs_charging_profiles, cs_charging_profiles["charging_schedule"],
                                                   connector_id)
        return result16.SetChargingProfile(status="Accepted" if accepted else "Rejected")

    @on("ClearChargingProfile")
    def on_clear_charging_profile(self, id: int | None = None, connector_id: int | None = None,
                                  charging_profile_purpose: str | None = None, stack_level: int | None = None):
        removed = self.station.clear_profiles(id, charging_profile_purpose, stack_level, connector_id)
        return result16.ClearChargingProfile(status="Accepted" if removed else "Unknown")

    @on("TriggerMessage")
    def on_trigger(self, requested_message: str, **extra):
        if requested_message == "StatusNotification":
            self.station._spawn(self.station._send_status())
            return result16.TriggerMessage(status="Accepted")
        return result16.TriggerMessage(status="NotImplemented")


class _Handlers2x(_StrictCalls):
    """What 2.0.1 and 2.1 stations answer alike; ``results`` / ``calls`` are the version's modules."""

    results = result201
    calls = call201

    @on("SetChargingProfile")
    def on_set_charging_profile(self, evse_id: int, charging_profile: dict, **extra):
        accepted, reason = self.station.receive_profile(charging_profile, charging_profile["charging_schedule"][0],
                                                        evse_id)
        info = None if accepted or reason is None else {"reason_code": reason[0], "additional_info": reason[1]}
        return self.results.SetChargingProfile(status="Accepted" if accepted else "Rejected", status_info=info)

    @on("ClearChargingProfile")
    def on_clear_charging_profile(self, charging_profile_id: int | None = None,
                                  charging_profile_criteria: dict | None = None, **extra):
        criteria = charging_profile_criteria or {}
        removed = self.station.clear_profiles(charging_profile_id, criteria.get("charging_profile_purpose"),
                                              criteria.get("stack_level"), criteria.get("evse_id"))
        return self.results.ClearChargingProfile(status="Accepted" if removed else "Unknown")

    @on("TriggerMessage")
    def on_trigger(self, requested_message: str, **extra):
        if requested_message == "StatusNotification":
            self.station._spawn(self.station._send_status())
            return self.results.TriggerMessage(status="Accepted")
        return self.results.TriggerMessage(status="NotImplemented")

    @on("GetVariables")
    def on_get_variables(self, get_variable_data: list, **extra):
        return self.results.GetVariables(
            get_variable_result=device_model.get_variable_results(self.station, get_variable_data))

    @on("GetReport")
    def on_get_report(self, request_id: int, **extra):
        """A report of the variables asked for (all without componentVariable), in a NotifyReport."""
        data = device_model.report_data(self.station, extra.get("component_variable"))
        if not data:
            return self.results.GetReport(status="EmptyResultSet")
        self.station._spawn(self._notify_report(request_id, data))
        return self.results.GetReport(status="Accepted")

    @on("GetBaseReport")
    def on_get_base_report(self, request_id: int, report_base: str, **extra):
        if report_base not in ("FullInventory", "ConfigurationInventory"):
            return self.results.GetBaseReport(status="NotSupported")
        self.station._spawn(self._notify_report(request_id, device_model.report_data(self.station)))
        return self.results.GetBaseReport(status="Accepted")

    async def _notify_report(self, request_id: int, data: list) -> None:
        await self.station._call(self.calls.NotifyReport(request_id=request_id, generated_at=now_iso(), seq_no=0,
                                                         report_data=data))


class Point201(_Handlers2x, ChargePoint201):
    pass


class Point21(_Handlers2x, ChargePoint21):
    results = result21
    calls = call21

    @on("AFRRSignal")
    def on_afrr_signal(self, signal: int, timestamp: str, **extra):
        if not self.station.receive_afrr_signal(signal, timestamp):
            return result21.AFRRSignal(status="Rejected", status_info={
                "reason_code": "UnsupportedRequest", "additional_info": "this charger does not follow AFRRSignal"})
        return result21.AFRRSignal(status="Accepted")
