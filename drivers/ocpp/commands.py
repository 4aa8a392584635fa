"""Commands from the central system to one connected charger.

``command_loop(point, session, version)`` runs beside the receive loop of a
connection.  It sends nothing until the point's boot gate opens (our
BootNotification answer went out, or the boot grace period passed without
one: ``drivers.ocpp.handlers``); targets set meanwhile wait, newest wins.  On
its first turn after that it asks the charger for its connector status
(TriggerMessage) and, in 2.0.1, for its EVSE's maximum power (GetReport),
then sends a SetChargingProfile whenever the session's
target moves the limit beyond the deadband (see ``drivers.ocpp.limits``).
Turns come from the central system's ``LoopPacer`` (``drivers.ocpp.pacing``).

A rejection, a CALLERROR or no answer within ``call_timeout_s`` is a failed
command: the session emits ``command_failed``, is degraded and reports
``command_refused``, and the newest limit is tried again with capped,
jittered backoff until accepted; no SetChargingProfile goes out while backing
off, whatever new targets arrive, so a charger that refuses everything is not
hammered.  The first refusal of a configured ChargingStationExternalConstraints
purpose or W unit (never accepted before) instead switches the charger to
TxDefaultProfile in A at once (``charging_profile_fallback``,
``drivers.ocpp.session.fallback_settings``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from ocpp.exceptions import OCPPError
from ocpp.v16 import call as call16
from ocpp.v201 import call as call201

from edge.runtime.backoff import Backoff

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


def build_payload(charger: OcppCharger, version: str, limit: ChargeLimit, transaction_id: str | None) -> dict[str, Any]:
    """The SetChargingProfile payload as it goes on the wire (camelCase JSON object).

    Built directly rather than as the library's dataclass: its generic
    dataclass -> dict -> camelCase conversion was over half of the gateway's
    cost of a profile, which counts when a setpoint moves 500 chargers at once.
    """
    purpose = purpose_for(charger, version)
    is_tx = purpose in ("TxProfile", "TxDefaultProfile")
    period: dict[str, Any] = {"startPeriod": 0, "limit": limit.value}
    if limit.unit == "A":
        period["numberPhases"] = limit.phases
    schedule: dict[str, Any] = {"chargingRateUnit": limit.unit, "chargingSchedulePeriod": [period]}
    profile: dict[str, Any] = {
        "stackLevel": charger.stack_level,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Relative" if is_tx else "Absolute",
    }
    if not is_tx:
        schedule["startSchedule"] = _schedule_start()
    if purpose == "TxProfile":
        profile["transactionId"] = int(transaction_id) if version == "1.6" else transaction_id
    if version == "1.6":
        profile.update(chargingProfileId=charger.profile_id, chargingSchedule=schedule)
        connector = 0 if purpose == "ChargePointMaxProfile" else charger.connector_id
        return {"connectorId": connector, "csChargingProfiles": profile}
    profile.update(id=charger.profile_id, chargingSchedule=[{"id": 1, **schedule}])
    evse = 0 if purpose == "ChargingStationMaxProfile" else charger.evse_id
    return {"evseId": evse, "chargingProfile": profile}


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


_report_ids = itertools.count(1)


async def request_ratings(point, version: str, charger: OcppCharger) -> None:
    """2.0.1: ask for the EVSE's maximum power, the maxLimit of its device-model variable
    EVSE Power, which only a report carries (GetVariables gives attribute values, not
    characteristics); the charger sends it in a NotifyReport (``drivers.ocpp.handlers``).
    1.6 has no standard configuration key for a charger's power: nothing is asked."""
    if version != "2.0.1":
        return
    request = call201.GetReport(request_id=next(_report_ids), component_variable=[
        {"component": {"name": "EVSE", "evse": {"id": charger.evse_id}}, "variable": {"name": "Power"}}])
    try:
        response = await point.call(request, suppress=False)
    except (OCPPError, asyncio.TimeoutError) as error:
        log.info("%s: GetReport EVSE Power not done: %s", charger.charge_point_id, error or "timeout")
        return
    if response.status != "Accepted":
        log.info("%s: GetReport EVSE Power: %s (its maximum power is not compared with the profile)",
                 charger.charge_point_id, response.status)


ACCEPTED, FALLBACK, FAILED = "accepted", "fallback", "failed"


def _refused(session: ChargerSession, limit: ChargeLimit, why: str, purpose: str | None) -> str:
    fell_back = session.on_command_result(limit, False, why, refused=True, purpose=purpose)
    return FALLBACK if fell_back else FAILED


async def send_limit(point, session: ChargerSession, version: str, limit: ChargeLimit) -> str:
    """Send ``limit`` with the session's command settings: ACCEPTED, FALLBACK (refused, and the
    session switched to its fallback profile, to be sent at once) or FAILED."""
    charger = session.command_charger
    purpose = purpose_for_safe(charger, version)
    try:
        payload = build_payload(charger, version, limit, session.transaction_id)
    except ValueError as error:
        # ExternalConstraints to a charger that negotiated 1.6: refused before it is sent.
        return _refused(session, limit, str(error), purpose)
    try:
        # The payload is ours and known valid, so it is not validated against the
        # schema; that also spares the float-vs-multipleOf trap of the 1.6 schema.
        response = await point.call_prebuilt("SetChargingProfile", payload)
    except asyncio.TimeoutError:
        # No answer says nothing about the profile: no fallback, just a failure.
        why = f"no answer to SetChargingProfile within {point.response_timeout_s:g} s"
        session.on_command_result(limit, False, why, purpose=purpose)
        return FAILED
    except OCPPError as error:
        # A charger that does not know a purpose or unit may answer with a schema error.
        return _refused(session, limit, f"SetChargingProfile CALLERROR {type(error).__name__}: {error.description}",
                        purpose)
    status = response.get("status") if isinstance(response, dict) else None
    if status != "Accepted":
        return _refused(session, limit, f"SetChargingProfile {status}", purpose)
    session.on_command_result(limit, True, "", purpose=purpose)
    # Debug, not info: one line per charger per setpoint is 250 lines/s with
    # 500 chargers at 2 s.  Failures are events and warnings.
    log.debug("%s: limit %g %s (%s) accepted", charger.charge_point_id, limit.value, limit.unit, purpose)
    return ACCEPTED


async def command_loop(point, session: ChargerSession, version: str) -> None:
    """Runs while the link is up.  Works only on its turns (``session.command_wakeup``), which the
    central system's pacer hands out a few per loop iteration, so a setpoint that moves 500
    chargers does not become one 100 ms iteration; a turn that finds the iteration's slice full
    goes back to the front of the queue.  Retries wait for a timer, then for a turn too."""
    pacer = session.pacer
    loop = asyncio.get_running_loop()
    backoff = Backoff(RETRY_FIRST_S, RETRY_CAP_S)  # .attempt: refusals in a row
    retry: asyncio.TimerHandle | None = None
    triggered = False

    def retry_due() -> None:
        nonlocal retry
        retry = None
        session.request_command()

    try:
        # Nothing before the charger's boot is answered (or its grace period is over).  Turns
        # asked for meanwhile (connection, targets) are kept in command_wakeup: the newest
        # target goes out once the gate opens.
        await point.ready.wait()
        while True:
            await session.command_wakeup.wait()
            session.command_wakeup.clear()
            if pacer is not None and not pacer.admit():
                pacer.submit(session, session.command_wakeup.set, front=True)
                continue
            charger = session.command_charger  # changes once, on a fallback
            if not triggered:
                triggered = True
                await trigger_status(point, version, charger)
                await request_ratings(point, version, charger)
            if not session.target_given:
                continue
            if retry is not None:
                continue  # backing off: retry_due asks for the turn that sends the newest limit
            limit = limit_for_target(charger, session.target_kw)
            if not backoff.attempt and not needs_sending(session.limit_in_force, limit, charger.deadband_kw):
                continue
            if purpose_for_safe(charger, version) == "TxProfile" and session.transaction_id is None:
                backoff.reset()
                continue  # a TxProfile needs a transaction; sent when one starts
            outcome = await send_limit(point, session, version, limit)
            if outcome == ACCEPTED:
                backoff.reset()
                continue
            if outcome == FALLBACK:
                session.request_command(front=True)
                continue
            retry = loop.call_later(backoff.next_delay(), retry_due)
    finally:
        if retry is not None:
            retry.cancel()


def purpose_for_safe(charger: OcppCharger, version: str) -> str | None:
    try:
        return purpose_for(charger, version)
    except ValueError:
        return None
