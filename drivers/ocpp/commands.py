"""Commands from the central system to one connected charger.

``command_loop(point, session, version)`` runs beside the receive loop of a
connection: it first asks the charger for its connector status
(TriggerMessage), then sends a SetChargingProfile whenever the session's
target moves the limit beyond the deadband (see ``drivers.ocpp.limits``).
A rejection, a CALLERROR or no answer within ``call_timeout_s`` is a failed
command: the session emits ``command_failed`` and is degraded, and the limit
is tried again with capped backoff until accepted or replaced.
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import datetime, timedelta, timezone
from typing import Any

from ocpp.exceptions import OCPPError
from ocpp.v16 import call as call16
from ocpp.v201 import call as call201

from drivers.ocpp.config import OcppCharger
from drivers.ocpp.limits import ChargeLimit, limit_for_target, needs_sending
from drivers.ocpp.session import ChargerSession

log = logging.getLogger("flexedge.drivers.ocpp")

RETRY_FIRST_S = 1.0
RETRY_CAP_S = 60.0
_MAX_PURPOSE = {"1.6": "ChargePointMaxProfile", "2.0.1": "ChargingStationMaxProfile"}


def purpose_for(charger: OcppCharger, version: str) -> str:
    """The profile purpose for this charger and negotiated version (max-profile names translated)."""
    purpose = charger.effective_purpose()
    if purpose in _MAX_PURPOSE.values():
        return _MAX_PURPOSE[version]
    if purpose == "ChargingStationExternalConstraints" and version == "1.6":
        raise ValueError("ChargingStationExternalConstraints does not exist in OCPP 1.6")
    return purpose


def _schedule_start() -> str:
    # A minute in the past, so a charger whose clock runs a little behind applies it at once.
    start = datetime.now(timezone.utc) - timedelta(seconds=60)
    return start.isoformat(timespec="seconds").replace("+00:00", "Z")


def build_request(charger: OcppCharger, version: str, limit: ChargeLimit, transaction_id: str | None) -> Any:
    purpose = purpose_for(charger, version)
    is_tx = purpose in ("TxProfile", "TxDefaultProfile")
    period = {"start_period": 0, "limit": limit.value}
    if limit.unit == "A":
        period["number_phases"] = limit.phases
    schedule: dict[str, Any] = {"charging_rate_unit": limit.unit, "charging_schedule_period": [period]}
    profile: dict[str, Any] = {
        "stack_level": charger.stack_level,
        "charging_profile_purpose": purpose,
        "charging_profile_kind": "Relative" if is_tx else "Absolute",
    }
    if not is_tx:
        schedule["start_schedule"] = _schedule_start()
    if purpose == "TxProfile":
        profile["transaction_id"] = int(transaction_id) if version == "1.6" else transaction_id
    if version == "1.6":
        profile.update(charging_profile_id=charger.profile_id, charging_schedule=schedule)
        connector = 0 if purpose == "ChargePointMaxProfile" else charger.connector_id
        return call16.SetChargingProfile(connector_id=connector, cs_charging_profiles=profile)
    profile.update(id=charger.profile_id, charging_schedule=[{"id": 1, **schedule}])
    evse = 0 if purpose == "ChargingStationMaxProfile" else charger.evse_id
    return call201.SetChargingProfile(evse_id=evse, charging_profile=profile)


async def trigger_status(point, version: str, charger: OcppCharger) -> None:
    """Ask for a StatusNotification, so a restarted gateway learns whether an EV is plugged in."""
    if version == "1.6":
        request = call16.TriggerMessage(requested_message="StatusNotification",
                                        connector_id=charger.connector_id or None)
    else:
        request = call201.TriggerMessage(requested_message="StatusNotification",
                                         evse={"id": charger.evse_id, "connector_id": 1})
    try:
        await point.call(request, suppress=False)
    except (OCPPError, asyncio.TimeoutError) as error:
        log.info("%s: TriggerMessage StatusNotification not done: %s", charger.charge_point_id, error or "timeout")


async def send_limit(point, session: ChargerSession, version: str, limit: ChargeLimit) -> bool:
    charger = session.charger
    try:
        request = build_request(charger, version, limit, session.transaction_id)
    except ValueError as error:
        session.on_command_result(limit, False, str(error))
        return False
    try:
        # The payload is ours and known valid; skipping validation also spares the
        # float-vs-multipleOf trap of the 1.6 schema.
        response = await point.call(request, suppress=False, skip_schema_validation=True)
    except asyncio.TimeoutError:
        session.on_command_result(limit, False, f"no answer to SetChargingProfile within {point._response_timeout:g} s")
        return False
    except OCPPError as error:
        session.on_command_result(limit, False, f"SetChargingProfile CALLERROR {type(error).__name__}: {error.description}")
        return False
    status = getattr(response, "status", None)
    accepted = status == "Accepted"
    session.on_command_result(limit, accepted, f"SetChargingProfile {status}")
    if accepted:
        log.info("%s: limit %g %s (%s) accepted", charger.charge_point_id, limit.value, limit.unit,
                 purpose_for(charger, version))
    return accepted


async def command_loop(point, session: ChargerSession, version: str) -> None:
    charger = session.charger
    await trigger_status(point, version, charger)
    failures = 0
    while True:
        retry_s = None
        if failures:
            ceiling = min(RETRY_CAP_S, RETRY_FIRST_S * 2 ** min(failures - 1, 10))
            retry_s = ceiling / 2 + random.random() * ceiling / 2
        try:
            await asyncio.wait_for(session.command_wakeup.wait(), retry_s)
        except asyncio.TimeoutError:
            pass
        session.command_wakeup.clear()
        if not session.target_given:
            continue
        limit = limit_for_target(charger, session.target_kw)
        if not failures and not needs_sending(session.limit_in_force, limit, charger.deadband_kw):
            continue
        if purpose_for_safe(charger, version) == "TxProfile" and session.transaction_id is None:
            failures = 0
            continue  # a TxProfile needs a transaction; sent when one starts
        failures = 0 if await send_limit(point, session, version, limit) else failures + 1


def purpose_for_safe(charger: OcppCharger, version: str) -> str | None:
    try:
        return purpose_for(charger, version)
    except ValueError:
        return None
