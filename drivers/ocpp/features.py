"""What a charger can do beyond charging (OCPP 2.1 V2X): from the profile, or learned at each connection.

``ChargerFeatures(bidirectional, afrr_signal, source, operation_modes)``: ``source`` is
``profile`` (nothing was ``auto``), ``device_model`` (learned) or ``default`` (asked,
but the charger answered neither request: taken as not bidirectional).

``await learn_features(point, session, version, timeout_s)``: once per connection, on the
connection's command task (never in a handler).  Only 2.1 links are asked, and only for
the keys left ``auto``: GetVariables of V2XChargingCtrlr (on the asset's EVSE) Enabled
and SupportedOperationModes; if that is refused (a CALLERROR, no answer, Rejected), a
GetBaseReport ConfigurationInventory and the NotifyReport it brings.  CentralSetpoint
among the supported modes (and Enabled not false) means the charger can be dispatched
both ways; CentralFrequency means it follows AFRRSignal.  A 1.6 or 2.0.1 link is never
bidirectional.  The session gets the result (``session.on_features``), which emits
``charger_features`` on 2.1 links.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from ocpp.exceptions import OCPPError
from ocpp.v21 import call as call21

from drivers.ocpp.config import V2X_PURPOSES, OcppCharger

log = logging.getLogger("flexedge.drivers.ocpp")

COMPONENT = "V2XChargingCtrlr"
_report_ids = itertools.count(100_000)  # apart from the ratings' GetReport ids (drivers.ocpp.commands)


@dataclass(frozen=True, slots=True)
class ChargerFeatures:
    bidirectional: bool = False
    afrr_signal: bool = False
    source: str = "default"
    operation_modes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceModelV2x:
    """V2XChargingCtrlr as the charger describes it.  ``present``: the component was found at all."""

    present: bool
    enabled: bool | None = None
    operation_modes: tuple[str, ...] = ()


def _modes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, str):
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _enabled(value: Any) -> bool | None:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _ours(component: dict[str, Any], evse_id: int) -> bool:
    evse = component.get("evse") or {}
    return component.get("name") == COMPONENT and evse.get("id", evse_id) == evse_id


def from_variables(results: list[dict[str, Any]], evse_id: int) -> DeviceModelV2x | None:
    """From a GetVariables answer; None when the charger did not say (Rejected and the like)."""
    enabled, modes, present, known = None, (), False, False
    for result in results or []:
        if not isinstance(result, dict) or not _ours(result.get("component") or {}, evse_id):
            continue
        status = result.get("attribute_status")
        name = (result.get("variable") or {}).get("name")
        if status == "Accepted":
            present = known = True
            if name == "Enabled":
                enabled = _enabled(result.get("attribute_value"))
            elif name == "SupportedOperationModes":
                modes = _modes(result.get("attribute_value"))
        elif status in ("UnknownComponent", "UnknownVariable"):
            known = True  # an answer: the charger has no such thing
    return DeviceModelV2x(present, enabled, modes) if known else None


def from_report(report_data: list[dict[str, Any]], evse_id: int) -> DeviceModelV2x:
    """From the report_data of a NotifyReport (all its parts)."""
    enabled, modes, present = None, (), False
    for item in report_data or []:
        if not isinstance(item, dict) or not _ours(item.get("component") or {}, evse_id):
            continue
        name = (item.get("variable") or {}).get("name")
        actual = next((a.get("value") for a in item.get("variable_attribute") or []
                       if isinstance(a, dict) and a.get("type", "Actual") == "Actual"), None)
        present = True
        if name == "Enabled":
            enabled = _enabled(actual)
        elif name == "SupportedOperationModes":
            modes = _modes(actual)
    return DeviceModelV2x(present, enabled, modes)


def resolve(charger: OcppCharger, version: str, learned: DeviceModelV2x | None) -> ChargerFeatures:
    """The features for this link: the profile's, with ``auto`` keys from ``learned`` (None: not learned)."""
    settings = charger.v2x
    if version != "2.1":
        return ChargerFeatures(False, False, "default")  # never bidirectional; not reported
    if settings.bidirectional is False or charger.effective_purpose() not in V2X_PURPOSES:
        return ChargerFeatures(False, False, "profile")
    auto = settings.bidirectional == "auto" or settings.afrr_signal == "auto"
    if not auto:
        return ChargerFeatures(True, bool(settings.afrr_signal), "profile")
    if learned is None:
        bidirectional = settings.bidirectional is True
        return ChargerFeatures(bidirectional, bidirectional and settings.afrr_signal is True, "default")
    can_setpoint = learned.present and learned.enabled is not False and "CentralSetpoint" in learned.operation_modes
    can_frequency = learned.present and learned.enabled is not False and "CentralFrequency" in learned.operation_modes
    bidirectional = can_setpoint if settings.bidirectional == "auto" else True
    afrr = can_frequency if settings.afrr_signal == "auto" else bool(settings.afrr_signal)
    return ChargerFeatures(bidirectional, bidirectional and afrr, "device_model", learned.operation_modes)


def needs_learning(charger: OcppCharger, version: str) -> bool:
    settings = charger.v2x
    return (version == "2.1" and settings.bidirectional is not False and charger.effective_purpose() in V2X_PURPOSES
            and (settings.bidirectional == "auto" or settings.afrr_signal == "auto"))


async def ask_device_model(point, session, timeout_s: float) -> DeviceModelV2x | None:
    """GetVariables, else GetBaseReport ConfigurationInventory; None when the charger answers neither."""
    charger = session.charger
    evse = {"id": charger.evse_id}
    wanted = [{"component": {"name": COMPONENT, "evse": evse}, "variable": {"name": name}}
              for name in ("Enabled", "SupportedOperationModes")]
    try:
        answer = await point.call(call21.GetVariables(get_variable_data=wanted), suppress=False)
        learned = from_variables(answer.get_variable_result, charger.evse_id)
        if learned is not None:
            return learned
        why = "GetVariables gave no value"
    except (OCPPError, asyncio.TimeoutError) as error:
        why = f"GetVariables: {type(error).__name__}"
    request_id = next(_report_ids)
    report = session.expect_report(request_id)
    try:
        answer = await point.call(call21.GetBaseReport(request_id=request_id, report_base="ConfigurationInventory"),
                                  suppress=False)
        if answer.status != "Accepted":
            log.info("%s: %s; GetBaseReport ConfigurationInventory: %s", charger.charge_point_id, why, answer.status)
            return None
        async with asyncio.timeout(timeout_s):
            return from_report(await report, charger.evse_id)
    except (OCPPError, asyncio.TimeoutError) as error:
        log.info("%s: %s; GetBaseReport ConfigurationInventory: %s", charger.charge_point_id, why,
                 type(error).__name__)
        return None
    finally:
        session.forget_report(request_id)


async def learn_features(point, session, version: str, timeout_s: float) -> ChargerFeatures:
    learned = None
    if needs_learning(session.charger, version):
        learned = await ask_device_model(point, session, timeout_s)
    features = resolve(session.charger, version, learned)
    session.on_features(features, version)
    return features
