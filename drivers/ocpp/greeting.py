"""What the central system asks and sets once per connection, once the boot gate is open.

In this order, each request answered (or timed out) before the next, and all before the
first limit: TriggerMessage(StatusNotification), so a restarted gateway learns whether an
EV is plugged in; on 2.0.1 and 2.1 a GetReport of the EVSE's maximum power (its rating,
``request_ratings``); on 2.1 the charger's V2X features (``drivers.ocpp.features``); and
the failsafe max profile (``send_failsafe``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from ocpp.exceptions import OCPPError
from ocpp.v16 import call as call16
from ocpp.v201 import call as call201
from ocpp.v21 import call as call21

from drivers.ocpp.config import OcppCharger
from drivers.ocpp.features import learn_features, resolve
from drivers.ocpp.schedule import failsafe_payload, max_purpose

log = logging.getLogger("flexedge.drivers.ocpp")

_CALLS_2X = {"2.0.1": call201, "2.1": call21}
MAX_PURPOSES = ("ChargePointMaxProfile", "ChargingStationMaxProfile")


async def trigger_status(point, version: str, charger: OcppCharger) -> None:
    """Ask for a StatusNotification, so a restarted gateway learns whether an EV is plugged in."""
    if version == "1.6":
        request = call16.TriggerMessage(requested_message="StatusNotification",
                                        connector_id=charger.connector_id or None)
    else:
        request = _CALLS_2X[version].TriggerMessage(requested_message="StatusNotification",
                                                    evse={"id": charger.evse_id, "connector_id": 1})
    try:
        await point.call(request, suppress=False)
    except (OCPPError, asyncio.TimeoutError) as error:
        log.info("%s: TriggerMessage StatusNotification not done: %s", charger.charge_point_id, error or "timeout")


_report_ids = itertools.count(1)


async def request_ratings(point, version: str, charger: OcppCharger) -> None:
    """2.0.1 and 2.1: ask for the EVSE's maximum power, the maxLimit of its device-model variable
    EVSE Power, which only a report carries (GetVariables gives attribute values, not
    characteristics); the charger sends it in a NotifyReport (``drivers.ocpp.handlers``).
    1.6 has no standard configuration key for a charger's power: nothing is asked."""
    if version == "1.6":
        return
    request = _CALLS_2X[version].GetReport(request_id=next(_report_ids), component_variable=[
        {"component": {"name": "EVSE", "evse": {"id": charger.evse_id}}, "variable": {"name": "Power"}}])
    try:
        response = await point.call(request, suppress=False)
    except (OCPPError, asyncio.TimeoutError) as error:
        log.info("%s: GetReport EVSE Power not done: %s", charger.charge_point_id, error or "timeout")
        return
    if response.status != "Accepted":
        log.info("%s: GetReport EVSE Power: %s (its maximum power is not compared with the profile)",
                 charger.charge_point_id, response.status)


async def send_failsafe(point, session, version: str) -> None:
    """The max profile at the charger's share of the site's connection limit (``session.failsafe_kw``),
    unless the charger's own purpose is a max profile.  A refusal is one ``command_failed`` (purpose
    the max profile's) and is not retried on this connection: the next connection tries again."""
    charger = session.command_charger
    if session.failsafe_kw is None or charger.effective_purpose() in MAX_PURPOSES:
        return
    import_kw, export_kw = session.failsafe_kw
    export_kw = export_kw if version == "2.1" and session.features.bidirectional else None
    payload = failsafe_payload(charger, version, import_kw, export_kw, now_s=time.time())
    purpose = max_purpose(version)
    try:
        response = await point.call_prebuilt("SetChargingProfile", payload)
        status = response.get("status") if isinstance(response, dict) else None
        if status == "Accepted":
            log.debug("%s: failsafe %s at %g kW accepted", charger.charge_point_id, purpose, import_kw)
            return
        why = f"SetChargingProfile {status}"
    except asyncio.TimeoutError:
        why = f"no answer to SetChargingProfile within {point.response_timeout_s:g} s"
    except OCPPError as error:
        why = f"SetChargingProfile CALLERROR {type(error).__name__}: {error.description}"
    log.warning("%s: failsafe %s at %g kW not set (%s); tried again at the next connection",
                charger.charge_point_id, purpose, import_kw, why)
    period = (payload.get("chargingProfile") or payload.get("csChargingProfiles"))["chargingSchedule"]
    schedule = period[0] if isinstance(period, list) else period
    session.emit("command_failed", {"limit": schedule["chargingSchedulePeriod"][0]["limit"],
                                    "unit": schedule["chargingRateUnit"], "purpose": purpose, "reason": why})


async def greet(point, session, version: str) -> None:
    charger = session.command_charger
    await trigger_status(point, version, charger)
    await request_ratings(point, version, charger)
    if version == "2.1":
        await learn_features(point, session, version, timeout_s=point.response_timeout_s)
    else:
        session.on_features(resolve(session.charger, version, None), version)
    await send_failsafe(point, session, version)
