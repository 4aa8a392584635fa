"""Commands from the central system to one connected charger.

``command_loop(point, session, version)`` runs beside the receive loop of a
connection.  It sends nothing until the point's boot gate opens (our
BootNotification answer went out, or the boot grace period passed without
one: ``drivers.ocpp.handlers``); targets set meanwhile wait, newest wins.  On
its first turn after that it greets the charger (``drivers.ocpp.greeting``:
status, rating, V2X features, failsafe profile), then sends what the session
wants (``wanted_command``) whenever it differs from what is in force beyond
the deadband (``drivers.ocpp.schedule``), and refreshes a profile whose first
period holds the target before a plan before half the hold has run out.
Turns come from the central system's ``LoopPacer`` (``drivers.ocpp.pacing``).

What is wanted: a charging limit (1.6, 2.0.1, one-way 2.1 sessions); a V2X
setpoint (CentralSetpoint) for a bidirectional 2.1 session; CentralFrequency
and AFRRSignal for one whose charger follows the aFRR signal while the
controller gives a dispatch context; on release (None) the plan alone if
there is one, else ClearChargingProfile of the gateway's profile (a charger
that refuses the clear gets a limit at the full rating, as before).

A rejection, a CALLERROR or no answer within ``call_timeout_s`` is a failed
command: the session emits ``command_failed``, is degraded and reports
``command_refused``, and the newest command is tried again with capped,
jittered backoff until accepted; nothing goes out while backing off,
whatever new targets arrive, so a charger that refuses everything is not
hammered.  Fallbacks instead of failures: the first refusal of a configured
ChargingStationExternalConstraints purpose or W unit (never accepted before)
switches the charger to TxDefaultProfile in A at once
(``drivers.ocpp.session.fallback_settings``), after clearing what may be left
under the old purpose; a refused CentralFrequency profile or AFRRSignal
switches the link to CentralSetpoint (``charging_profile_fallback``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ocpp.exceptions import OCPPError

from edge.asset import PowerPlan
from edge.runtime.backoff import Backoff

from drivers.ocpp.config import OcppCharger
from drivers.ocpp.greeting import greet
from drivers.ocpp.limits import limit_for_target
from drivers.ocpp.schedule import (CLEAR, FREQUENCY, LIMIT, PLAN, SETPOINT, Command, clear_payload, differs,
                                   purpose_for, set_profile_payload)
from drivers.ocpp.session import ChargerSession
from drivers.ocpp.v2x import afrr_signal_payload, signal_for

log = logging.getLogger("flexedge.drivers.ocpp")

RETRY_FIRST_S = 1.0
RETRY_CAP_S = 60.0
REFRESH_FRACTION = 0.4  # of the hold: a profile with a hold is sent again this far into it

ACCEPTED, FALLBACK, AT_ONCE, FAILED = "accepted", "fallback", "at_once", "failed"


def _plan_ahead(plan: PowerPlan | None, from_s: float) -> PowerPlan | None:
    """The plan if any of it is still to come after ``from_s``."""
    if plan is None or not any(end_s > from_s for _, end_s, _ in plan.slots):
        return None
    return plan


def wanted_command(session: ChargerSession, now_s: float) -> Command | None:
    """What the charger should run now, from the session's target, plan and dispatch context;
    None: nothing was ever asked."""
    charger = session.command_charger
    releasing = session.target_kw is None
    plan = _plan_ahead(session.plan, now_s if releasing else now_s + session.hold_s)
    if not session.target_given and plan is None:
        return None
    v2x = session.v2x()
    charge_kw = session.charge_max_kw() if v2x else 0.0
    discharge_kw = session.discharge_max_kw() if v2x else 0.0
    if releasing:
        if plan is not None:
            return Command(PLAN, plan=plan, v2x=v2x, charge_max_kw=charge_kw, discharge_max_kw=discharge_kw)
        if session.clear_refused:
            return Command(LIMIT, limit=limit_for_target(charger, None))
        return Command(CLEAR)
    if not v2x:
        return Command(LIMIT, limit=limit_for_target(charger, session.target_kw), plan=plan)
    context = session.context
    if context is not None and session.features.afrr_signal and not session.frequency_refused:
        baseline_kw = min(max(context.baseline_kw, -charge_kw), discharge_kw)
        return Command(FREQUENCY, baseline_kw=baseline_kw, band_up_kw=max(0.0, context.band_up_kw),
                       band_down_kw=max(0.0, context.band_down_kw), charge_max_kw=charge_kw,
                       discharge_max_kw=discharge_kw, plan=plan, v2x=True)
    setpoint_kw = min(max(session.target_kw, -charge_kw), discharge_kw)
    needs = session.ev.needs
    min_charge_kw = needs.min_charge_kw if needs is not None else None
    if min_charge_kw and -min_charge_kw < setpoint_kw < 0:
        setpoint_kw = 0.0  # the EV cannot charge that slowly: charging at its minimum would import more
    return Command(SETPOINT, setpoint_kw=setpoint_kw, charge_max_kw=charge_kw, discharge_max_kw=discharge_kw,
                   plan=plan, v2x=True)


def _refused(session: ChargerSession, command: Command, why: str, purpose: str | None) -> str:
    if command.mode == FREQUENCY:
        session.on_frequency_refused(why)
        return AT_ONCE
    fell_back = session.on_command_result(command, False, why, refused=True, purpose=purpose)
    return FALLBACK if fell_back else FAILED


async def _send_clear(point, session: ChargerSession, version: str, command: Command, purpose: str | None) -> str:
    charger = session.command_charger
    try:
        response = await point.call_prebuilt("ClearChargingProfile", clear_payload(charger, version))
        status = response.get("status") if isinstance(response, dict) else None
    except asyncio.TimeoutError:
        why = f"no answer to ClearChargingProfile within {point.response_timeout_s:g} s"
        session.on_command_result(command, False, why, purpose=purpose)
        return FAILED
    except OCPPError as error:
        status = f"CALLERROR {type(error).__name__}"
    if status in ("Accepted", "Unknown"):  # Unknown: no profile of that id, which is as good
        session.on_command_result(command, True, "", purpose=purpose)
        return ACCEPTED
    log.info("%s: ClearChargingProfile %s: released with a limit at the rating instead (this connection)",
             charger.charge_point_id, status)
    session.clear_refused = True
    return AT_ONCE


async def clear_old_purpose(point, session: ChargerSession, version: str, purpose: str) -> None:
    """After a fallback: what the charger may hold under the refused purpose goes first."""
    try:
        await point.call_prebuilt("ClearChargingProfile", clear_payload(session.charger, version, purpose))
    except (OCPPError, asyncio.TimeoutError) as error:
        log.info("%s: ClearChargingProfile of %s not done: %s", session.charger.charge_point_id, purpose,
                 type(error).__name__)


async def send_command(point, session: ChargerSession, version: str, command: Command) -> str:
    """Send ``command`` with the session's command settings: ACCEPTED, FALLBACK (refused, and the
    session switched to its fallback profile), AT_ONCE (refused, and something else is to be sent
    at once: CentralSetpoint for CentralFrequency, a limit for a clear) or FAILED."""
    charger = session.command_charger
    purpose = purpose_for_safe(charger, version)
    if command.mode == CLEAR:
        return await _send_clear(point, session, version, command, purpose)
    try:
        payload = set_profile_payload(charger, version, command, session.transaction_id,
                                      now_s=time.time(), hold_s=session.hold_s)
    except ValueError as error:
        # ExternalConstraints to a charger that negotiated 1.6: refused before it is sent.
        return _refused(session, command, str(error), purpose)
    try:
        # The payload is ours and known valid, so it is not validated against the
        # schema; that also spares the float-vs-multipleOf trap of the 1.6 schema.
        response = await point.call_prebuilt("SetChargingProfile", payload)
    except asyncio.TimeoutError:
        # No answer says nothing about the profile: no fallback, just a failure.
        why = f"no answer to SetChargingProfile within {point.response_timeout_s:g} s"
        session.on_command_result(command, False, why, purpose=purpose)
        return FAILED
    except OCPPError as error:
        # A charger that does not know a purpose or unit may answer with a schema error.
        return _refused(session, command, f"SetChargingProfile CALLERROR {type(error).__name__}: "
                                          f"{error.description}", purpose)
    status = response.get("status") if isinstance(response, dict) else None
    if status != "Accepted":
        return _refused(session, command, f"SetChargingProfile {status}", purpose)
    session.on_command_result(command, True, "", purpose=purpose)
    # Debug, not info: one line per charger per setpoint is 250 lines/s with
    # 500 chargers at 2 s.  Failures are events and warnings.
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: %s %s (%s) accepted", charger.charge_point_id, command.mode, command.shown(), purpose)
    return ACCEPTED


async def afrr_turn(point, session: ChargerSession) -> None:
    """AFRRSignal with the site's activation, while a CentralFrequency profile is in force and the
    level moved by one or more (of 1000).  A refusal: CentralSetpoint for the rest of the link."""
    command, context = session.command_in_force, session.context
    if command is None or command.mode != FREQUENCY or context is None or session.frequency_refused:
        return
    signal = signal_for(context.activation_level)
    if session.afrr_signal_sent is not None and abs(signal - session.afrr_signal_sent) < 1:
        return
    try:
        response = await point.call_prebuilt("AFRRSignal", afrr_signal_payload(signal, time.time()))
        status = response.get("status") if isinstance(response, dict) else None
    except asyncio.TimeoutError:
        log.info("%s: no answer to AFRRSignal within %g s; sent again at the next move",
                 session.charger.charge_point_id, point.response_timeout_s)
        return
    except OCPPError as error:
        status = f"CALLERROR {type(error).__name__}"
    if status != "Accepted":
        session.on_frequency_refused(f"AFRRSignal {status}")
        return
    session.afrr_signal_sent = signal


def refresh_due(session: ChargerSession) -> bool:
    command = session.command_in_force
    return (command is not None and command.holds
            and time.monotonic() - session.command_accepted_mono >= REFRESH_FRACTION * session.hold_s - 0.05)


async def command_loop(point, session: ChargerSession, version: str) -> None:
    """Runs while the link is up.  Works only on its turns (``session.command_wakeup``), which the
    central system's pacer hands out a few per loop iteration, so a setpoint that moves 500
    chargers does not become one 100 ms iteration; a turn that finds the iteration's slice full
    goes back to the front of the queue.  Retries and refreshes wait for a timer, then for a turn too."""
    pacer = session.pacer
    loop = asyncio.get_running_loop()
    backoff = Backoff(RETRY_FIRST_S, RETRY_CAP_S)  # .attempt: refusals in a row
    retry: asyncio.TimerHandle | None = None
    refresh: asyncio.TimerHandle | None = None
    greeted = False

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
            if not greeted:
                greeted = True
                await greet(point, session, version)
            if retry is not None:
                continue  # backing off: retry_due asks for the turn that sends the newest command
            command = wanted_command(session, time.time())
            if command is not None and (backoff.attempt or refresh_due(session)
                                        or differs(session.command_in_force, command,
                                                   session.command_charger.deadband_kw)):
                if purpose_for_safe(session.command_charger, version) == "TxProfile" \
                        and session.transaction_id is None:
                    backoff.reset()
                    continue  # a TxProfile needs a transaction; sent when one starts
                old_purpose = purpose_for_safe(session.command_charger, version)
                outcome = await send_command(point, session, version, command)
                if outcome == ACCEPTED:
                    backoff.reset()
                    if refresh is not None:
                        refresh.cancel()
                        refresh = None
                    if command.holds:
                        refresh = loop.call_later(REFRESH_FRACTION * session.hold_s, session.request_command)
                elif outcome in (FALLBACK, AT_ONCE):
                    if outcome == FALLBACK and old_purpose is not None:
                        await clear_old_purpose(point, session, version, old_purpose)
                    session.request_command(front=True)
                    continue
                else:
                    retry = loop.call_later(backoff.next_delay(), retry_due)
                    continue
            await afrr_turn(point, session)
    finally:
        for timer in (retry, refresh):
            if timer is not None:
                timer.cancel()


def purpose_for_safe(charger: OcppCharger, version: str) -> str | None:
    try:
        return purpose_for(charger, version)
    except ValueError:
        return None
